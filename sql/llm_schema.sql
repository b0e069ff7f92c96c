-- llmfdw: the FDW, the server that points at the sidecar, and schema llm.
--
--   psql -v ON_ERROR_STOP=1 -v sidecar_address='unix:///abs/path/sidecar.sock' -f sql/llm_schema.sql
--
-- A sidecar that serves TLS over TCP: add -v tls_ca_file=/path (and tls_cert_file, tls_key_file,
-- tls_server_name as needed: the server options of the same names, paths on this database's
-- host).  They are set before the tables are imported, which asks the sidecar.
--
-- Safe to run again: it keeps the server (updating its address and the TLS options it is
-- given), the tables and everything that depends on them, and adds what is missing.
\if :{?sidecar_address}
\else
  \set sidecar_address 'unix:///tmp/llmfdw/sidecar.sock'
\endif
\if :{?tls_ca_file} \else \set tls_ca_file '' \endif
\if :{?tls_cert_file} \else \set tls_cert_file '' \endif
\if :{?tls_key_file} \else \set tls_key_file '' \endif
\if :{?tls_server_name} \else \set tls_server_name '' \endif

CREATE EXTENSION IF NOT EXISTS vector;
CREATE EXTENSION IF NOT EXISTS llmfdw;   -- in schema llm (its control file says so)

-- Roles get the models through this role, never through the server itself:
-- USAGE on the server would let a role create its own user mapping.
SELECT NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'llm_user') AS need_role \gset
\if :need_role
  CREATE ROLE llm_user NOLOGIN;
\endif
COMMENT ON ROLE llm_user IS 'May query the llm.* tables and call the llm.* functions: GRANT llm_user TO your_role';
-- A dashboard's data-source role (Grafana): it reads what the sidecar measured and nothing else,
-- no model calls (llm.completions, llm.embeddings, the functions), so a dashboard cannot run up work.
SELECT NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'llm_dashboard') AS need_dashboard_role \gset
\if :need_dashboard_role
  CREATE ROLE llm_dashboard NOLOGIN;
\endif
COMMENT ON ROLE llm_dashboard IS 'May read llm.requests, llm.usage, llm.models, llm.progress and llm.vectorizer_status() (dashboards, monitoring): GRANT llm_dashboard TO grafana';

SELECT NOT EXISTS (SELECT 1 FROM pg_foreign_server WHERE srvname = 'llm_sidecar') AS need_server \gset
\if :need_server
  CREATE SERVER llm_sidecar FOREIGN DATA WRAPPER llmfdw OPTIONS (address :'sidecar_address');
\else
  ALTER SERVER llm_sidecar OPTIONS (SET address :'sidecar_address');
  -- servers made by earlier versions named the (now default) class
  SELECT EXISTS (SELECT 1 FROM pg_foreign_server WHERE srvname = 'llm_sidecar'
                 AND 'wrapper=llm_tables.tables.SidecarTables' = ANY (srvoptions)) AS old_wrapper \gset
  \if :old_wrapper
    ALTER SERVER llm_sidecar OPTIONS (DROP wrapper);
  \endif
\endif
-- The TLS options given, in one statement (the validator checks them together: a client
-- certificate needs its key), ADD or SET by whether the server has the option already.
SELECT format('ALTER SERVER llm_sidecar OPTIONS (%s)',
              string_agg(format('%s %s %L', CASE WHEN o.option_name IS NULL THEN 'ADD' ELSE 'SET' END,
                                v.name, v.value), ', '))
FROM (VALUES ('tls_ca_file', :'tls_ca_file'), ('tls_cert_file', :'tls_cert_file'),
             ('tls_key_file', :'tls_key_file'), ('tls_server_name', :'tls_server_name')) AS v(name, value)
LEFT JOIN (SELECT option_name FROM pg_foreign_server s, pg_options_to_table(s.srvoptions)
           WHERE s.srvname = 'llm_sidecar') AS o ON o.option_name = v.name
WHERE v.value <> ''
HAVING count(*) > 0 \gexec
REVOKE USAGE ON FOREIGN SERVER llm_sidecar FROM PUBLIC;

CREATE SCHEMA IF NOT EXISTS llm;
COMMENT ON SCHEMA llm IS 'Models served by the llmfdw sidecar, as foreign tables';

-- The tables come from their declarations (fdw/llm_tables/declarations.py),
-- with the sidecar's models as defaults.  They are imported into a staging
-- schema and compared with what is in llm: a missing table moves in, a
-- missing column is added, a column whose type changed is altered (Postgres
-- refuses that when a view uses the column, and the error names the view).
-- Nothing is dropped, so the views, grants, options and data that users made
-- on the tables stay as they are.
DROP SCHEMA IF EXISTS llm_declared CASCADE;
CREATE SCHEMA llm_declared;
IMPORT FOREIGN SCHEMA llm FROM SERVER llm_sidecar INTO llm_declared;
DO $upgrade$
DECLARE
  tbl record;
  col record;
  why text;
BEGIN
  FOR tbl IN SELECT relname FROM pg_class WHERE relnamespace = 'llm_declared'::regnamespace LOOP
    IF to_regclass(format('llm.%I', tbl.relname)) IS NULL THEN
      EXECUTE format('ALTER FOREIGN TABLE llm_declared.%I SET SCHEMA llm', tbl.relname);
      CONTINUE;
    END IF;
    -- types compare without modifiers: vector(N) follows the model, which users may change
    FOR col IN SELECT d.attname, format_type(d.atttypid, d.atttypmod) AS declared,
                    format_type(e.atttypid, e.atttypmod) AS existing, d.atttypid <> e.atttypid AS changed
               FROM pg_attribute d
               LEFT JOIN pg_attribute e ON e.attrelid = format('llm.%I', tbl.relname)::regclass
                                       AND e.attname = d.attname AND NOT e.attisdropped
              WHERE d.attrelid = format('llm_declared.%I', tbl.relname)::regclass AND d.attnum > 0 LOOP
      IF col.existing IS NULL THEN
        EXECUTE format('ALTER FOREIGN TABLE llm.%I ADD COLUMN %I %s', tbl.relname, col.attname, col.declared);
      ELSIF col.changed THEN
        BEGIN
          EXECUTE format('ALTER FOREIGN TABLE llm.%I ALTER COLUMN %I TYPE %s', tbl.relname, col.attname, col.declared);
        EXCEPTION WHEN feature_not_supported OR dependent_objects_still_exist THEN
          GET STACKED DIAGNOSTICS why = PG_EXCEPTION_DETAIL;
          RAISE EXCEPTION 'column llm.%.% must change from % to % (its declaration changed), but a view uses it',
                          tbl.relname, col.attname, col.existing, col.declared
            USING DETAIL = coalesce(nullif(why, ''), SQLERRM),
                  HINT = 'Save the view''s definition (pg_get_viewdef), drop it, run the setup again, create it again.';
        END;
      END IF;
    END LOOP;
  END LOOP;
END
$upgrade$;
DROP SCHEMA llm_declared CASCADE;

REVOKE ALL ON SCHEMA llm FROM PUBLIC;
REVOKE ALL ON ALL TABLES IN SCHEMA llm FROM PUBLIC;
GRANT USAGE ON SCHEMA llm TO llm_user;
GRANT SELECT ON ALL TABLES IN SCHEMA llm TO llm_user;
GRANT USAGE ON SCHEMA llm TO llm_dashboard;
GRANT SELECT ON llm.requests, llm.usage, llm.models TO llm_dashboard;
-- llm.progress (0.3.0): how far the tenant's running statements are; llm_user has it above.
GRANT SELECT ON llm.progress TO llm_dashboard;

-- Setups made with 0.1.0 created the helper functions here; 0.2.0 ships them
-- in the extension.  Hand the existing ones to the extension before the
-- update replaces them, so views that call them keep working.
DO $adopt$
DECLARE
  f text;
BEGIN
  IF (SELECT extversion FROM pg_extension WHERE extname = 'llmfdw') = '0.1.0' THEN
    FOREACH f IN ARRAY ARRAY['llm.complete(text, text, integer, double precision, text)',
                             'llm.embed(text, text)', 'llm.embed_batch(text[], text)',
                             'llm.rag(text, regclass, integer, name, name, text, integer)'] LOOP
      IF to_regprocedure(f) IS NOT NULL THEN
        EXECUTE format('ALTER EXTENSION llmfdw ADD FUNCTION %s', f);
      END IF;
    END LOOP;
  END IF;
END
$adopt$;
ALTER EXTENSION llmfdw UPDATE;

-- The helper functions, and not the FDW's handler and validator, which live here too.
GRANT EXECUTE ON FUNCTION llm.complete(text, text, integer, double precision, text), llm.embed(text, text),
                          llm.embed_batch(text[], text),
                          llm.rag(text, regclass, integer, name, name, text, integer, text) TO llm_user;

-- Vectorizers (0.3.0): roles of llm_user declare, drain and search their own; the catalog's
-- row-level security shows and lets each change only its own rows.
GRANT EXECUTE ON FUNCTION llm.create_vectorizer(regclass, name, text, text, text, text, integer, integer, integer,
                                                integer, text[], regconfig, boolean, text, name),
                          llm.alter_vectorizer(text, text, name, text, text, integer, integer, integer, integer,
                                               text[]),
                          llm.drop_vectorizer(text, boolean), llm.run_vectorizer_batch(text, integer),
                          llm.search(text, text, integer, jsonb, text) TO llm_user;
GRANT EXECUTE ON PROCEDURE llm.run_vectorizer(text, integer) TO llm_user;
GRANT SELECT, INSERT, UPDATE, DELETE ON llm.vectorizer_config TO llm_user;
GRANT SELECT ON llm.vectorizers TO llm_user;
-- Monitoring (postgres_exporter, dashboards/postgres_exporter_queries.yaml): every vectorizer's
-- queue counts and ages, no texts and no errors.
GRANT EXECUTE ON FUNCTION llm.vectorizer_status() TO llm_dashboard;

-- Typed answers (0.3.0): constrained output through llm.completions (json_schema, choices,
-- on_error) and the warehouse-style functions over it.
GRANT EXECUTE ON FUNCTION llm._completions_model(), llm.classify_prompt(text, text[], text[]),
                          llm.filter_prompt(text, text), llm.extract_prompt(text, jsonb), llm.fields_schema(jsonb),
                          llm.classify_each(text, text[], text[], text, text), llm.filter_each(text, text, text, text),
                          llm.extract_each(text, jsonb, text, text, integer), llm.generate_bool_each(text, text, text),
                          llm.generate_int_each(text, text, text), llm.generate_double_each(text, text, text),
                          llm.classify(text, text[], text[], text), llm.filter(text, text, text),
                          llm.extract(text, jsonb, text, integer), llm.generate_bool(text, text),
                          llm.generate_int(text, text), llm.generate_double(text, text) TO llm_user;
