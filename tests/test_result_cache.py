"""The sidecar's result cache through SQL, as a plain llm_user role.

A sidecar of its own (its cache bounded at 1 MiB, so the bound is reached) and two databases on it,
which are two tenants (the tenant is the database by default): a rerun of a deterministic statement
is answered from the cache (compute_ms 0, counted in llm.usage's cache_hits), never across tenants;
`cache = false` neither reads nor fills it; a sampled completion without a seed is never cached,
with a seed it is; embeddings are cached per text; the bytes stay within the bound; a restart of the
sidecar (which is how models are reloaded) empties it.  Unit tests of the keys and the bound are in
tests/unit/test_result_cache.py.
"""
from __future__ import annotations

import grpc
import numpy as np
import psycopg
import pytest
from pgvector.psycopg import register_vector
from psycopg.conninfo import make_conninfo

from deploy import embedded
from llm_inference.v1 import inference_pb2 as pb
from llm_inference.v1 import inference_pb2_grpc as pb_grpc
from sidecar_process import minilm, running_sidecar, sample, scrape, smollm2

GEN = "smollm2-135m-instruct"
EMB = "all-minilm-l6-v2"
BOUND = 1024 * 1024
CONFIG = f"cache: {{max_bytes: {BOUND}}}\nmodels:\n" + smollm2(max_tokens=8, parallel=4) + minilm()
PROMPTS = ["Name a colour.", "Name a fruit.", "Name a city.", "Name an animal.", "Name a planet."]
DATABASES = ("cache_a", "cache_b")


class Sidecar:
    """The test's sidecar, which a test may restart."""

    def __init__(self, sock, config, log, port) -> None:
        self.args = dict(socket_path=str(sock), config_path=str(config), log_path=str(log), metrics_port=port)
        self.port = port
        self._ctx = None

    def start(self) -> None:
        self._ctx = running_sidecar(**self.args)
        self._ctx.__enter__()

    def stop(self) -> None:
        self._ctx.__exit__(None, None, None)


@pytest.fixture(scope="module")
def cached(pg_server, run_dir, work_dir):
    config = work_dir / "cache.yaml"
    config.write_text(CONFIG)
    sock = run_dir / "cache.sock"
    sidecar = Sidecar(sock, config, work_dir / "log" / "cache-sidecar.log", embedded.free_port())
    sidecar.start()
    try:
        with psycopg.connect(pg_server.dsn("postgres"), autocommit=True) as c:
            if not c.execute("SELECT 1 FROM pg_roles WHERE rolname = 'cache_user'").fetchone():
                c.execute("CREATE ROLE cache_user LOGIN")
        dsns = {}
        for db in DATABASES:
            embedded.create_database(pg_server, db)
            embedded.apply_schema(pg_server, db, f"unix://{sock}")   # creates llm_user
            with psycopg.connect(pg_server.dsn(db), autocommit=True) as c:
                c.execute("GRANT llm_user TO cache_user")
            dsns[db] = make_conninfo(pg_server.dsn(db), user="cache_user")
        yield sidecar, dsns, sock
    finally:
        sidecar.stop()


def _connect(dsn: str) -> psycopg.Connection:
    conn = psycopg.connect(dsn, autocommit=True)
    register_vector(conn)
    return conn


def complete(conn, prompts, extra: str = "", params=()) -> dict[str, tuple[str, float]]:
    """prompt -> (completion, compute_ms)."""
    rows = conn.execute(f"SELECT prompt, completion, compute_ms FROM llm.completions "
                        f"WHERE prompt = ANY(%s) {extra}", (list(prompts), *params)).fetchall()
    return {p: (c, ms) for p, c, ms in rows}


def usage(conn, column: str = "cache_hits") -> int:
    return conn.execute(f"SELECT coalesce(sum({column}), 0) FROM llm.usage").fetchone()[0]


def test_rerun_is_answered_from_the_cache_and_metered_as_hits(cached):
    _, dsns, sock = cached
    with _connect(dsns["cache_a"]) as conn:
        assert conn.execute("SELECT rolsuper FROM pg_roles WHERE rolname = current_user").fetchone()[0] is False
        first = complete(conn, PROMPTS)
        assert all(ms > 0 for _, ms in first.values())
        hits, requests, tokens = usage(conn), usage(conn, "requests"), usage(conn, "output_tokens")
        again = complete(conn, PROMPTS)
        assert {p: c for p, (c, _) in again.items()} == {p: c for p, (c, _) in first.items()}
        assert all(ms == 0 for _, ms in again.values()), "no model time for a cached answer"
        assert usage(conn) == hits + len(PROMPTS)
        assert usage(conn, "requests") == requests + len(PROMPTS)
        assert usage(conn, "output_tokens") > tokens, "a hit carries its answer's tokens"
    # over gRPC, a cached completion is one delta and the final message
    with grpc.insecure_channel(f"unix://{sock}") as channel:
        stub = pb_grpc.InferenceStub(channel)
        ctx = pb.RequestContext(tenant="cache_a")
        messages = list(stub.Generate(pb.GenerateRequest(model=GEN, prompt=PROMPTS[0], context=ctx)))
    assert [m.WhichOneof("event") for m in messages] == ["delta", "final"]
    assert messages[0].delta == first[PROMPTS[0]][0] and messages[1].final.usage.compute_ns == 0


def test_tenants_never_share_answers(cached):
    sidecar, dsns, _ = cached
    with _connect(dsns["cache_a"]) as a:
        complete(a, PROMPTS[:2])   # cached for tenant cache_a (the first test, or now)
        complete(a, PROMPTS[:2])
        hits_a = usage(a)
    with _connect(dsns["cache_b"]) as b:
        rows = complete(b, PROMPTS[:2])
        assert all(ms > 0 for _, ms in rows.values()), "tenant cache_b computes its own answers"
        assert usage(b) == 0
    with _connect(dsns["cache_a"]) as a:
        assert usage(a) == hits_a
    metrics = scrape(sidecar.port)
    assert sample(metrics, "llmfdw_cache_hits_total", tenant="cache_b") == 0
    assert sample(metrics, "llmfdw_cache_hits_total", tenant="cache_a") >= 2


def test_cache_false_neither_reads_nor_fills(cached):
    _, dsns, _ = cached
    with _connect(dsns["cache_a"]) as conn:
        hits = usage(conn)
        rows = conn.execute("SELECT compute_ms, cache FROM llm.completions "
                            "WHERE prompt = ANY(%s) AND cache = false", (PROMPTS[:2],)).fetchall()
        assert all(ms > 0 and cache is False for ms, cache in rows), "cached answers exist, but are not read"
        fresh = ["Name a tree.", "Name a river."]
        assert all(ms > 0 for _, ms in complete(conn, fresh, "AND cache = false").values())
        assert all(ms > 0 for _, ms in complete(conn, fresh).values()), "cache = false did not fill it"
        assert all(ms == 0 for _, ms in complete(conn, fresh).values())
        assert usage(conn) == hits + len(fresh)


def test_sampling_without_a_seed_is_never_cached(cached):
    _, dsns, _ = cached
    with _connect(dsns["cache_a"]) as conn:
        hits = usage(conn)
        for _ in range(2):
            rows = complete(conn, PROMPTS[:3], "AND temperature = 0.8")
            assert all(ms > 0 for _, ms in rows.values())
        assert usage(conn) == hits
        complete(conn, PROMPTS[:3], "AND temperature = 0.8 AND seed = 7")
        seeded = complete(conn, PROMPTS[:3], "AND temperature = 0.8 AND seed = 7")
        assert all(ms == 0 for _, ms in seeded.values()), "a fixed seed makes it deterministic"
        assert usage(conn) == hits + 3


def test_embeddings_are_cached_per_text(cached):
    _, dsns, _ = cached
    with _connect(dsns["cache_a"]) as conn:
        sql = "SELECT input, embedding FROM llm.embeddings WHERE input = ANY(%s)"
        old = ["a red bicycle", "a quiet library", "the tide at night"]
        first = dict(conn.execute(sql, (old,)).fetchall())
        hits, embedded_inputs = usage(conn), usage(conn, "embedded_inputs")
        both = dict(conn.execute(sql, (old + ["a new text", "another new text"],)).fetchall())
        assert usage(conn) == hits + 3, "only the two new texts were computed"
        assert usage(conn, "embedded_inputs") == embedded_inputs + 5
        for text in old:
            a, b = first[text].to_numpy(), both[text].to_numpy()
            assert float(a @ b / np.linalg.norm(a) / np.linalg.norm(b)) > 0.999


def test_the_memory_bound_holds(cached):
    sidecar, dsns, _ = cached
    texts = [f"sentence number {i} about item {i * 7919 % 1000}" for i in range(1000)]
    with _connect(dsns["cache_b"]) as conn:
        assert conn.execute("SELECT count(*) FROM llm.embeddings WHERE input = ANY(%s)",
                            (texts,)).fetchone()[0] == len(texts)
    metrics = scrape(sidecar.port)
    held = sample(metrics, "llmfdw_cache_bytes")
    # 1,000 vectors of 384 float32s are over 1.5 MB: more than the bound was put in
    assert 0.5 * BOUND < held <= BOUND
    assert sample(metrics, "llmfdw_cache_evictions_total") > 0
    assert 0 < sample(metrics, "llmfdw_cache_entries") < len(texts)


def test_a_restart_empties_it(cached):
    sidecar, dsns, _ = cached
    with _connect(dsns["cache_a"]) as conn:
        complete(conn, PROMPTS[:2])
    sidecar.stop()
    sidecar.start()
    with _connect(dsns["cache_a"]) as conn:
        assert all(ms > 0 for _, ms in complete(conn, PROMPTS[:2]).values())
        assert usage(conn) == 0
