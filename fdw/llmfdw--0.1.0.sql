/* fdw/llmfdw--0.1.0.sql */

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

CREATE FOREIGN DATA WRAPPER llmfdw
  HANDLER llmfdw_handler
  VALIDATOR llmfdw_validator;

COMMENT ON FOREIGN DATA WRAPPER llmfdw IS
  'Runs Python FDW classes (Multicorn2 API); CREATE SERVER ... OPTIONS (wrapper ''package.module.Class'')';
