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
COMMENT ON ROLE llm_dashboard IS 'May read llm.requests, llm.usage and llm.models (dashboards): GRANT llm_dashboard TO grafana';

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
GRANT USAGE ON SCHEMA llm TO llm_dashboard;
GRANT SELECT ON llm.requests, llm.usage, llm.models TO llm_dashboard;

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
                          llm.rag(text, regclass, integer, name, name, text, integer) TO llm_user;
