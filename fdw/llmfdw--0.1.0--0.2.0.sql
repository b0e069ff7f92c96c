/* fdw/llmfdw--0.1.0--0.2.0.sql */

-- complain if script is sourced in psql, rather than via ALTER EXTENSION
\echo Use "ALTER EXTENSION llmfdw UPDATE TO '0.2.0'" to load this file. \quit

-- 0.2.0: options are checked by level (see llmfdw_validator), and no role
-- may call the handler or the validator directly.
REVOKE ALL ON FUNCTION llmfdw_handler() FROM PUBLIC;
REVOKE ALL ON FUNCTION llmfdw_validator(text[], oid) FROM PUBLIC;

COMMENT ON FOREIGN DATA WRAPPER llmfdw IS
  'Models served by an llmfdw sidecar as foreign tables; runs Python FDW classes (Multicorn2 API)';
