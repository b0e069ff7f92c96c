/* fdw/llmfdw--0.1.0--0.2.0.sql */

-- complain if script is sourced in psql, rather than via ALTER EXTENSION
\echo Use "ALTER EXTENSION llmfdw UPDATE TO '0.2.0'" to load this file. \quit

-- 0.2.0: options are checked by level and against the tables' declarations
-- (see llmfdw_validator); IMPORT FOREIGN SCHEMA llm creates the tables; the
-- helper functions below belong to the extension.  A fresh CREATE EXTENSION
-- runs llmfdw--0.1.0.sql and then this script.

-- Postgres calls these itself; no role needs to call them.
REVOKE ALL ON FUNCTION llmfdw_handler() FROM PUBLIC;
REVOKE ALL ON FUNCTION llmfdw_validator(text[], oid) FROM PUBLIC;

COMMENT ON FOREIGN DATA WRAPPER llmfdw IS
  'Models served by an llmfdw sidecar as foreign tables: IMPORT FOREIGN SCHEMA llm FROM SERVER ... INTO llm';

-- Helpers over the same foreign tables, for users who would rather call a
-- function.  Each builds the query with only the parameters given, so every
-- one of them is pushed down to the sidecar as a request field.

CREATE OR REPLACE FUNCTION llm.complete(prompt text, model text DEFAULT NULL,
                                        max_tokens integer DEFAULT NULL,
                                        temperature double precision DEFAULT NULL,
                                        system text DEFAULT NULL)
RETURNS text LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE AS $fn$
DECLARE
  q text := 'SELECT completion FROM llm.completions WHERE prompt = $1';
  answer text;
BEGIN
  IF prompt IS NULL THEN RETURN NULL; END IF;
  IF model IS NOT NULL THEN q := q || ' AND model = $2'; END IF;
  IF max_tokens IS NOT NULL THEN q := q || ' AND max_tokens = $3'; END IF;
  IF temperature IS NOT NULL THEN q := q || ' AND temperature = $4'; END IF;
  IF system IS NOT NULL THEN q := q || ' AND system = $5'; END IF;
  EXECUTE q INTO answer USING prompt, model, max_tokens, temperature, system;
  RETURN answer;
END
$fn$;
COMMENT ON FUNCTION llm.complete IS 'The completion of one prompt (llm.completions underneath)';

CREATE OR REPLACE FUNCTION llm.embed(input text, model text DEFAULT NULL)
RETURNS vector LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE AS $fn$
DECLARE
  q text := 'SELECT embedding FROM llm.embeddings WHERE input = $1';
  result vector;
BEGIN
  IF input IS NULL THEN RETURN NULL; END IF;
  IF model IS NOT NULL THEN q := q || ' AND model = $2'; END IF;
  EXECUTE q INTO result USING input, model;
  RETURN result;
END
$fn$;
COMMENT ON FUNCTION llm.embed IS 'The embedding of one text (llm.embeddings underneath)';

-- The bulk form: the whole array goes to the sidecar as one Embed request
-- (input = ANY(...)); rows come back in the array's order, one per element
-- (duplicates embedded once), NULL elements give NULL embeddings.
CREATE OR REPLACE FUNCTION llm.embed_batch(inputs text[], model text DEFAULT NULL)
RETURNS TABLE (ord bigint, input text, embedding vector)
LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE AS $fn$
DECLARE
  q text := 'WITH e AS MATERIALIZED (SELECT input, embedding FROM llm.embeddings WHERE input = ANY($1)';
BEGIN
  IF model IS NOT NULL THEN q := q || ' AND model = $2'; END IF;
  q := q || ') SELECT u.ord, u.input, e.embedding FROM unnest($1) WITH ORDINALITY AS u(input, ord)'
         || ' LEFT JOIN e ON e.input = u.input ORDER BY u.ord';
  RETURN QUERY EXECUTE q USING inputs, model;
END
$fn$;
COMMENT ON FUNCTION llm.embed_batch IS 'Embeddings of many texts in one sidecar request, in input order';

-- Retrieval-augmented generation in one call: embed the question, take the
-- k nearest rows of a table of yours by cosine distance (an HNSW index on the
-- embedding column makes this an index scan), and answer from them.
CREATE OR REPLACE FUNCTION llm.rag(question text, corpus regclass, k integer DEFAULT 3,
                                   text_column name DEFAULT 'body',
                                   embedding_column name DEFAULT 'embedding',
                                   model text DEFAULT NULL, max_tokens integer DEFAULT 128)
RETURNS TABLE (answer text, sources text[])
LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE AS $fn$
DECLARE
  q vector;
BEGIN
  IF question IS NULL THEN RETURN; END IF;
  IF k IS NULL OR k < 1 THEN
    RAISE EXCEPTION 'llm.rag: k must be at least 1, got %', coalesce(k::text, 'NULL')
      USING ERRCODE = 'invalid_parameter_value', HINT = 'k is how many rows of the corpus the answer may use, e.g. k => 3.';
  END IF;
  IF max_tokens IS NOT NULL AND max_tokens < 1 THEN
    RAISE EXCEPTION 'llm.rag: max_tokens must be at least 1, got %', max_tokens
      USING ERRCODE = 'invalid_parameter_value';
  END IF;
  q := llm.embed(question);
  EXECUTE format('SELECT array_agg(t) FROM (SELECT %1$I AS t FROM %3$s ORDER BY %2$I <=> $1 LIMIT $2) s',
                 text_column, embedding_column, corpus)
     INTO sources USING q, k;
  answer := llm.complete(E'Context:\n- ' || array_to_string(sources, E'\n- ')
                         || E'\n\nUsing the context, answer: ' || question,
                         model => model, max_tokens => max_tokens);
  RETURN NEXT;
END
$fn$;
COMMENT ON FUNCTION llm.rag IS 'Answer a question from the k rows of a table nearest to it (pgvector), with the rows used';

-- Granted to no one by default: GRANT EXECUTE (or the role llm_user that
-- sql/llm_schema.sql creates) to the roles that may use the models.
REVOKE ALL ON FUNCTION llm.complete(text, text, integer, double precision, text) FROM PUBLIC;
REVOKE ALL ON FUNCTION llm.embed(text, text) FROM PUBLIC;
REVOKE ALL ON FUNCTION llm.embed_batch(text[], text) FROM PUBLIC;
REVOKE ALL ON FUNCTION llm.rag(text, regclass, integer, name, name, text, integer) FROM PUBLIC;
