-- llmfdw: the FDW, the server that points at the sidecar, and schema llm.
--
--   psql -v ON_ERROR_STOP=1 -v sidecar_address='unix:///abs/path/sidecar.sock' -f sql/llmfdw.sql
--
-- Safe to run again: it keeps the server (updating its address), the tables
-- and everything that depends on them, and adds what is missing.
\if :{?sidecar_address}
\else
  \set sidecar_address 'unix:///tmp/llmfdw/sidecar.sock'
\endif

CREATE EXTENSION IF NOT EXISTS vector;
CREATE EXTENSION IF NOT EXISTS llmfdw;
ALTER EXTENSION llmfdw UPDATE;

-- Roles get the models through this role, never through the server itself:
-- USAGE on the server would let a role create its own user mapping.
SELECT NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'llm_user') AS need_role \gset
\if :need_role
  CREATE ROLE llm_user NOLOGIN;
\endif
COMMENT ON ROLE llm_user IS 'May query the llm.* tables and call the llm.* functions: GRANT llm_user TO your_role';

SELECT NOT EXISTS (SELECT 1 FROM pg_foreign_server WHERE srvname = 'llm_sidecar') AS need_server \gset
\if :need_server
  CREATE SERVER llm_sidecar FOREIGN DATA WRAPPER llmfdw OPTIONS (address :'sidecar_address');
\else
  ALTER SERVER llm_sidecar OPTIONS (SET address :'sidecar_address');
  -- servers made by earlier versions named the (now default) class
  SELECT EXISTS (SELECT 1 FROM pg_foreign_server WHERE srvname = 'llm_sidecar'
                 AND 'wrapper=llmfdw.fdw.tables.SidecarTables' = ANY (srvoptions)) AS old_wrapper \gset
  \if :old_wrapper
    ALTER SERVER llm_sidecar OPTIONS (DROP wrapper);
  \endif
\endif
REVOKE USAGE ON FOREIGN SERVER llm_sidecar FROM PUBLIC;

CREATE SCHEMA IF NOT EXISTS llm;
COMMENT ON SCHEMA llm IS 'Models served by the llmfdw sidecar, as foreign tables';

-- The tables come from their declarations (fdw/python/declarations.py),
-- with the sidecar's models as defaults.  A run again imports only the
-- tables that are missing: existing ones, and the views, grants and data that
-- depend on them, are left as they are.
SELECT coalesce(string_agg(quote_ident(c.relname), ', '), '') AS existing_tables
  FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
 WHERE n.nspname = 'llm' AND c.relkind = 'f' \gset
SELECT :'existing_tables' = '' AS import_all \gset
\if :import_all
  IMPORT FOREIGN SCHEMA llm FROM SERVER llm_sidecar INTO llm;
\else
  IMPORT FOREIGN SCHEMA llm EXCEPT (:existing_tables) FROM SERVER llm_sidecar INTO llm;
\endif

REVOKE ALL ON SCHEMA llm FROM PUBLIC;
REVOKE ALL ON ALL TABLES IN SCHEMA llm FROM PUBLIC;
GRANT USAGE ON SCHEMA llm TO llm_user;
GRANT SELECT ON ALL TABLES IN SCHEMA llm TO llm_user;

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

REVOKE EXECUTE ON ALL FUNCTIONS IN SCHEMA llm FROM PUBLIC;
GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA llm TO llm_user;
