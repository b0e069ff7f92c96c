/* fdw/llmfdw--0.2.0--0.3.0.sql */

-- complain if script is sourced in psql, rather than via ALTER EXTENSION
\echo Use "ALTER EXTENSION llmfdw UPDATE TO '0.3.0'" to load this file. \quit

-- 0.3.0: vectorizers.  llm.create_vectorizer declares once that a table's text
-- is to be chunked (llm.chunks: the embedding model's own tokenizer, so no
-- chunk is ever truncated) and embedded (llm.embeddings, one input = ANY(...)
-- request per batch); triggers queue every change in the changing
-- transaction; a drain (the extension's background worker, or CALL
-- llm.run_vectorizer() from pg_cron or an application) embeds the queue batch
-- by batch; llm.search fuses vector and full-text retrieval.
--
-- Rights.  Everything a vectorizer does runs with its owner's rights: the
-- objects it makes are the owner's, the drain refuses any other caller (the
-- worker switches to the owner first), and its catalog row is visible and
-- changeable by the owner alone (row-level security).  A role therefore
-- reaches nothing through a vectorizer that it could not reach itself, even by
-- editing its own catalog row: no SQL is kept there, only names and settings,
-- quoted whenever they are used.

-- ---------------------------------------------------------------------------
-- The catalog

CREATE TABLE llm.vectorizer_config (
  name            text PRIMARY KEY,
  owner           regrole NOT NULL DEFAULT to_regrole(current_user),
  source          regclass NOT NULL,
  key_columns     name[] NOT NULL,        -- the source's primary key
  columns         name[] NOT NULL,        -- what the text is made of (the UPDATE trigger watches them)
  format          text,                   -- '{title}: {body}', or NULL: the one column as it is
  model           text NOT NULL,
  dimensions      integer NOT NULL,
  chunking        text NOT NULL CHECK (chunking IN ('tokens', 'characters', 'none')),
  max_tokens      integer,                -- tokens mode; NULL: all the model reads
  overlap_tokens  integer,
  max_chars       integer,                -- characters mode
  overlap_chars   integer,
  separators      text[],
  ts_config       regconfig NOT NULL,
  chunk_table     regclass,               -- destination 'table'; NULL for 'column'
  queue_table     regclass NOT NULL,
  view            regclass NOT NULL,
  destination     text NOT NULL DEFAULT 'table' CHECK (destination IN ('table', 'column')),
  embedding_column name,                  -- destination 'column': the source's vector(N) column
  created_at      timestamptz NOT NULL DEFAULT now(),
  last_success    timestamptz,            -- the end of the last batch that embedded rows
  last_run_at     timestamptz,
  last_run_rows   integer,                -- rows the last batch embedded
  last_run_seconds double precision,      -- and how long it took
  rows_embedded   bigint NOT NULL DEFAULT 0,
  last_error      text,                   -- why the last batch could not run at all (sidecar down, ...)
  last_error_at   timestamptz
);
COMMENT ON TABLE llm.vectorizer_config IS
  'One row per vectorizer (llm.create_vectorizer); each role sees and changes only its own';
ALTER TABLE llm.vectorizer_config ENABLE ROW LEVEL SECURITY;
CREATE POLICY owner_only ON llm.vectorizer_config
  USING (owner = to_regrole(current_user)) WITH CHECK (owner = to_regrole(current_user));
REVOKE ALL ON llm.vectorizer_config FROM PUBLIC;
SELECT pg_catalog.pg_extension_config_dump('llm.vectorizer_config', '');

-- ---------------------------------------------------------------------------
-- SQL fragments built from a catalog row (identifiers always quoted)

-- The catalog row of a vectorizer the current role owns, or an error that says so.
CREATE FUNCTION llm._vectorizer(vectorizer text) RETURNS llm.vectorizer_config
LANGUAGE plpgsql STABLE AS $fn$
DECLARE
  v llm.vectorizer_config;
BEGIN
  SELECT * INTO v FROM llm.vectorizer_config c
   WHERE c.name = vectorizer AND c.owner = to_regrole(current_user);
  IF NOT FOUND THEN
    RAISE EXCEPTION 'no vectorizer named % that role % owns', coalesce(quote_literal(vectorizer), 'NULL'), current_user
      USING ERRCODE = 'undefined_object',
            HINT = 'SELECT name, source FROM llm.vectorizers; lists yours; a vectorizer runs only as its owner.';
  END IF;
  RETURN v;
END
$fn$;

-- "a.k1, a.k2": the key columns, qualified by `alias`.
CREATE FUNCTION llm._key_list(v llm.vectorizer_config, alias text) RETURNS text
LANGUAGE sql IMMUTABLE AS $fn$
  SELECT string_agg(format('%I.%I', alias, k), ', ' ORDER BY i) FROM unnest(v.key_columns) WITH ORDINALITY u(k, i)
$fn$;

-- "a.k1 = b.k1 AND ...".
CREATE FUNCTION llm._key_join(v llm.vectorizer_config, a text, b text) RETURNS text
LANGUAGE sql IMMUTABLE AS $fn$
  SELECT string_agg(format('%1$I.%3$I = %2$I.%3$I', a, b, k), ' AND ') FROM unnest(v.key_columns) k
$fn$;

-- jsonb_build_object('k1', a.k1, ...): a row's key as the drain passes it around.
CREATE FUNCTION llm._key_json(v llm.vectorizer_config, alias text) RETURNS text
LANGUAGE sql IMMUTABLE AS $fn$
  SELECT 'jsonb_build_object(' || string_agg(format('%L, %I.%I', k, alias, k), ', ') || ')' FROM unnest(v.key_columns) k
$fn$;

-- The text of a source row (alias `s`): the format with each {column} replaced by the
-- column's text ('' when NULL), or NULL when every column is NULL (nothing to embed).
CREATE FUNCTION llm._document(v llm.vectorizer_config) RETURNS text
LANGUAGE plpgsql IMMUTABLE AS $fn$
DECLARE
  pieces text[];
  names text[];
  expr text;
BEGIN
  IF v.format IS NULL THEN
    RETURN format('s.%I::text', v.columns[1]);
  END IF;
  pieces := regexp_split_to_array(v.format, '\{[^{}]+\}');
  SELECT array_agg(m[1] ORDER BY n) INTO names
    FROM regexp_matches(v.format, '\{([^{}]+)\}', 'g') WITH ORDINALITY r(m, n);
  expr := quote_literal(pieces[1]);
  FOR i IN 1 .. coalesce(cardinality(names), 0) LOOP
    expr := expr || format(', coalesce(s.%I::text, %L), %L', names[i], '', pieces[i + 1]);
  END LOOP;
  RETURN format('CASE WHEN num_nonnulls(%s) = 0 THEN NULL ELSE concat(%s) END',
                (SELECT string_agg(format('s.%I', c), ', ') FROM unnest(v.columns) c), expr);
END
$fn$;

-- The columns a format names, each checked against the source.
CREATE FUNCTION llm._format_columns(source regclass, fmt text) RETURNS name[]
LANGUAGE plpgsql STABLE AS $fn$
DECLARE
  names name[];
  c name;
BEGIN
  SELECT array_agg(DISTINCT m[1]) INTO names FROM regexp_matches(fmt, '\{([^{}]+)\}', 'g') m;
  IF names IS NULL THEN
    RAISE EXCEPTION 'format % names no column', quote_literal(fmt)
      USING ERRCODE = 'invalid_parameter_value', HINT = 'Name columns in braces: format => ''{title}: {body}''.';
  END IF;
  FOREACH c IN ARRAY names LOOP
    PERFORM llm._check_column(source, c);
  END LOOP;
  RETURN names;
END
$fn$;

CREATE FUNCTION llm._check_column(source regclass, col name) RETURNS void
LANGUAGE plpgsql STABLE AS $fn$
BEGIN
  IF NOT EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = source AND attname = col AND attnum > 0
                 AND NOT attisdropped) THEN
    RAISE EXCEPTION 'table % has no column %', source, quote_ident(col)
      USING ERRCODE = 'undefined_column';
  END IF;
END
$fn$;

-- A table's name with its schema, whatever the search_path (for SQL that is stored).
CREATE FUNCTION llm._qualified(rel regclass) RETURNS text
LANGUAGE sql STABLE AS $fn$
  SELECT format('%I.%I', c.relnamespace::regnamespace::name, c.relname) FROM pg_class c WHERE c.oid = rel
$fn$;

-- The schema the vector extension lives in: its type and operators are named through it, so
-- nothing depends on the caller's search_path (the worker's is pg_catalog only).
CREATE FUNCTION llm._vector_schema() RETURNS name
LANGUAGE sql STABLE AS $fn$
  SELECT n.nspname FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace WHERE e.extname = 'vector'
$fn$;

-- ---------------------------------------------------------------------------
-- The queue: a row trigger per vectorizer, its owner's (SECURITY DEFINER), so any role
-- that changes the source queues the change without any right on the queue

CREATE FUNCTION llm._drop_triggers(v llm.vectorizer_config) RETURNS void
LANGUAGE plpgsql AS $fn$
DECLARE
  f regprocedure;
BEGIN
  -- Dropping the trigger function drops its triggers with it (they depend on it): that needs only
  -- the function's ownership, where DROP TRIGGER needs the table's, which a role that made its
  -- vectorizer with the TRIGGER right alone does not have.
  FOR f IN SELECT DISTINCT tgfoid::regprocedure FROM pg_trigger WHERE tgrelid = v.source
            AND tgname IN (v.name || '_enqueue', v.name || '_enqueue_update', v.name || '_enqueue_truncate') LOOP
    EXECUTE format('DROP FUNCTION %s CASCADE', f);
  END LOOP;
END
$fn$;

CREATE FUNCTION llm._make_triggers(v llm.vectorizer_config) RETURNS void
LANGUAGE plpgsql AS $fn$
DECLARE
  fn text := format('%I.%I', (SELECT relnamespace::regnamespace::name FROM pg_class WHERE oid = v.source),
                    v.name || '_enqueue');
  keys text := array_to_string(ARRAY(SELECT quote_ident(k) FROM unnest(v.key_columns) k), ', ');
  watched text;
BEGIN
  PERFORM llm._drop_triggers(v);
  EXECUTE format($f$
    CREATE OR REPLACE FUNCTION %1$s() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $body$
    BEGIN
      IF TG_OP = 'TRUNCATE' THEN
        TRUNCATE %2$s;
        RETURN NULL;
      END IF;
      -- a key already queued keeps its entry (the drain reads the row's text when it runs);
      -- a failed one is retried at once, since its text changed
      IF TG_OP <> 'INSERT' THEN
        INSERT INTO %3$s (%4$s) VALUES (%5$s)
          ON CONFLICT (%4$s) DO UPDATE SET next_try = now(), attempts = 0, error = NULL;
      END IF;
      IF TG_OP = 'INSERT' OR (TG_OP = 'UPDATE' AND (%5$s) IS DISTINCT FROM (%6$s)) THEN
        INSERT INTO %3$s (%4$s) VALUES (%6$s)
          ON CONFLICT (%4$s) DO UPDATE SET next_try = now(), attempts = 0, error = NULL;
      END IF;
      RETURN NULL;
    END
    $body$ $f$, fn, concat_ws(', ', llm._qualified(v.chunk_table), llm._qualified(v.queue_table)),
    llm._qualified(v.queue_table), keys,
    array_to_string(ARRAY(SELECT 'OLD.' || quote_ident(k) FROM unnest(v.key_columns) k), ', '),
    array_to_string(ARRAY(SELECT 'NEW.' || quote_ident(k) FROM unnest(v.key_columns) k), ', '));
  EXECUTE format('REVOKE ALL ON FUNCTION %s() FROM PUBLIC', fn);
  -- an UPDATE that leaves the text and the key as they were queues nothing
  SELECT string_agg(format('OLD.%1$I IS DISTINCT FROM NEW.%1$I', c), ' OR ') INTO watched
    FROM (SELECT DISTINCT c FROM unnest(v.columns || v.key_columns) c) w;
  EXECUTE format('CREATE TRIGGER %I AFTER INSERT OR DELETE ON %s FOR EACH ROW EXECUTE FUNCTION %s()',
                 v.name || '_enqueue', v.source, fn);
  EXECUTE format('CREATE TRIGGER %I AFTER UPDATE ON %s FOR EACH ROW WHEN (%s) EXECUTE FUNCTION %s()',
                 v.name || '_enqueue_update', v.source, watched, fn);
  EXECUTE format('CREATE TRIGGER %I AFTER TRUNCATE ON %s FOR EACH STATEMENT EXECUTE FUNCTION %s()',
                 v.name || '_enqueue_truncate', v.source, fn);
END
$fn$;

-- Queue every row of the source (at creation, and when a change of settings re-embeds all);
-- the old chunks stay until each row's new ones replace them.
CREATE FUNCTION llm._queue_all(v llm.vectorizer_config) RETURNS bigint
LANGUAGE plpgsql AS $fn$
DECLARE
  n bigint;
  keys text := array_to_string(ARRAY(SELECT quote_ident(k) FROM unnest(v.key_columns) k), ', ');
BEGIN
  EXECUTE format('INSERT INTO %s (%s) SELECT %s FROM %s s ON CONFLICT (%2$s) DO UPDATE SET next_try = now(), '
                 'attempts = 0, error = NULL', v.queue_table, keys, llm._key_list(v, 's'), v.source);
  GET DIAGNOSTICS n = ROW_COUNT;
  RETURN n;
END
$fn$;

-- ---------------------------------------------------------------------------
-- Declaring, changing, dropping

CREATE FUNCTION llm.create_vectorizer(
  source regclass,
  column_name name DEFAULT NULL,
  name text DEFAULT NULL,                 -- default: the source table's name
  model text DEFAULT NULL,                -- default: the sidecar's first embedding model
  format text DEFAULT NULL,               -- several columns: '{title}: {body}'
  chunking text DEFAULT NULL,             -- tokens | characters | none; NULL: tokens (none for a column)
  max_tokens integer DEFAULT NULL,        -- tokens: per chunk; NULL: all the model reads
  overlap_tokens integer DEFAULT NULL,    -- tokens: shared by neighbours; NULL: max_tokens / 8
  max_chars integer DEFAULT 1000,         -- characters: per chunk
  overlap_chars integer DEFAULT 100,
  separators text[] DEFAULT NULL,         -- characters: where to cut, most preferred first
  text_search_config regconfig DEFAULT 'english',
  hnsw boolean DEFAULT true,              -- an HNSW index (cosine) on the chunks' embeddings
  destination text DEFAULT 'table',       -- table: a chunk table; column: a vector column of the source
  embedding_column name DEFAULT 'embedding')  -- destination column: its name (added if missing)
RETURNS regclass
LANGUAGE plpgsql VOLATILE AS $fn$
DECLARE
  v llm.vectorizer_config;
  nsp name;
  base name;
  key_defs text;
  vs name := llm._vector_schema();
  queued bigint;
  source_columns text;
  shadowed text;
BEGIN
  SELECT c.relnamespace::regnamespace::name, c.relname INTO nsp, base FROM pg_class c
   WHERE c.oid = source AND c.relkind IN ('r', 'p');
  IF nsp IS NULL THEN
    RAISE EXCEPTION 'llm.create_vectorizer: % is not a table', source USING ERRCODE = 'wrong_object_type';
  END IF;
  IF NOT has_table_privilege(source, 'SELECT') THEN
    RAISE EXCEPTION 'llm.create_vectorizer: permission denied for table %', source
      USING ERRCODE = 'insufficient_privilege',
            HINT = 'A vectorizer reads the table with your rights: you need SELECT on it (GRANT SELECT ON ... TO ...).';
  END IF;
  IF NOT has_table_privilege(source, 'TRIGGER') THEN
    RAISE EXCEPTION 'llm.create_vectorizer: permission denied to create triggers on table %', source
      USING ERRCODE = 'insufficient_privilege',
            HINT = 'Changes are queued by triggers on the table: its owner can GRANT TRIGGER ON ... TO you.';
  END IF;
  IF NOT has_schema_privilege(nsp, 'CREATE') THEN
    RAISE EXCEPTION 'llm.create_vectorizer: permission denied to create the chunk table in schema %', quote_ident(nsp)
      USING ERRCODE = 'insufficient_privilege',
            HINT = 'The chunks, queue and view go in the table''s schema: you need CREATE on it.';
  END IF;
  v.source := source;
  v.name := coalesce(create_vectorizer.name, base);
  SELECT array_agg(a.attname ORDER BY k.i),
         string_agg(format('%I %s NOT NULL', a.attname, format_type(a.atttypid, a.atttypmod)), ', ' ORDER BY k.i)
    INTO v.key_columns, key_defs
    FROM pg_index x, unnest(x.indkey) WITH ORDINALITY k(attnum, i), pg_attribute a
   WHERE x.indrelid = source AND x.indisprimary AND a.attrelid = source AND a.attnum = k.attnum;
  IF v.key_columns IS NULL THEN
    RAISE EXCEPTION 'llm.create_vectorizer: table % has no primary key', source
      USING ERRCODE = 'invalid_table_definition',
            HINT = format('Chunks point back at their row by its key: ALTER TABLE %s ADD PRIMARY KEY (...);', source);
  END IF;
  IF format IS NOT NULL THEN
    v.format := format;
    v.columns := llm._format_columns(source, format);
  ELSIF column_name IS NOT NULL THEN
    PERFORM llm._check_column(source, column_name);
    v.columns := ARRAY[column_name];
  ELSE
    RAISE EXCEPTION 'llm.create_vectorizer: name the text to embed'
      USING ERRCODE = 'invalid_parameter_value',
            HINT = 'column_name => ''body'', or format => ''{title}: {body}'' for several columns.';
  END IF;
  PERFORM llm._set_model(v, model);   -- raises when it is not an embedding model
  SELECT m.name, m.dimensions INTO v.model, v.dimensions FROM llm.models m
   WHERE m.task = 'embed' AND (create_vectorizer.model IS NULL OR m.name = create_vectorizer.model) LIMIT 1;
  v := llm._set_destination(v, destination, embedding_column, chunking);
  v := llm._set_chunking(v, coalesce(chunking, CASE v.destination WHEN 'column' THEN 'none' ELSE 'tokens' END),
                         max_tokens, overlap_tokens, max_chars, overlap_chars, separators);
  v.ts_config := text_search_config;
  v.owner := to_regrole(current_user);
  v.created_at := now();
  v.rows_embedded := 0;

  EXECUTE format('CREATE TABLE %I.%I (%s, queued_at timestamptz NOT NULL DEFAULT now(), '
                 'attempts integer NOT NULL DEFAULT 0, next_try timestamptz NOT NULL DEFAULT now(), error text, '
                 'PRIMARY KEY (%s))', nsp, v.name || '_queue', key_defs,
                 array_to_string(ARRAY(SELECT quote_ident(k) FROM unnest(v.key_columns) k), ', '));
  v.queue_table := format('%I.%I', nsp, v.name || '_queue')::regclass;
  EXECUTE format('CREATE INDEX ON %s (queued_at)', v.queue_table);
  IF v.destination = 'column' THEN
    v.view := llm._make_column_destination(v, hnsw);
  ELSE
    EXECUTE format('CREATE TABLE %I.%I (%s, chunk_seq integer NOT NULL, chunk text NOT NULL, '
                   'embedding %I.vector(%s) NOT NULL, '
                   'chunk_tsv tsvector GENERATED ALWAYS AS (to_tsvector(%L::regconfig, chunk)) STORED, '
                   'PRIMARY KEY (%s, chunk_seq))',
                   nsp, v.name || '_chunks', key_defs, vs, v.dimensions, v.ts_config::text,
                   array_to_string(ARRAY(SELECT quote_ident(k) FROM unnest(v.key_columns) k), ', '));
    v.chunk_table := format('%I.%I', nsp, v.name || '_chunks')::regclass;
    EXECUTE format('COMMENT ON TABLE %s IS %L', v.chunk_table,
                   format('Chunks and embeddings of %s (vectorizer %s): written by the drain', source, v.name));
    EXECUTE format('CREATE INDEX ON %s USING gin (chunk_tsv)', v.chunk_table);
    IF hnsw THEN
      EXECUTE format('CREATE INDEX ON %s USING hnsw (embedding %I.vector_cosine_ops)', v.chunk_table, vs);
    END IF;
    -- every column of the source, then the chunk's; a source column of the same name as one of
    -- those (an old `embedding` column, say) is left out of the view, with a notice
    SELECT string_agg(format('s.%I', a.attname), ', ' ORDER BY a.attnum)
             FILTER (WHERE a.attname NOT IN ('chunk_seq', 'chunk', 'embedding')),
           string_agg(a.attname, ', ') FILTER (WHERE a.attname IN ('chunk_seq', 'chunk', 'embedding'))
      INTO source_columns, shadowed
      FROM pg_attribute a WHERE a.attrelid = source AND a.attnum > 0 AND NOT a.attisdropped;
    IF shadowed IS NOT NULL THEN
      RAISE NOTICE 'view %: column % of % is left out (the chunk''s column of that name is there)',
                   v.name || '_embeddings', shadowed, source;
    END IF;
    EXECUTE format('CREATE VIEW %I.%I AS SELECT %s, c.chunk_seq, c.chunk, c.embedding FROM %s s JOIN %s c ON %s',
                   nsp, v.name || '_embeddings', source_columns, source, v.chunk_table, llm._key_join(v, 's', 'c'));
    v.view := format('%I.%I', nsp, v.name || '_embeddings')::regclass;
  END IF;
  INSERT INTO llm.vectorizer_config SELECT v.*;
  PERFORM llm._make_triggers(v);
  queued := llm._queue_all(v);
  RAISE NOTICE 'vectorizer %: % rows queued; the drain embeds them (the background worker, or CALL llm.run_vectorizer())',
               v.name, queued;
  RETURN v.view;
EXCEPTION WHEN unique_violation THEN
  RAISE EXCEPTION 'llm.create_vectorizer: a vectorizer named % exists', quote_literal(v.name)
    USING ERRCODE = 'duplicate_object', HINT = 'Pick another name => ..., or llm.alter_vectorizer to change it.';
END
$fn$;
COMMENT ON FUNCTION llm.create_vectorizer IS
  'Keep embeddings of a table''s text current: chunk table, queue, triggers, view (returned); rows are queued now';

-- ---------------------------------------------------------------------------
-- Destination 'column': one vector per row, in a vector(N) column of the source itself (no chunk
-- table; chunking 'none').  The drain writes it with an UPDATE of that column alone, as the
-- owner: the vectorizer's own UPDATE trigger watches the text and key columns only, so it does
-- not queue the row again; the table's other UPDATE triggers fire as on any UPDATE (give them
-- `UPDATE OF body` or a WHEN clause to ignore it).

CREATE FUNCTION llm._set_destination(v llm.vectorizer_config, destination text, embedding_column name,
                                     chunking text)
RETURNS llm.vectorizer_config LANGUAGE plpgsql AS $fn$
BEGIN
  IF destination IS NULL OR destination NOT IN ('table', 'column') THEN
    RAISE EXCEPTION 'llm.create_vectorizer: destination must be table or column, got %',
                    coalesce(quote_literal(destination), 'NULL')
      USING ERRCODE = 'invalid_parameter_value',
            HINT = 'table: a chunk table of its own; column: one vector per row in a column of the source (chunking none).';
  END IF;
  v.destination := destination;
  IF destination = 'column' THEN
    IF embedding_column IS NULL THEN
      RAISE EXCEPTION 'llm.create_vectorizer: destination column needs an embedding_column'
        USING ERRCODE = 'invalid_parameter_value', HINT = 'embedding_column => ''embedding'' (added if missing).';
    END IF;
    v.embedding_column := embedding_column;
    v.chunking := coalesce(chunking, 'none');
    PERFORM llm._check_column_destination(v);
  END IF;
  RETURN v;
END
$fn$;

-- A column vectorizer stores one vector per row: no chunking, and the vector column is none of the
-- columns the text is made of or the key.
CREATE FUNCTION llm._check_column_destination(v llm.vectorizer_config) RETURNS void
LANGUAGE plpgsql AS $fn$
BEGIN
  IF v.destination <> 'column' THEN
    RETURN;
  END IF;
  IF v.chunking <> 'none' THEN
    RAISE EXCEPTION 'vectorizer %: destination column holds one vector per row, so chunking must be none, got %',
                    quote_literal(v.name), quote_literal(v.chunking)
      USING ERRCODE = 'invalid_parameter_value',
            HINT = 'Chunks need a table of their own: make a vectorizer with destination => ''table'' (the default).';
  END IF;
  IF v.embedding_column = ANY(v.columns || v.key_columns) THEN
    RAISE EXCEPTION 'vectorizer %: embedding_column % is a column of the text or the key', quote_literal(v.name),
                    quote_ident(v.embedding_column)
      USING ERRCODE = 'invalid_parameter_value', HINT = 'Name another column: embedding_column => ''embedding''.';
  END IF;
END
$fn$;

-- Whether the current role owns the table (as ALTER TABLE and CREATE INDEX require).
CREATE FUNCTION llm._owns(rel regclass) RETURNS boolean
LANGUAGE sql STABLE AS $fn$
  SELECT pg_has_role(c.relowner, 'USAGE') FROM pg_class c WHERE c.oid = rel
$fn$;

-- The source's vector(N) column (added when missing; one of another type or size is refused), the
-- rights to write it, its HNSW index, the full-text index of llm.search, and the view; returns it.
CREATE FUNCTION llm._make_column_destination(v llm.vectorizer_config, hnsw boolean) RETURNS regclass
LANGUAGE plpgsql AS $fn$
DECLARE
  vs name := llm._vector_schema();
  col pg_attribute;
  wanted text := format('%I.vector(%s)', vs, v.dimensions);
BEGIN
  SELECT * INTO col FROM pg_attribute a
   WHERE a.attrelid = v.source AND a.attname = v.embedding_column AND a.attnum > 0 AND NOT a.attisdropped;
  IF NOT FOUND THEN
    IF NOT llm._owns(v.source) THEN
      RAISE EXCEPTION 'llm.create_vectorizer: table % has no column % and only its owner can add it', v.source,
                      quote_ident(v.embedding_column)
        USING ERRCODE = 'insufficient_privilege',
              HINT = format('Ask its owner: ALTER TABLE %s ADD COLUMN %I %s; GRANT UPDATE (%2$I) ON %1$s TO %I;',
                            v.source, v.embedding_column, wanted, current_user);
    END IF;
    EXECUTE format('ALTER TABLE %s ADD COLUMN %I %s', v.source, v.embedding_column, wanted);
  ELSIF col.atttypid <> format('%I.vector', vs)::regtype OR col.atttypmod <> v.dimensions THEN
    RAISE EXCEPTION 'llm.create_vectorizer: column % of % is %, not %', quote_ident(v.embedding_column), v.source,
                    format_type(col.atttypid, col.atttypmod), wanted
      USING ERRCODE = 'datatype_mismatch',
            HINT = format('Model %s makes %s-dimensional vectors: name another column (embedding_column => ...; '
                          'it is added), or change this one''s type.', v.model, v.dimensions);
  END IF;
  IF NOT has_column_privilege(v.source, v.embedding_column, 'UPDATE') THEN
    RAISE EXCEPTION 'llm.create_vectorizer: permission denied to update column % of table %',
                    quote_ident(v.embedding_column), v.source
      USING ERRCODE = 'insufficient_privilege',
            HINT = format('The drain writes each row''s vector there with your rights: its owner can '
                          'GRANT UPDATE (%I) ON %s TO %I;', v.embedding_column, v.source, current_user);
  END IF;
  PERFORM llm._make_column_indexes(v, hnsw);
  RETURN llm._make_column_view(v);
END
$fn$;

-- The HNSW index of the vector column (unless one is there), and, for the keyword side of
-- llm.search, a GIN index on the text's tsvector when the text is one column whose text form is
-- immutable (a format's concat() is not: the search then computes the tsvector row by row).
CREATE FUNCTION llm._make_column_indexes(v llm.vectorizer_config, hnsw boolean) RETURNS void
LANGUAGE plpgsql AS $fn$
DECLARE
  vs name := llm._vector_schema();
BEGIN
  IF hnsw AND NOT EXISTS (SELECT 1 FROM pg_index x JOIN pg_class i ON i.oid = x.indexrelid
                            JOIN pg_am am ON am.oid = i.relam JOIN pg_attribute a ON a.attrelid = x.indrelid
                           WHERE x.indrelid = v.source AND am.amname = 'hnsw' AND a.attname = v.embedding_column
                             AND a.attnum = ANY(x.indkey)) THEN
    IF NOT llm._owns(v.source) THEN
      RAISE EXCEPTION 'llm.create_vectorizer: only the owner of table % can index it', v.source
        USING ERRCODE = 'insufficient_privilege',
              HINT = format('hnsw => false, or ask its owner: CREATE INDEX ON %s USING hnsw (%I %I.vector_cosine_ops);',
                            v.source, v.embedding_column, vs);
    END IF;
    EXECUTE format('CREATE INDEX ON %s USING hnsw (%I %I.vector_cosine_ops)', v.source, v.embedding_column, vs);
  END IF;
  IF v.format IS NULL AND llm._owns(v.source) THEN
    BEGIN
      EXECUTE format('CREATE INDEX %I ON %s USING gin (to_tsvector(%L::regconfig, %I::text))',
                     v.name || '_tsv', v.source, v.ts_config::text, v.columns[1]);
    EXCEPTION WHEN invalid_object_definition THEN   -- the column's text form is not immutable
      RAISE NOTICE 'vectorizer %: no full-text index on %', v.name, quote_ident(v.columns[1])
        USING DETAIL = SQLERRM;
    END;
  END IF;
END
$fn$;

-- Drop the full-text index _make_column_indexes made (llm.search's alone), if it is there.
CREATE FUNCTION llm._drop_column_tsv_index(v llm.vectorizer_config) RETURNS void
LANGUAGE plpgsql AS $fn$
DECLARE
  idx regclass;
BEGIN
  SELECT x.indexrelid INTO idx FROM pg_index x JOIN pg_class i ON i.oid = x.indexrelid
   WHERE x.indrelid = v.source AND i.relname = v.name || '_tsv';
  IF idx IS NOT NULL THEN
    EXECUTE format('DROP INDEX %s', idx);
  END IF;
END
$fn$;

-- The view <name>_embeddings over the source: its columns (those the view already has, when it
-- is replaced after a change of text), chunk_seq 0, the text as chunk, and the vector as
-- embedding, for the rows that have one.
CREATE FUNCTION llm._make_column_view(v llm.vectorizer_config) RETURNS regclass
LANGUAGE plpgsql AS $fn$
DECLARE
  nsp name := (SELECT relnamespace::regnamespace::name FROM pg_class WHERE oid = v.source);
  source_columns text;
  shadowed text;
BEGIN
  IF v.view IS NULL THEN
    SELECT string_agg(format('s.%I', a.attname), ', ' ORDER BY a.attnum)
             FILTER (WHERE a.attname NOT IN ('chunk_seq', 'chunk', 'embedding')),
           string_agg(a.attname, ', ') FILTER (WHERE a.attname IN ('chunk_seq', 'chunk'))
      INTO source_columns, shadowed
      FROM pg_attribute a WHERE a.attrelid = v.source AND a.attnum > 0 AND NOT a.attisdropped;
    IF shadowed IS NOT NULL THEN
      RAISE NOTICE 'view %: column % of % is left out (the view''s own column of that name is there)',
                   v.name || '_embeddings', shadowed, v.source;
    END IF;
  ELSE
    SELECT string_agg(format('s.%I', a.attname), ', ' ORDER BY a.attnum) INTO source_columns
      FROM pg_attribute a WHERE a.attrelid = v.view AND a.attnum > 0
       AND a.attname NOT IN ('chunk_seq', 'chunk', 'embedding');
  END IF;
  EXECUTE format('CREATE OR REPLACE VIEW %I.%I AS SELECT %s, 0 AS chunk_seq, %s AS chunk, s.%I AS embedding '
                 'FROM %s s WHERE s.%5$I IS NOT NULL',
                 nsp, v.name || '_embeddings', source_columns, llm._document(v), v.embedding_column, v.source);
  RETURN format('%I.%I', nsp, v.name || '_embeddings')::regclass;
END
$fn$;

-- Write the vectors of the rows of `keys` into the source's column, in the batch's transaction.
-- The rows are locked as they are read, skipping those a writer holds: that writer's change
-- queues the row again, and waiting for it while this batch holds the row's queue entry, which
-- the writer's trigger waits for, would deadlock.  Such a row keeps its entry for a next batch.
-- A row whose text is NULL or empty gets a NULL vector; a row that is gone needs nothing.
CREATE FUNCTION llm._embed_into_column(v llm.vectorizer_config, keys jsonb[]) RETURNS void
LANGUAGE plpgsql VOLATILE AS $fn$
DECLARE
  locked jsonb[];
  doc_keys jsonb[];
  docs text[];
  empty_keys jsonb[];
  vs name := llm._vector_schema();
  row_of text := format('CROSS JOIN LATERAL jsonb_populate_record(NULL::%s, u.j) r', v.source);
BEGIN
  EXECUTE format('SELECT array_agg(k.j), array_agg(k.j) FILTER (WHERE k.doc <> %5$L), '
                 'array_agg(k.doc) FILTER (WHERE k.doc <> %5$L), '
                 'array_agg(k.j) FILTER (WHERE coalesce(k.doc, %5$L) = %5$L) '
                 'FROM (SELECT u.j, %1$s AS doc FROM unnest($1) u(j) %2$s JOIN %3$s s ON %4$s '
                 'FOR NO KEY UPDATE OF s SKIP LOCKED) k',
                 llm._document(v), row_of, v.source, llm._key_join(v, 's', 'r'), '')
     INTO locked, doc_keys, docs, empty_keys USING keys;
  IF docs IS NOT NULL THEN
    EXECUTE format('WITH e AS MATERIALIZED (SELECT input, embedding FROM llm.embeddings '
                   'WHERE input = ANY($2) AND model = $3) '
                   'UPDATE %1$s s SET %2$I = e.embedding::%3$I.vector FROM unnest($1, $2) u(j, doc) %4$s '
                   'JOIN e ON e.input = u.doc WHERE %5$s',
                   v.source, v.embedding_column, vs, row_of, llm._key_join(v, 's', 'r'))
      USING doc_keys, docs, v.model;
  END IF;
  IF empty_keys IS NOT NULL THEN
    EXECUTE format('UPDATE %1$s s SET %2$I = NULL FROM unnest($1) u(j) %3$s WHERE %4$s AND s.%2$I IS NOT NULL',
                   v.source, v.embedding_column, row_of, llm._key_join(v, 's', 'r'))
      USING empty_keys;
  END IF;
  -- done: the rows written, and those that are gone
  EXECUTE format('DELETE FROM %1$s q USING unnest($1) u(j) %2$s WHERE %3$s AND (u.j = ANY($2) OR NOT EXISTS '
                 '(SELECT FROM %4$s s WHERE %5$s))', v.queue_table, row_of, llm._key_join(v, 'q', 'r'), v.source,
                 llm._key_join(v, 's', 'r'))
    USING keys, coalesce(locked, '{}');
  -- skipped (a writer holds the row): due again in a second, not at once (a drain loop would spin)
  EXECUTE format('UPDATE %1$s q SET next_try = now() + interval ''1 second'' FROM unnest($1) u(j) %2$s WHERE %3$s',
                 v.queue_table, row_of, llm._key_join(v, 'q', 'r'))
    USING keys;
END
$fn$;

-- The model (default: the first embedding model), checked against llm.models.
CREATE FUNCTION llm._set_model(v llm.vectorizer_config, model text) RETURNS void
LANGUAGE plpgsql AS $fn$
BEGIN
  IF NOT EXISTS (SELECT 1 FROM llm.models m WHERE m.task = 'embed' AND (model IS NULL OR m.name = model)) THEN
    RAISE EXCEPTION 'llm.create_vectorizer: % is not an embedding model the sidecar serves',
                    coalesce(quote_literal(model), 'the default model')
      USING ERRCODE = 'undefined_object', HINT = 'SELECT name, task, dimensions FROM llm.models;';
  END IF;
END
$fn$;

-- The llm.chunks query that chunks the texts $2 (text[]) as vectorizer v says: $3 the model, then
-- $4 overlap_tokens, $5 max_tokens, $6 max_chars, $7 overlap_chars, $8 separators.
CREATE FUNCTION llm._chunks_query(v llm.vectorizer_config) RETURNS text
LANGUAGE sql IMMUTABLE AS $fn$
  SELECT 'SELECT input, chunk_seq, chunk FROM llm.chunks WHERE input = ANY($2) AND model = $3'
    || CASE WHEN v.chunking = 'tokens'
            THEN ' AND overlap_tokens = $4' || CASE WHEN v.max_tokens IS NULL THEN '' ELSE ' AND max_tokens = $5' END
            ELSE ' AND mode = ''characters'' AND max_chars = $6 AND overlap_chars = $7'
                 || CASE WHEN v.separators IS NULL THEN '' ELSE ' AND separators = $8' END
       END
$fn$;

CREATE FUNCTION llm._set_chunking(v llm.vectorizer_config, chunking text, max_tokens integer, overlap_tokens integer,
                                  max_chars integer, overlap_chars integer, separators text[])
RETURNS llm.vectorizer_config LANGUAGE plpgsql AS $fn$
BEGIN
  IF chunking IS NULL OR chunking NOT IN ('tokens', 'characters', 'none') THEN
    RAISE EXCEPTION 'chunking must be tokens, characters or none, got %', coalesce(quote_literal(chunking), 'NULL')
      USING ERRCODE = 'invalid_parameter_value',
            HINT = 'tokens: by the model''s tokenizer (no chunk is truncated); characters: at separators; none: one chunk per row.';
  END IF;
  v.chunking := chunking;
  v.max_tokens := max_tokens;
  v.overlap_tokens := coalesce(overlap_tokens, coalesce(max_tokens, 256) / 8);
  v.max_chars := max_chars;
  v.overlap_chars := overlap_chars;
  v.separators := separators;
  IF v.chunking <> 'none' THEN
    -- The sidecar, where the settings' ranges are defined, checks them now: a bad setting is an
    -- error here, not a failure of every row at the next drain.
    EXECUTE 'SELECT count(*) FROM (' || llm._chunks_query(v) || ') probe'
      USING NULL::jsonb[], ARRAY['a probe of the chunking settings'], v.model, v.overlap_tokens, v.max_tokens,
            v.max_chars, v.overlap_chars, v.separators;
  END IF;
  RETURN v;
END
$fn$;

CREATE FUNCTION llm.alter_vectorizer(
  name text,
  model text DEFAULT NULL,
  column_name name DEFAULT NULL,
  format text DEFAULT NULL,
  chunking text DEFAULT NULL,
  max_tokens integer DEFAULT NULL,
  overlap_tokens integer DEFAULT NULL,
  max_chars integer DEFAULT NULL,
  overlap_chars integer DEFAULT NULL,
  separators text[] DEFAULT NULL)
RETURNS bigint
LANGUAGE plpgsql VOLATILE AS $fn$
DECLARE
  v llm.vectorizer_config := llm._vectorizer(name);
  dims integer;
BEGIN
  -- A batch under way (the worker's) holds its queue rows and then updates the catalog row: wait
  -- for it before touching either, and keep new batches out until this commits (no deadlock).
  EXECUTE format('LOCK TABLE %s IN EXCLUSIVE MODE', v.queue_table);
  IF model IS NOT NULL THEN
    PERFORM llm._set_model(v, model);
    SELECT m.dimensions INTO dims FROM llm.models m WHERE m.name = model;
    IF dims <> v.dimensions THEN
      RAISE EXCEPTION 'model % makes %-dimensional vectors; vectorizer % stores %', quote_literal(model), dims,
                      quote_literal(v.name), v.dimensions
        USING ERRCODE = 'feature_not_supported',
              HINT = 'Make a second vectorizer with that model (another name), then drop this one.';
    END IF;
    v.model := model;
  END IF;
  IF format IS NOT NULL THEN
    v.format := format;
    v.columns := llm._format_columns(v.source, format);
  ELSIF column_name IS NOT NULL THEN
    PERFORM llm._check_column(v.source, column_name);
    v.format := NULL;
    v.columns := ARRAY[column_name];
  END IF;
  IF chunking IS NOT NULL OR max_tokens IS NOT NULL OR overlap_tokens IS NOT NULL OR max_chars IS NOT NULL
     OR overlap_chars IS NOT NULL OR separators IS NOT NULL THEN
    v := llm._set_chunking(v, coalesce(chunking, v.chunking), coalesce(max_tokens, v.max_tokens),
                           coalesce(overlap_tokens, CASE WHEN max_tokens IS NULL THEN v.overlap_tokens END),
                           coalesce(max_chars, v.max_chars), coalesce(overlap_chars, v.overlap_chars),
                           coalesce(separators, v.separators));
  END IF;
  PERFORM llm._check_column_destination(v);
  IF v.destination = 'column' AND (format IS NOT NULL OR column_name IS NOT NULL) THEN
    PERFORM llm._make_column_view(v);           -- its chunk is the text: the new one
    PERFORM llm._drop_column_tsv_index(v);
    PERFORM llm._make_column_indexes(v, false);
  END IF;
  UPDATE llm.vectorizer_config c SET model = v.model, format = v.format, columns = v.columns, chunking = v.chunking,
         max_tokens = v.max_tokens, overlap_tokens = v.overlap_tokens, max_chars = v.max_chars,
         overlap_chars = v.overlap_chars, separators = v.separators
   WHERE c.name = v.name;
  PERFORM llm._make_triggers(v);
  RETURN llm._queue_all(v);
END
$fn$;
COMMENT ON FUNCTION llm.alter_vectorizer IS
  'Change a vectorizer''s model, text or chunking: every row is queued again; old chunks stay until replaced';

CREATE FUNCTION llm.drop_vectorizer(name text, drop_data boolean DEFAULT false) RETURNS void
LANGUAGE plpgsql VOLATILE AS $fn$
DECLARE
  v llm.vectorizer_config := llm._vectorizer(name);
  nsp name := (SELECT relnamespace::regnamespace::name FROM pg_class WHERE oid = v.source);
BEGIN
  IF drop_data AND v.destination = 'column' AND NOT llm._owns(v.source) THEN
    RAISE EXCEPTION 'llm.drop_vectorizer: only the owner of table % can drop its column %', v.source,
                    quote_ident(v.embedding_column)
      USING ERRCODE = 'insufficient_privilege',
            HINT = 'llm.drop_vectorizer(name) without drop_data keeps the column (and the view) and stops the rest.';
  END IF;
  EXECUTE format('LOCK TABLE %s IN EXCLUSIVE MODE', v.queue_table);   -- as alter_vectorizer
  PERFORM llm._drop_triggers(v);
  EXECUTE format('DROP FUNCTION IF EXISTS %I.%I()', nsp, v.name || '_enqueue');
  EXECUTE format('DROP TABLE %s', v.queue_table);
  IF v.destination = 'column' THEN
    PERFORM llm._drop_column_tsv_index(v);     -- llm.search's alone
  END IF;
  IF drop_data THEN
    EXECUTE format('DROP VIEW IF EXISTS %s', v.view);
    IF v.destination = 'column' THEN
      EXECUTE format('ALTER TABLE %s DROP COLUMN IF EXISTS %I', v.source, v.embedding_column);
    ELSE
      EXECUTE format('DROP TABLE IF EXISTS %s', v.chunk_table);
    END IF;
  END IF;
  DELETE FROM llm.vectorizer_config c WHERE c.name = v.name;
END
$fn$;
COMMENT ON FUNCTION llm.drop_vectorizer IS
  'Stop a vectorizer (triggers, queue); its chunk table (or vector column) and view stay unless drop_data => true';

-- ---------------------------------------------------------------------------
-- The drain

-- One batch of one vectorizer, in the caller's transaction: claim up to `batch` due queue
-- entries (SKIP LOCKED: drains running at once take different rows), embed them, and
-- return how many entries it took (embedded or failed), or -1 when the vectorizer cannot run
-- now (the sidecar is down, say: last_error says why, and its rows stay queued as they were).
-- Run by the owner only.
CREATE FUNCTION llm.run_vectorizer_batch(vectorizer text, batch integer DEFAULT 512) RETURNS integer
LANGUAGE plpgsql VOLATILE AS $fn$
DECLARE
  v llm.vectorizer_config := llm._vectorizer(vectorizer);
  keys jsonb[];
  started timestamptz := clock_timestamp();
  done integer;
  state text;
  message text;
BEGIN
  IF batch IS NULL OR batch < 1 THEN
    RAISE EXCEPTION 'batch must be at least 1, got %', coalesce(batch::text, 'NULL')
      USING ERRCODE = 'invalid_parameter_value';
  END IF;
  EXECUTE format('SELECT array_agg(k ORDER BY queued_at) FROM (SELECT %s AS k, q.queued_at FROM %s q '
                 'WHERE q.next_try <= now() ORDER BY q.queued_at LIMIT $1 FOR UPDATE SKIP LOCKED) c',
                 llm._key_json(v, 'q'), v.queue_table)
     INTO keys USING batch;
  IF keys IS NULL THEN
    RETURN 0;
  END IF;
  BEGIN
    done := llm._vectorize(v, keys);
  EXCEPTION WHEN OTHERS THEN
    -- the vectorizer cannot run now (llm._vectorize says which errors): its rows stay queued as
    -- they were, the error is kept for llm.vectorizers, and 0 tells a drain loop to wait
    GET STACKED DIAGNOSTICS state = RETURNED_SQLSTATE, message = MESSAGE_TEXT;
    UPDATE llm.vectorizer_config c SET last_error = format('%s (SQLSTATE %s)', message, state),
           last_error_at = clock_timestamp()
     WHERE c.name = v.name;
    RAISE WARNING 'vectorizer %: %', v.name, message
      USING HINT = 'Its rows stay queued; the next drain tries again.';
    RETURN -1;
  END;
  UPDATE llm.vectorizer_config c
     SET last_run_at = now(), last_run_rows = done,
         last_run_seconds = extract(epoch FROM clock_timestamp() - started),
         last_success = CASE WHEN done > 0 THEN clock_timestamp() ELSE c.last_success END,
         last_error = CASE WHEN done > 0 THEN NULL ELSE c.last_error END,
         rows_embedded = c.rows_embedded + done
   WHERE c.name = v.name;
  RETURN cardinality(keys);
END
$fn$;
COMMENT ON FUNCTION llm.run_vectorizer_batch IS
  'Embed one batch of a vectorizer''s queue in the current transaction; returns the entries taken';

-- Embed the rows of `keys`; a batch that fails is split in halves until the failing rows are
-- alone: each keeps its queue entry with the error, its attempts and a next try (exponential
-- backoff, at most an hour), and the rest are embedded.  An error that is the vectorizer's and
-- not a row's fails the whole batch instead (run_vectorizer_batch keeps it in last_error): the
-- sidecar cannot serve now (unreachable, loading, draining, at its limits, too slow), the model
-- is not served or cannot embed, a table is missing or not the owner's to use.  Those rows did
-- nothing wrong, and the next drain takes them again.
CREATE FUNCTION llm._vectorize(v llm.vectorizer_config, keys jsonb[]) RETURNS integer
LANGUAGE plpgsql VOLATILE AS $fn$
DECLARE
  n integer := cardinality(keys);
  state text;
  message text;
BEGIN
  PERFORM llm._embed_rows(v, keys);
  RETURN n;
EXCEPTION WHEN OTHERS THEN
  GET STACKED DIAGNOSTICS state = RETURNED_SQLSTATE, message = MESSAGE_TEXT;
  IF state IN ('HV00N', '57P03', '53300', '57014', '40001', '40P01', '42704', '55000', '42P01', '42501') THEN
    RAISE;
  END IF;
  IF n = 1 THEN
    EXECUTE format('UPDATE %s q SET attempts = q.attempts + 1, error = $2, '
                   'next_try = now() + least(interval ''1 hour'', interval ''10 seconds'' * 2 ^ q.attempts) '
                   'FROM jsonb_populate_record(NULL::%s, $1) r WHERE %s', v.queue_table, v.source,
                   llm._key_join(v, 'q', 'r'))
      USING keys[1], format('%s (SQLSTATE %s)', message, state);
    RETURN 0;
  END IF;
  RETURN llm._vectorize(v, keys[1:n / 2]) + llm._vectorize(v, keys[n / 2 + 1:n]);
END
$fn$;

-- Read the rows' current text, chunk it (one llm.chunks query), embed every chunk (one
-- llm.embeddings query: input = ANY, the bulk path), replace the rows' chunks, and remove
-- their queue entries.  A row that is gone, or has no text, ends with no chunks.
CREATE FUNCTION llm._embed_rows(v llm.vectorizer_config, keys jsonb[]) RETURNS void
LANGUAGE plpgsql VOLATILE AS $fn$
DECLARE
  doc_keys jsonb[];
  docs text[];
  piece_keys jsonb[];
  seqs integer[];
  pieces text[];
  q text;
  vs name := llm._vector_schema();
BEGIN
  IF v.destination = 'column' THEN
    PERFORM llm._embed_into_column(v, keys);
    RETURN;
  END IF;
  EXECUTE format('SELECT array_agg(k.j), array_agg(k.doc) FROM (SELECT u.j, %s AS doc FROM unnest($1) u(j) '
                 'CROSS JOIN LATERAL jsonb_populate_record(NULL::%s, u.j) r JOIN %2$s s ON %s) k '
                 'WHERE k.doc IS NOT NULL', llm._document(v), v.source, llm._key_join(v, 's', 'r'))
     INTO doc_keys, docs USING keys;
  IF v.chunking = 'none' THEN
    piece_keys := doc_keys;
    pieces := docs;
    seqs := array_fill(0, ARRAY[coalesce(cardinality(docs), 0)]);
  ELSIF docs IS NOT NULL THEN
    q := 'SELECT array_agg(d.j ORDER BY d.j, c.chunk_seq), array_agg(c.chunk_seq ORDER BY d.j, c.chunk_seq), '
         'array_agg(c.chunk ORDER BY d.j, c.chunk_seq) '
         'FROM unnest($1, $2) d(j, doc) JOIN (' || llm._chunks_query(v) || ') c ON c.input = d.doc';
    EXECUTE q INTO piece_keys, seqs, pieces
      USING doc_keys, docs, v.model, v.overlap_tokens, v.max_tokens, v.max_chars, v.overlap_chars, v.separators;
  END IF;
  EXECUTE format('DELETE FROM %s c USING unnest($1) u(j) CROSS JOIN LATERAL jsonb_populate_record(NULL::%s, u.j) r '
                 'WHERE %s', v.chunk_table, v.source, llm._key_join(v, 'c', 'r')) USING keys;
  IF pieces IS NOT NULL THEN
    EXECUTE format('WITH e AS MATERIALIZED (SELECT input, embedding FROM llm.embeddings '
                   'WHERE input = ANY($3) AND model = $4) '
                   'INSERT INTO %s (%s, chunk_seq, chunk, embedding) '
                   'SELECT %s, p.seq, p.chunk, e.embedding::%I.vector FROM unnest($1, $2, $3) p(j, seq, chunk) '
                   'CROSS JOIN LATERAL jsonb_populate_record(NULL::%s, p.j) r JOIN e ON e.input = p.chunk',
                   v.chunk_table, array_to_string(ARRAY(SELECT quote_ident(k) FROM unnest(v.key_columns) k), ', '),
                   llm._key_list(v, 'r'), vs, v.source)
      USING piece_keys, seqs, pieces, v.model;
  END IF;
  EXECUTE format('DELETE FROM %s q USING unnest($1) u(j) CROSS JOIN LATERAL jsonb_populate_record(NULL::%s, u.j) r '
                 'WHERE %s', v.queue_table, v.source, llm._key_join(v, 'q', 'r')) USING keys;
END
$fn$;

-- Drain every vectorizer of the caller (or the one named) until nothing is due, committing
-- after each batch.  For servers where the background worker cannot run (no
-- shared_preload_libraries): call it from pg_cron or an application.  One vectorizer that
-- fails (its sidecar down, say) is reported as a WARNING and the others go on.
CREATE PROCEDURE llm.run_vectorizer(name text DEFAULT NULL, batch integer DEFAULT 512)
LANGUAGE plpgsql AS $fn$
DECLARE
  names text[];
  one text;
  n integer;
BEGIN
  SELECT array_agg(c.name ORDER BY c.name) INTO names FROM llm.vectorizer_config c
   WHERE c.owner = to_regrole(current_user) AND (run_vectorizer.name IS NULL OR c.name = run_vectorizer.name);
  IF names IS NULL AND run_vectorizer.name IS NOT NULL THEN
    PERFORM llm._vectorizer(run_vectorizer.name);   -- raises: not found or not yours
  END IF;
  FOREACH one IN ARRAY coalesce(names, '{}') LOOP
    LOOP
      BEGIN
        n := llm.run_vectorizer_batch(one, batch);
      EXCEPTION WHEN OTHERS THEN
        RAISE WARNING 'vectorizer %: %', one, SQLERRM;
        n := 0;
      END;
      COMMIT;
      EXIT WHEN n < batch;
    END LOOP;
  END LOOP;
END
$fn$;
COMMENT ON PROCEDURE llm.run_vectorizer IS
  'Embed what your vectorizers (or the one named) have queued, committing after each batch';

-- ---------------------------------------------------------------------------
-- Status

CREATE FUNCTION llm._queue_stats(v llm.vectorizer_config,
                                 OUT pending bigint, OUT failed bigint, OUT lag interval, OUT errors text[])
LANGUAGE plpgsql STABLE AS $fn$
BEGIN
  -- The reader may be a superuser, whom row security does not confine to its own rows: read
  -- only a real queue table of the owner (a view of the owner's would run its code as the reader).
  IF NOT llm._is_queue(v) THEN
    errors := ARRAY['its catalog row names no queue table of its owner: drop and create the vectorizer again'];
    RETURN;
  END IF;
  EXECUTE format('SELECT count(*) FILTER (WHERE error IS NULL), count(*) FILTER (WHERE error IS NOT NULL), '
                 'now() - min(queued_at) FILTER (WHERE error IS NULL), '
                 '(array_agg(DISTINCT error) FILTER (WHERE error IS NOT NULL))[1:3] FROM %s', v.queue_table)
     INTO pending, failed, lag, errors;
END
$fn$;

CREATE VIEW llm.vectorizers WITH (security_invoker = true) AS
  SELECT c.name, c.source, s.pending, s.failed, s.lag, c.last_success, s.errors,
         CASE WHEN c.last_run_seconds > 0 THEN c.last_run_rows / c.last_run_seconds END AS rows_per_second,
         c.rows_embedded, c.last_error, c.last_error_at, c.model, c.chunking, c.view, c.chunk_table, c.owner
    FROM llm.vectorizer_config c, LATERAL llm._queue_stats(c) s;
COMMENT ON VIEW llm.vectorizers IS
  'Your vectorizers: pending and failed queue entries (errors: a sample), lag (oldest pending), last success, rows/s';

-- ===========================================================================
-- BEGIN vectorizer metrics (issue 19: lag as a Prometheus metric, through postgres_exporter)
-- ===========================================================================
-- llm.vectorizers shows each role its own vectorizers only.  A monitor (postgres_exporter with
-- dashboards/postgres_exporter_queries.yaml, logged in as a role with llm_dashboard) needs every
-- vectorizer of the database and nothing more: numbers and ages, never a text, a key or an error
-- message (a row's error may quote the row).  So this one function, the extension owner's, reads
-- them for it; sql/llm_schema.sql grants it to llm_dashboard.

-- Whether v's queue_table is one the status function may read with its rights.  An owner may edit
-- its own catalog row (row-level security lets it), so queue_table may name anything: a table of
-- someone else (its count would leak), or a view of the owner's whose functions would run with
-- the reader's rights, a superuser's here.  Only a plain table of the vectorizer's owner with the
-- queue's column types and no child tables passes (reading one runs no code of its owner).
CREATE FUNCTION llm._is_queue(v llm.vectorizer_config) RETURNS boolean
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $fn$
  SELECT EXISTS (SELECT 1 FROM pg_class r WHERE r.oid = v.queue_table AND r.relkind = 'r' AND r.relowner = v.owner)
     AND NOT EXISTS (SELECT 1 FROM pg_inherits i WHERE i.inhparent = v.queue_table)
     AND (SELECT count(*) FROM pg_attribute a
           WHERE a.attrelid = v.queue_table AND NOT a.attisdropped
             AND (a.attname, a.atttypid) IN (('queued_at', 'timestamptz'::regtype), ('error', 'text'::regtype))) = 2
$fn$;
-- Every reader of llm.vectorizers calls it (through llm._queue_stats): it reads only catalogs.

CREATE FUNCTION llm.vectorizer_status()
RETURNS TABLE (vectorizer text, model text, pending bigint, failed bigint, lag_seconds double precision,
               last_success_age_seconds double precision, rows_per_second double precision,
               rows_embedded bigint, last_run_failed boolean)
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
  c llm.vectorizer_config;
  lag interval;
BEGIN
  FOR c IN SELECT * FROM llm.vectorizer_config v WHERE llm._is_queue(v) ORDER BY v.name LOOP
    SELECT s.pending, s.failed, s.lag INTO pending, failed, lag FROM llm._queue_stats(c) s;
    vectorizer := c.name;
    model := c.model;
    lag_seconds := coalesce(extract(epoch FROM lag), 0);   -- an empty queue lags by nothing
    last_success_age_seconds := extract(epoch FROM now() - c.last_success);
    rows_per_second := CASE WHEN c.last_run_seconds > 0 THEN c.last_run_rows / c.last_run_seconds END;
    rows_embedded := c.rows_embedded;
    last_run_failed := c.last_error IS NOT NULL;
    RETURN NEXT;
  END LOOP;
END
$fn$;
COMMENT ON FUNCTION llm.vectorizer_status() IS
  'Every vectorizer of this database, numbers only (for monitoring: postgres_exporter): queue, lag, last success, rows/s';
REVOKE ALL ON FUNCTION llm.vectorizer_status() FROM PUBLIC;
-- ===========================================================================
-- END vectorizer metrics
-- ===========================================================================

-- ---------------------------------------------------------------------------
-- Retrieval

-- Hybrid search over a vectorizer's chunks: the top candidates by cosine distance (HNSW)
-- and by full-text rank (websearch_to_tsquery), fused by reciprocal rank (60 + rank).
-- `filter` keeps the chunks whose source row contains it (to_jsonb(row) @> filter).
-- `rerank_model` (a rerank model of llm.models): the fusion's top 4 * k go to llm.rerank in one
-- request and the k best by its cross-encoder score come back, `score` being that score.
CREATE FUNCTION llm.search(query text, vectorizer text, k integer DEFAULT 10, filter jsonb DEFAULT NULL,
                           rerank_model text DEFAULT NULL)
RETURNS TABLE (source_key jsonb, chunk_seq integer, chunk text, score double precision,
               vector_rank integer, keyword_rank integer)
LANGUAGE plpgsql VOLATILE
-- with a filter, the HNSW scan goes on until it has the candidates that pass (pgvector 0.8)
SET hnsw.iterative_scan = 'relaxed_order'
AS $fn$
DECLARE
  v llm.vectorizer_config := llm._vectorizer(vectorizer);
  vs name := llm._vector_schema();
  qv text;
  candidates integer;
  where_filter text := CASE WHEN filter IS NULL THEN '' ELSE ' AND to_jsonb(s) @> $4' END;
  -- where the chunks are: the chunk table (c) joined to the source (s), or the source alone
  -- (destination column: one chunk per row, the row's text, with its vector if it has one)
  from_rel text := format('%s c JOIN %s s ON %s', v.chunk_table, v.source, llm._key_join(v, 'c', 's'));
  seq_expr text := 'c.chunk_seq';
  chunk_expr text := 'c.chunk';
  emb_expr text := 'c.embedding';
  tsv_expr text := 'c.chunk_tsv';
  -- the fused candidates as they are, or reordered by the cross-encoder (MATERIALIZED: the
  -- llm.rerank scan gets the whole list as one document = ANY(...) request)
  finish text := CASE WHEN rerank_model IS NULL THEN 'SELECT * FROM fused ORDER BY 4 DESC, 1, 2' ELSE
    ', rr AS MATERIALIZED (SELECT document, score FROM llm.rerank WHERE query = $3 AND model = $6'
    '  AND document = ANY(ARRAY(SELECT chunk FROM fused))) '
    'SELECT f.key, f.seq, f.chunk, rr.score, f.vr, f.kr FROM fused f JOIN rr ON rr.document = f.chunk '
    'ORDER BY 4 DESC, 1, 2 LIMIT $7' END;
BEGIN
  IF v.destination = 'column' THEN
    from_rel := format('%s s', v.source);
    seq_expr := '0';
    chunk_expr := llm._document(v);
    emb_expr := format('s.%I', v.embedding_column);
    where_filter := format(' AND %s IS NOT NULL', emb_expr) || where_filter;
    tsv_expr := format('to_tsvector(%L::regconfig, %s)', v.ts_config::text, chunk_expr);  -- its index's expression
  END IF;
  IF k IS NULL OR k < 1 OR k > 10000 THEN
    RAISE EXCEPTION 'llm.search: k must be from 1 to 10,000, got %', coalesce(k::text, 'NULL')
      USING ERRCODE = 'invalid_parameter_value';
  END IF;
  IF query IS NULL THEN
    RETURN;   -- as any comparison with NULL: no row
  END IF;
  candidates := greatest(4 * k, 40);
  EXECUTE 'SELECT embedding::text FROM llm.embeddings WHERE input = $1 AND model = $2' INTO qv USING query, v.model;
  RETURN QUERY EXECUTE format(
    'WITH vec AS (SELECT key, seq, chunk, row_number() OVER (ORDER BY d)::integer AS r FROM ('
    '  SELECT %1$s AS key, %4$s AS seq, %5$s AS chunk, %8$s OPERATOR(%2$I.<=>) $1::%2$I.vector AS d'
    '  FROM %3$s WHERE true%6$s ORDER BY d LIMIT $2) x), '
    'kw AS (SELECT key, seq, chunk, row_number() OVER (ORDER BY rank DESC)::integer AS r FROM ('
    '  SELECT %1$s AS key, %4$s AS seq, %5$s AS chunk, ts_rank_cd(%9$s, t) AS rank'
    '  FROM %3$s, websearch_to_tsquery(%7$L::regconfig, $3) t'
    '  WHERE %9$s @@ t%6$s ORDER BY rank DESC LIMIT $2) y), '
    'fused AS (SELECT coalesce(vec.key, kw.key) AS key, coalesce(vec.seq, kw.seq) AS seq, '
    '  coalesce(vec.chunk, kw.chunk) AS chunk, '
    '  coalesce(1.0::float8 / (60 + vec.r), 0) + coalesce(1.0::float8 / (60 + kw.r), 0) AS score, vec.r AS vr, kw.r AS kr '
    'FROM vec FULL JOIN kw ON vec.key = kw.key AND vec.seq = kw.seq ORDER BY 4 DESC, 1, 2 LIMIT $5) %10$s',
    llm._key_json(v, 's'), vs, from_rel, seq_expr, chunk_expr, where_filter, v.ts_config::text, emb_expr, tsv_expr,
    finish)
    USING qv, candidates, query, filter, CASE WHEN rerank_model IS NULL THEN k ELSE 4 * k END, rerank_model, k;
END
$fn$;
COMMENT ON FUNCTION llm.search IS
  'Hybrid retrieval over a vectorizer: vector (cosine) and full-text candidates fused by reciprocal rank';

-- llm.rag, now hybrid: a corpus with a vectorizer of the caller's is searched with
-- llm.search (sources: the chunks used, each prefixed with its row's key); any other
-- corpus as before (nearest rows by the embedding column).
-- rerank_model: passed to llm.search (a corpus without a vectorizer ignores it).
DROP FUNCTION llm.rag(text, regclass, integer, name, name, text, integer);   -- 0.2.0's, without rerank_model
CREATE FUNCTION llm.rag(question text, corpus regclass, k integer DEFAULT 3,
                        text_column name DEFAULT 'body',
                        embedding_column name DEFAULT 'embedding',
                        model text DEFAULT NULL, max_tokens integer DEFAULT 128,
                        rerank_model text DEFAULT NULL)
RETURNS TABLE (answer text, sources text[])
LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE AS $fn$
DECLARE
  q vector;
  vz text;
  context text[];
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
  SELECT c.name INTO vz FROM llm.vectorizer_config c
   WHERE c.source = corpus AND c.owner = to_regrole(current_user) ORDER BY c.name LIMIT 1;
  IF vz IS NOT NULL THEN
    SELECT array_agg(s.chunk ORDER BY s.score DESC), array_agg(s.source_key::text || ' ' || s.chunk ORDER BY s.score DESC)
      INTO context, sources FROM llm.search(question, vz, k, rerank_model => rerank_model) s;
  ELSE
    q := llm.embed(question);
    EXECUTE format('SELECT array_agg(t) FROM (SELECT %1$I AS t FROM %3$s ORDER BY %2$I <=> $1 LIMIT $2) s',
                   text_column, embedding_column, corpus)
       INTO sources USING q, k;
    context := sources;
  END IF;
  answer := llm.complete(E'Context:\n- ' || array_to_string(context, E'\n- ')
                         || E'\n\nUsing the context, answer: ' || question,
                         model => model, max_tokens => max_tokens);
  RETURN NEXT;
END
$fn$;
COMMENT ON FUNCTION llm.rag IS
  'Answer a question from the k rows (or, with a vectorizer, chunks) of a table nearest to it, with the sources used';

-- Granted to no one by default: sql/llm_schema.sql grants them to llm_user.
REVOKE ALL ON FUNCTION llm.create_vectorizer(regclass, name, text, text, text, text, integer, integer, integer,
                                             integer, text[], regconfig, boolean, text, name) FROM PUBLIC;
REVOKE ALL ON FUNCTION llm.alter_vectorizer(text, text, name, text, text, integer, integer, integer, integer,
                                            text[]) FROM PUBLIC;
REVOKE ALL ON FUNCTION llm.drop_vectorizer(text, boolean) FROM PUBLIC;
REVOKE ALL ON FUNCTION llm.run_vectorizer_batch(text, integer) FROM PUBLIC;
REVOKE ALL ON PROCEDURE llm.run_vectorizer(text, integer) FROM PUBLIC;
REVOKE ALL ON FUNCTION llm.search(text, text, integer, jsonb, text) FROM PUBLIC;
REVOKE ALL ON FUNCTION llm.rag(text, regclass, integer, name, name, text, integer, text) FROM PUBLIC;

-- ===========================================================================
-- BEGIN typed answers (issue 21: constrained output, warehouse-style functions, per-row errors)
-- ===========================================================================
-- llm.completions takes json_schema (jsonb) or choices (text[]) and returns the parsed answer
-- in completion_json; on_error = 'null' returns a failing row with its error in column error.
-- The functions below are thin SQL over it, in two forms:
--   * llm.classify(...), llm.extract(...), llm.filter(...), llm.generate_bool/int/double(...):
--     scalar, one request per call (one value, or a few rows);
--   * llm.classify_each(...), llm.extract_each(...), llm.filter_each(...),
--     llm.generate_bool/int/double_each(...): the same as set-returning SQL functions that
--     Postgres inlines (LANGUAGE sql, STABLE, not STRICT), so that over a table
--       FROM t CROSS JOIN LATERAL llm.classify_each(t.body, ARRAY['a', 'b']) c
--     becomes a join with llm.completions on prompt = <template of t.body>, which the batched
--     nested loop runs as one request per batch of rows (prompt = ANY(...)), not per row.
--     STABLE is what lets Postgres inline them; the answers are greedy (temperature 0), so the
--     same arguments give the same answer within a statement.
-- The model is the argument, else llm.completions' own default (its table or server option).
-- Function bodies name llm.completions, which sql/llm_schema.sql creates (IMPORT FOREIGN SCHEMA)
-- after CREATE EXTENSION: they are checked when first run, not here.
SET LOCAL check_function_bodies = off;

-- The model llm.completions uses when a query names none: its table option `model`, else
-- the server's `default_model`; an error that says how to choose one when neither is set.
CREATE FUNCTION llm._completions_model() RETURNS text
LANGUAGE plpgsql STABLE AS $fn$
DECLARE
  m text;
BEGIN
  SELECT coalesce((SELECT substr(o, 7) FROM unnest(ft.ftoptions) o WHERE o LIKE 'model=%'),
                  (SELECT substr(o, 15) FROM unnest(s.srvoptions) o WHERE o LIKE 'default_model=%'))
    INTO m
    FROM pg_foreign_table ft JOIN pg_foreign_server s ON s.oid = ft.ftserver
   WHERE ft.ftrelid = to_regclass('llm.completions');
  IF m IS NULL THEN
    RAISE EXCEPTION 'llm.completions has no default model and none was given'
      USING ERRCODE = 'invalid_parameter_value',
            HINT = 'Pass model => ''...'' (SELECT name FROM llm.models WHERE task = ''generate'';), or '
                   'ALTER FOREIGN TABLE llm.completions OPTIONS (ADD model ''...'');';
  END IF;
  RETURN m;
END
$fn$;

-- The prompt templates (short: they are written for small models; bench/bench_classify.py
-- measures their accuracy).  The wording matters with a small model: on bench/data/sentiment.csv,
-- constrained to the labels, SmolLM2-135M scored 50% with "Classify the text into one of these
-- categories: ...\n\nText: ...\n\nCategory:" (always one label) and 90% with "Classify the
-- sentiment of this review as positive or negative.\nReview: ...\nSentiment:".  IMMUTABLE SQL: inlined into the queries above.
CREATE FUNCTION llm.classify_prompt(input text, labels text[], descriptions text[] DEFAULT NULL)
RETURNS text LANGUAGE sql IMMUTABLE AS $fn$
  SELECT CASE WHEN $3 IS NULL
    THEN 'Classify this text as ' || array_to_string($2, ' or ') || E'.\nText: ' || $1 || E'\nAnswer:'
    ELSE E'Classify this text as one of:\n'
         || (SELECT string_agg('- ' || l || coalesce(': ' || d, ''), E'\n' ORDER BY i)
               FROM unnest($2, $3) WITH ORDINALITY u(l, d, i) WHERE l IS NOT NULL)
         || E'\nText: ' || $1 || E'\nAnswer:'
  END
$fn$;

CREATE FUNCTION llm.filter_prompt(input text, question text) RETURNS text
LANGUAGE sql IMMUTABLE AS $fn$
  SELECT 'Text: ' || $1 || E'\n\nQuestion: ' || $2 || E'\nAnswer yes or no.'
$fn$;

CREATE FUNCTION llm.extract_prompt(input text, schema jsonb) RETURNS text
LANGUAGE sql IMMUTABLE AS $fn$
  SELECT 'Extract ' || coalesce((SELECT string_agg(k, ', ') FROM jsonb_object_keys($2 -> 'properties') k),
                               'the data')
         || E' from the text as JSON.\n\nText: ' || $1
$fn$;

-- A field list ('["name", "city"]') as the JSON Schema of an object of those string fields;
-- a JSON Schema object is returned as it is.
CREATE FUNCTION llm.fields_schema(fields jsonb) RETURNS jsonb
LANGUAGE sql IMMUTABLE AS $fn$
  SELECT CASE WHEN jsonb_typeof($1) = 'array' THEN jsonb_build_object(
           'type', 'object',
           'properties', (SELECT coalesce(jsonb_object_agg(f, '{"type": "string"}'::jsonb), '{}')
                            FROM jsonb_array_elements_text($1) f),
           'required', $1,
           'additionalProperties', false)
         ELSE $1 END
$fn$;

-- ---- The batched (inlined, LATERAL) forms ----

CREATE FUNCTION llm.classify_each(input text, labels text[], descriptions text[] DEFAULT NULL,
                                  model text DEFAULT NULL, on_error text DEFAULT 'abort')
RETURNS TABLE (label text, error text)
LANGUAGE sql STABLE AS $fn$
  SELECT c.completion_json #>> '{}', c.error FROM llm.completions c
   WHERE c.prompt = llm.classify_prompt($1, $2, $3) AND c.choices = $2
     AND c.model = coalesce($4, llm._completions_model()) AND c.on_error = $5 AND c.temperature = 0
$fn$;

CREATE FUNCTION llm.filter_each(input text, question text, model text DEFAULT NULL,
                                on_error text DEFAULT 'abort')
RETURNS TABLE (answer boolean, error text)
LANGUAGE sql STABLE AS $fn$
  SELECT (c.completion_json #>> '{}') = 'yes', c.error FROM llm.completions c
   WHERE c.prompt = llm.filter_prompt($1, $2) AND c.choices = ARRAY['yes', 'no']
     AND c.model = coalesce($3, llm._completions_model()) AND c.on_error = $4 AND c.temperature = 0
$fn$;

CREATE FUNCTION llm.extract_each(input text, schema jsonb, model text DEFAULT NULL,
                                 on_error text DEFAULT 'abort', max_tokens integer DEFAULT 256)
RETURNS TABLE (value jsonb, error text)
LANGUAGE sql STABLE AS $fn$
  SELECT c.completion_json, c.error FROM llm.completions c
   WHERE c.prompt = llm.extract_prompt($1, llm.fields_schema($2)) AND c.json_schema = llm.fields_schema($2)
     AND c.model = coalesce($3, llm._completions_model()) AND c.on_error = $4 AND c.temperature = 0
     AND c.max_tokens = $5
$fn$;

CREATE FUNCTION llm.generate_bool_each(prompt text, model text DEFAULT NULL, on_error text DEFAULT 'abort')
RETURNS TABLE (value boolean, error text)
LANGUAGE sql STABLE AS $fn$
  SELECT (c.completion_json)::boolean, c.error FROM llm.completions c
   WHERE c.prompt = $1 AND c.json_schema = '{"type": "boolean"}'
     AND c.model = coalesce($2, llm._completions_model()) AND c.on_error = $3 AND c.temperature = 0
$fn$;

-- Numbers are bounded in the schema: unbounded, a small model may write digits until max_tokens
-- (128 of them, measured).  An integer within 15 digits; a double as a decimal string of at
-- most 15 + 6 digits (the engines bound a string's pattern, not a JSON number's size).
CREATE FUNCTION llm.generate_int_each(prompt text, model text DEFAULT NULL, on_error text DEFAULT 'abort')
RETURNS TABLE (value bigint, error text)
LANGUAGE sql STABLE AS $fn$
  SELECT (c.completion_json)::bigint, c.error FROM llm.completions c
   WHERE c.prompt = $1
     AND c.json_schema = '{"type": "integer", "minimum": -999999999999999, "maximum": 999999999999999}'
     AND c.model = coalesce($2, llm._completions_model()) AND c.on_error = $3 AND c.temperature = 0
$fn$;

CREATE FUNCTION llm.generate_double_each(prompt text, model text DEFAULT NULL, on_error text DEFAULT 'abort')
RETURNS TABLE (value double precision, error text)
LANGUAGE sql STABLE AS $fn$
  SELECT (c.completion_json #>> '{}')::double precision, c.error FROM llm.completions c
   WHERE c.prompt = $1 AND c.json_schema = '{"type": "string", "pattern": "^-?[0-9]{1,15}(\\.[0-9]{1,6})?$"}'
     AND c.model = coalesce($2, llm._completions_model()) AND c.on_error = $3 AND c.temperature = 0
$fn$;

-- ---- The scalar forms: one request per call ----

CREATE FUNCTION llm.classify(input text, labels text[], descriptions text[] DEFAULT NULL, model text DEFAULT NULL)
RETURNS text LANGUAGE sql STABLE AS $fn$
  SELECT e.label FROM llm.classify_each($1, $2, $3, $4) e
$fn$;
COMMENT ON FUNCTION llm.classify(text, text[], text[], text) IS
  'The one of labels that fits input (optionally described); over a table use llm.classify_each in a LATERAL join';

CREATE FUNCTION llm.filter(input text, question text, model text DEFAULT NULL)
RETURNS boolean LANGUAGE sql STABLE AS $fn$
  SELECT e.answer FROM llm.filter_each($1, $2, $3) e
$fn$;
COMMENT ON FUNCTION llm.filter(text, text, text) IS
  'Whether the model answers yes to question about input; over a table use llm.filter_each in a LATERAL join';

CREATE FUNCTION llm.extract(input text, schema jsonb, model text DEFAULT NULL, max_tokens integer DEFAULT 256)
RETURNS jsonb LANGUAGE sql STABLE AS $fn$
  SELECT e.value FROM llm.extract_each($1, $2, $3, 'abort', $4) e
$fn$;
COMMENT ON FUNCTION llm.extract(text, jsonb, text, integer) IS
  'The fields of a JSON Schema (or a JSON array of field names) filled in from input, as jsonb';

CREATE FUNCTION llm.generate_bool(prompt text, model text DEFAULT NULL)
RETURNS boolean LANGUAGE sql STABLE AS $fn$ SELECT e.value FROM llm.generate_bool_each($1, $2) e $fn$;
CREATE FUNCTION llm.generate_int(prompt text, model text DEFAULT NULL)
RETURNS bigint LANGUAGE sql STABLE AS $fn$ SELECT e.value FROM llm.generate_int_each($1, $2) e $fn$;
CREATE FUNCTION llm.generate_double(prompt text, model text DEFAULT NULL)
RETURNS double precision LANGUAGE sql STABLE AS $fn$ SELECT e.value FROM llm.generate_double_each($1, $2) e $fn$;

-- Granted to no one by default: sql/llm_schema.sql grants them to llm_user.
REVOKE ALL ON FUNCTION llm._completions_model(), llm.classify_prompt(text, text[], text[]),
  llm.filter_prompt(text, text), llm.extract_prompt(text, jsonb), llm.fields_schema(jsonb),
  llm.classify_each(text, text[], text[], text, text), llm.filter_each(text, text, text, text),
  llm.extract_each(text, jsonb, text, text, integer), llm.generate_bool_each(text, text, text),
  llm.generate_int_each(text, text, text), llm.generate_double_each(text, text, text),
  llm.classify(text, text[], text[], text), llm.filter(text, text, text), llm.extract(text, jsonb, text, integer),
  llm.generate_bool(text, text), llm.generate_int(text, text), llm.generate_double(text, text) FROM PUBLIC;
-- ===========================================================================
-- END typed answers
-- ===========================================================================
