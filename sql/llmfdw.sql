-- llmfdw: the FDW, the server that points at the sidecar, and schema llm.
--
--   psql -v ON_ERROR_STOP=1 -v sidecar_address='unix:///abs/path/sidecar.sock' -f sql/llmfdw.sql
--
-- Safe to run again: it replaces the schema's tables and keeps the server,
-- updating its address.
\if :{?sidecar_address}
\else
  \set sidecar_address 'unix:///tmp/llmfdw/sidecar.sock'
\endif

CREATE EXTENSION IF NOT EXISTS vector;
CREATE EXTENSION IF NOT EXISTS llmfdw;

SELECT NOT EXISTS (SELECT 1 FROM pg_foreign_server WHERE srvname = 'llm_sidecar') AS need_server \gset
\if :need_server
  CREATE SERVER llm_sidecar FOREIGN DATA WRAPPER llmfdw
    OPTIONS (wrapper 'llmfdw.fdw.tables.SidecarTables', address :'sidecar_address');
\else
  ALTER SERVER llm_sidecar OPTIONS (SET address :'sidecar_address');
\endif

CREATE SCHEMA IF NOT EXISTS llm;
COMMENT ON SCHEMA llm IS 'Models served by the llmfdw sidecar, as foreign tables';

-- One row per prompt.  prompt is required (= or = ANY(array)); the other
-- parameter columns are optional quals that go into the request.
DROP FOREIGN TABLE IF EXISTS llm.completions;
CREATE FOREIGN TABLE llm.completions (
  prompt        text,
  model         text,
  system        text,
  max_tokens    integer,
  temperature   double precision,
  top_p         double precision,
  seed          bigint,
  stop          text[],
  completion    text,
  finish_reason text,
  input_tokens  integer,
  output_tokens integer,
  compute_ms    double precision
) SERVER llm_sidecar OPTIONS (table 'completions', model 'smollm2-135m-instruct');

-- One row per distinct input.  input is required (= or = ANY(array)).
DROP FOREIGN TABLE IF EXISTS llm.embeddings;
CREATE FOREIGN TABLE llm.embeddings (
  input        text,
  model        text,
  embedding    vector(384),
  dimensions   integer,
  input_tokens integer,
  truncated    boolean
) SERVER llm_sidecar OPTIONS (table 'embeddings', model 'all-minilm-l6-v2');

DROP FOREIGN TABLE IF EXISTS llm.models;
CREATE FOREIGN TABLE llm.models (
  name           text,
  task           text,
  engine         text,
  dimensions     integer,
  context_length integer,
  state          text,
  error          text,
  source         text
) SERVER llm_sidecar OPTIONS (table 'models');

GRANT USAGE ON SCHEMA llm TO PUBLIC;
GRANT SELECT ON ALL TABLES IN SCHEMA llm TO PUBLIC;
