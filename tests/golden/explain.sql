-- EXPLAIN of llm.* scans and joins, compared whole with explain.out (tests/test_explain_golden.py).
-- Statements end with a semicolon at the end of a line; the rows of EXPLAIN statements are recorded.
CREATE TEMP TABLE docs (id int PRIMARY KEY, body text, embedding vector(384));
INSERT INTO docs SELECT g, 'note ' || g FROM generate_series(1, 50) g;
ANALYZE docs;
EXPLAIN (COSTS OFF) SELECT completion FROM llm.completions WHERE prompt = 'Say hi.' AND max_tokens = 5;
EXPLAIN (COSTS OFF, VERBOSE) SELECT input, embedding FROM llm.embeddings WHERE input = ANY(ARRAY['a', 'b']);
EXPLAIN (COSTS OFF) SELECT completion FROM llm.completions WHERE prompt = ANY(ARRAY['a', 'b', 'c']) LIMIT 1 OFFSET 1;
EXPLAIN (COSTS OFF) SELECT completion FROM llm.completions WHERE prompt = 'x' AND stop = ARRAY['.', '!'] AND temperature = 0.5 AND seed = 7;
EXPLAIN (COSTS OFF) SELECT d.id, e.embedding FROM docs d JOIN llm.embeddings e ON e.input = d.body;
EXPLAIN (COSTS OFF) SELECT d.id, c.completion FROM docs d LEFT JOIN llm.completions c ON c.prompt = d.body AND c.max_tokens = 3;
EXPLAIN (COSTS OFF) UPDATE docs d SET embedding = e.embedding FROM llm.embeddings e WHERE e.input = d.body;
EXPLAIN (COSTS OFF) SELECT g, c.completion FROM generate_series(1, 3) g, LATERAL (SELECT * FROM llm.completions WHERE prompt = 'Count to ' || g) c;
EXPLAIN (COSTS OFF) SELECT kind, total_ms FROM llm.requests WHERE at > '2026-01-01 00:00:00+00' AND at <= '2026-01-02 00:00:00+00';
EXPLAIN (COSTS OFF) SELECT name FROM llm.models;
PREPARE one_prompt(text, int) AS SELECT completion FROM llm.completions WHERE prompt = $1 AND max_tokens = $2;
SET plan_cache_mode = force_generic_plan;
EXPLAIN (COSTS OFF) EXECUTE one_prompt('Say hi.', 4);
RESET plan_cache_mode;
DEALLOCATE one_prompt;
