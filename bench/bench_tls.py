"""Benchmark: what TLS to the sidecar costs, seen from SQL.

    .venv/bin/python bench/bench_tls.py [--rounds 3] [--queries 100] [--bulk 1000] [--connections 5]

Starts its own Postgres and three sidecars serving the embedding model the same way, reached
over the three transports a server can use:
  unix  - the Unix socket (`make up`, the colocated pod);
  tcp   - plain gRPC on 127.0.0.1;
  mtls  - mutual TLS on 127.0.0.1 (--tls-cert/--tls-key/--tls-client-ca; the server's tls_*
          options), certificates from deploy/dev_certs.py (ECDSA P-256).
and measures, in alternating rounds (median), for each transport:
  one_row_ms   - `SELECT ... FROM embeddings WHERE input = $1`, one short text per query;
  bulk_rows_s  - one `input = ANY($1)` query of --bulk texts;
  first_ms     - a new connection's first query (backend Python start, channel, handshake)
                 and next_ms, its second.
Loopback hides the network; what remains is the transports' own cost.  Prints a table with
ratios to unix and writes bench/results/tls.json.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import psycopg
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench.common import corpus, remove, save, scratch_layout  # noqa: E402
from deploy import embedded  # noqa: E402
from deploy.dev_certs import DevCA  # noqa: E402

TRANSPORTS = ("unix", "tcp", "mtls")
EMBED_MODEL = "all-minilm-l6-v2"


def embed_only_config(path: Path) -> Path:
    packaged = yaml.safe_load((REPO / "sidecar" / "llm_sidecar" / "models.yaml").read_text())
    # the result cache off: the rounds send the same texts again, and a hit is no transport cost
    path.write_text(yaml.safe_dump({"cache": {"max_bytes": 0},
                                    "models": [m for m in packaged["models"] if m["name"] == EMBED_MODEL]}))
    path.chmod(0o644)
    return path


def start_tcp_sidecar(state: Path, name: str, config: Path, extra: tuple[str, ...]) -> tuple[subprocess.Popen, int]:
    """A sidecar on 127.0.0.1:<free port> (and a Unix socket to wait for SERVING on)."""
    port = embedded.free_port()
    run = embedded.make_server_dir(state / f"run-{name}", 0o700)
    sock = run / "s.sock"
    argv, kwargs = embedded.sidecar_process_args(f"unix://{sock}", home=state / f"home-{name}", config=config,
                                                 extra=("--listen", f"127.0.0.1:{port}", *extra))
    log = open(state / f"sidecar-{name}.log", "ab")
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=state, **kwargs)
    log.close()
    embedded.wait_serving(f"unix://{sock}", 300, alive=lambda: proc.poll() is None,
                          log_file=state / f"sidecar-{name}.log")
    return proc, port


def one_row_ms(conn: psycopg.Connection, schema: str, texts: list[str]) -> float:
    times = []
    for text in texts:
        start = time.perf_counter()
        assert conn.execute(f"SELECT vector_dims(embedding) FROM {schema}.embeddings WHERE input = %s",
                            (text,)).fetchone() == (384,)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def bulk_rows_s(conn: psycopg.Connection, schema: str, texts: list[str]) -> float:
    start = time.perf_counter()
    assert conn.execute(f"SELECT count(*) FROM {schema}.embeddings WHERE input = ANY(%s)",
                        (texts,)).fetchone() == (len(texts),)
    return len(texts) / (time.perf_counter() - start)


def first_and_next_ms(uri: str, schema: str, connections: int) -> tuple[float, float]:
    first, nxt = [], []
    for i in range(connections):
        with psycopg.connect(uri, autocommit=True) as c:
            for times, text in ((first, f"first {i}"), (nxt, f"next {i}")):
                start = time.perf_counter()
                c.execute(f"SELECT count(*) FROM {schema}.embeddings WHERE input = %s", (text,)).fetchone()
                times.append(time.perf_counter() - start)
    return statistics.median(first) * 1000, statistics.median(nxt) * 1000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--queries", type=int, default=100, help="one-row queries per transport and round")
    parser.add_argument("--bulk", type=int, default=1000, help="texts in the bulk query")
    parser.add_argument("--connections", type=int, default=5, help="new connections per transport and round")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "tls.json"))
    args = parser.parse_args()

    layout = scratch_layout("bench-tls")
    state = layout.state
    certs = state / "certs"
    certs.mkdir()
    certs.chmod(0o755)
    ca = DevCA("bench CA")
    ca_file = ca.write_ca(certs / "ca.pem")
    server_cert, server_key = ca.issue(certs, "sidecar", server_names=("127.0.0.1",))
    client_cert, client_key = ca.issue(certs, "client", client=True)
    for key in (server_key, client_key):   # 0600, for the user the sidecar and the backends run as
        embedded.give_to_server_user(key)
    config = embed_only_config(state / "embed.yaml")
    procs: list[subprocess.Popen] = []
    figures: dict[str, dict[str, list[float]]] = {t: {"one_row_ms": [], "bulk_rows_s": [], "first_ms": [],
                                                      "next_ms": []} for t in TRANSPORTS}
    try:
        uri = embedded.up(layout, port=embedded.free_port(), config=config, demo=False)
        tcp, tcp_port = start_tcp_sidecar(state, "tcp", config, ())
        mtls, mtls_port = start_tcp_sidecar(state, "mtls", config, (
            "--tls-cert", str(server_cert), "--tls-key", str(server_key), "--tls-client-ca", str(ca_file)))
        procs += [tcp, mtls]
        with psycopg.connect(uri, autocommit=True) as conn:
            conn.execute("DROP SCHEMA IF EXISTS unix_t; CREATE SCHEMA unix_t")
            conn.execute("IMPORT FOREIGN SCHEMA llm LIMIT TO (embeddings) FROM SERVER llm_sidecar INTO unix_t")
            servers = {"tcp": f"address '127.0.0.1:{tcp_port}'",
                       "mtls": f"address '127.0.0.1:{mtls_port}', tls_ca_file '{ca_file}', "
                               f"tls_cert_file '{client_cert}', tls_key_file '{client_key}'"}
            for name, options in servers.items():
                conn.execute(f"CREATE SERVER {name}_srv FOREIGN DATA WRAPPER llmfdw OPTIONS ({options})")
                conn.execute(f"CREATE USER MAPPING FOR CURRENT_USER SERVER {name}_srv")
                conn.execute(f"CREATE SCHEMA {name}_t")
                conn.execute(f"IMPORT FOREIGN SCHEMA llm LIMIT TO (embeddings) FROM SERVER {name}_srv INTO {name}_t")
            for t in TRANSPORTS:   # warm-up: every channel connected, every model warm
                bulk_rows_s(conn, f"{t}_t", corpus(64))
            for r in range(args.rounds):
                order = TRANSPORTS if r % 2 == 0 else TRANSPORTS[::-1]
                for t in order:
                    texts = [f"round {r} {t} {x}" for x in corpus(args.queries)]
                    figures[t]["one_row_ms"].append(one_row_ms(conn, f"{t}_t", texts))
                    figures[t]["bulk_rows_s"].append(
                        bulk_rows_s(conn, f"{t}_t", [f"bulk {r} {t} {x}" for x in corpus(args.bulk)]))
                    first, nxt = first_and_next_ms(uri, f"{t}_t", args.connections)
                    figures[t]["first_ms"].append(first)
                    figures[t]["next_ms"].append(nxt)
                print(f"round {r + 1}/{args.rounds} done", flush=True)
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(30)
        remove(layout)

    results = {t: {k: {"median": statistics.median(v), "runs": v} for k, v in f.items()}
               for t, f in figures.items()}
    print(f"\nEmbedding through SQL by transport ({args.rounds} alternating rounds, median; "
          f"{os.cpu_count()} CPUs; ratio to unix)")
    print(f"{'transport':<10}{'one row ms':>16}{'bulk rows/s':>18}{'1st query ms':>18}{'next ms':>14}")
    base = results["unix"]
    for t in TRANSPORTS:
        cells = []
        for key, width in (("one_row_ms", 16), ("bulk_rows_s", 18), ("first_ms", 18), ("next_ms", 14)):
            value = results[t][key]["median"]
            cells.append(f"{value:.1f} ({value / base[key]['median']:.2f}x)".rjust(width))
        print(f"{t:<10}" + "".join(cells))
    save({"rounds": args.rounds, "queries": args.queries, "bulk": args.bulk, "connections": args.connections,
          "transports": results}, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
