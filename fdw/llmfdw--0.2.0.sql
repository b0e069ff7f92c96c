/* fdw/llmfdw--0.2.0.sql */

-- complain if script is sourced in psql, rather than via CREATE EXTENSION
\echo Use "CREATE EXTENSION llmfdw" to load this file. \quit

CREATE FUNCTION llmfdw_handler()
RETURNS fdw_handler
AS 'MODULE_PATHNAME'
LANGUAGE C STRICT;

CREATE FUNCTION llmfdw_validator(text[], oid)
RETURNS void
AS 'MODULE_PATHNAME'
LANGUAGE C STRICT;

-- Postgres calls both itself; no role needs to call them.
REVOKE ALL ON FUNCTION llmfdw_handler() FROM PUBLIC;
REVOKE ALL ON FUNCTION llmfdw_validator(text[], oid) FROM PUBLIC;

CREATE FOREIGN DATA WRAPPER llmfdw
  HANDLER llmfdw_handler
  VALIDATOR llmfdw_validator;

COMMENT ON FOREIGN DATA WRAPPER llmfdw IS
  'Models served by an llmfdw sidecar as foreign tables; runs Python FDW classes (Multicorn2 API)';
