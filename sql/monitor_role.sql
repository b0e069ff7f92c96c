-- The login role postgres_exporter connects as (helm: postgres.exporter): llm_dashboard's reads
-- (llm.vectorizer_status() among them) and nothing more: no superuser, no pg_monitor.  Run as a
-- superuser after sql/llm_schema.sql (which makes llm_dashboard):
--
--   LLMFDW_MONITOR_PASSWORD_FILE=/path/to/password psql -v monitor_user=llm_monitor -f sql/monitor_role.sql
--
-- Safe to re-run: the role is made once, and its password follows the file (a rotated Secret).
-- The password is read by psql from the file (never on a command line) and sent in one
-- statement that this session keeps out of the server's logs and pg_stat_statements.
\set ON_ERROR_STOP on
\if :{?monitor_user}
\else
  DO $$ BEGIN RAISE EXCEPTION 'set the role''s name: psql -v monitor_user=llm_monitor -f monitor_role.sql'; END $$;
\endif
\set monitor_password `cat "$LLMFDW_MONITOR_PASSWORD_FILE"`
SELECT length(:'monitor_password') >= 12 AS long_enough \gset
\if :long_enough
\else
  DO $$ BEGIN RAISE EXCEPTION 'the monitoring role''s password (the file LLMFDW_MONITOR_PASSWORD_FILE names) '
                              'must have at least 12 characters'; END $$;
\endif
SELECT EXISTS (SELECT FROM pg_roles WHERE rolname = :'monitor_user' AND (rolsuper OR rolreplication OR rolbypassrls))
       AS privileged \gset
\if :privileged
  DO $$ BEGIN RAISE EXCEPTION 'the monitoring role named by monitor_user is a superuser (or may replicate or bypass '
                              'row security): name a role of its own for the exporter, e.g. llm_monitor'; END $$;
\endif

SET log_statement = 'none';
SET log_min_duration_statement = -1;
SET log_min_error_statement = 'panic';
SET pg_stat_statements.track_utility = off;   -- a placeholder where the extension is not loaded

SELECT format('CREATE ROLE %I', :'monitor_user')
 WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = :'monitor_user') \gexec
ALTER ROLE :"monitor_user" WITH LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS
  PASSWORD :'monitor_password';
GRANT llm_dashboard TO :"monitor_user";
