"""The sidecar listens on nothing another local user can reach but what its operator configured.

Its gRPC socket is the boundary (mode 0600: only the Postgres server's OS user), and behind it sit
tenants, auth, fairness and metering. An engine library that opens a listener of its own (xllamacpp
starts llama.cpp's HTTP server, by default on 127.0.0.1 with no key) would be a way around all of
it. So every listening socket of the sidecar's processes is found (the kernel's socket tables
matched with their open descriptors) and each is tried as OS user `nobody`: only the Prometheus
port may answer. Switching to `nobody` needs root.
"""
from __future__ import annotations

import json
import os
import pwd
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from deploy import embedded

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="switching to OS user nobody needs root")
TCP_LISTEN = 0x0A                  # st in /proc/net/tcp
UNIX_ACCEPTING = 0x10000           # __SO_ACCEPTCON in /proc/net/unix's Flags: a listening socket
PACKAGED = Path(__file__).resolve().parents[1] / "sidecar" / "llm_sidecar" / "models.yaml"

# Run as nobody: try to connect to each target; print what happened to each.
PROBE = """
import json, socket, sys
result = {}
for kind, host, port in json.loads(sys.argv[1]):
    family = socket.AF_UNIX if kind == "unix" else socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(family)
    s.settimeout(5)
    try:
        s.connect(host if kind == "unix" else (host, port))
        result[f"{kind} {host} {port}"] = "connected"
    except OSError as err:
        result[f"{kind} {host} {port}"] = type(err).__name__
    finally:
        s.close()
print(json.dumps(result))
"""


def process_tree(pid: int) -> list[int]:
    """`pid` and its descendants (an engine could listen from a child process)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int(next(line for line in (entry / "status").read_text().splitlines()
                                if line.startswith("PPid:")).split()[1])
            except (FileNotFoundError, ProcessLookupError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    tree, todo = [], [pid]
    while todo:
        tree.append(todo.pop())
        todo += children.get(tree[-1], [])
    return tree


def socket_inodes(pid: int) -> set[int]:
    """Inodes of the sockets `pid` holds open."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except FileNotFoundError:
            continue
        if target.startswith("socket:["):
            inodes.add(int(target[len("socket:["):-1]))
    return inodes


def _address(hex_address: str) -> str:
    """An address as /proc/net/tcp{,6} writes it (32-bit words in host order) in text."""
    raw = bytes.fromhex(hex_address)
    raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    return socket.inet_ntop(socket.AF_INET if len(raw) == 4 else socket.AF_INET6, raw)


def listeners(pid: int) -> list[tuple[str, str, int]]:
    """Every listening TCP and Unix-domain socket of `pid`: (tcp, address, port) or (unix, path, 0);
    abstract Unix names start with a NUL byte, unnamed ones are empty."""
    inodes = socket_inodes(pid)
    found = []
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], int(fields[3], 16), int(fields[9])
            if state == TCP_LISTEN and inode in inodes:
                host, port = local.rsplit(":", 1)
                found.append(("tcp", _address(host), int(port, 16)))
    for line in Path(f"/proc/{pid}/net/unix").read_text().splitlines()[1:]:
        fields = line.split(maxsplit=7)
        flags, inode = int(fields[3], 16), int(fields[6])
        path = fields[7] if len(fields) > 7 else ""
        if flags & UNIX_ACCEPTING and inode in inodes:   # gRPC binds unix:///p as ///p: normalized
            found.append(("unix", "\0" + path[1:] if path.startswith("@") else os.path.normpath(path) if path else "", 0))
    return found


def reachable(target: tuple[str, str, int]) -> tuple[str, str, int]:
    """Where a client connects to reach a listener: a wildcard address through loopback."""
    kind, host, port = target
    return (kind, {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host), port)


def try_as_nobody(targets: list[tuple[str, str, int]]) -> dict[str, str]:
    """{target: "connected" or the error's name} for connections made as OS user nobody."""
    entry = pwd.getpwnam("nobody")
    python, python_env = embedded.sidecar_interpreter()
    proc = subprocess.run([python, "-c", PROBE, json.dumps([reachable(t) for t in targets])],
                          user=entry.pw_uid, group=entry.pw_gid, extra_groups=[],
                          env={**os.environ, **python_env, "HOME": "/"}, cwd="/",
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


@needs_root
def test_only_the_metrics_port_answers_another_user(conn, session_sidecar, sidecar_socket,
                                                    sidecar_metrics_port):
    # Both models are loaded (SERVING), and generation has run, so every engine's listener exists.
    answer = conn.execute("SELECT completion FROM llm.completions "
                          "WHERE prompt = 'What is the capital of France?' AND max_tokens = 16").fetchone()[0]
    assert "Paris" in answer
    found = [t for pid in process_tree(session_sidecar.pid) for t in listeners(pid)]
    assert ("unix", sidecar_socket, 0) in found and ("tcp", "127.0.0.1", sidecar_metrics_port) in found, found
    results = try_as_nobody(found)
    answering = sorted(target for target, result in results.items() if result == "connected")
    assert answering == [f"tcp 127.0.0.1 {sidecar_metrics_port}"], results
    assert results[f"unix {sidecar_socket} 0"] == "PermissionError"


def test_engine_args_cannot_open_the_llama_cpp_listener(tmp_path):
    """An operator's engine_args may not move llama.cpp's HTTP server onto TCP or drop its key."""
    model = next(m for m in yaml.safe_load(PACKAGED.read_text())["models"] if m["engine"] == "llama_cpp")
    config = tmp_path / "models.yaml"
    config.write_text(yaml.safe_dump({"models": [{**model, "engine_args": {"hostnames": ["0.0.0.0"],
                                                                          "port": 8080}}]}))
    proc = subprocess.run([sys.executable, "-m", "llm_sidecar.server", "--allow-root",
                           "--listen", f"unix://{tmp_path / 's.sock'}", "--config", str(config)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "engine_args ['hostnames', 'port'] would open llama.cpp's HTTP server" in proc.stderr, proc.stderr
