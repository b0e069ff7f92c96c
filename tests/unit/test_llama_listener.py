"""llama.cpp's private listener directory (engines/llama_cpp.py): named for its process, and
swept by the next process when the one that made it was killed before it could remove it."""
from __future__ import annotations

import os
import subprocess
import sys
from types import SimpleNamespace

from llm_sidecar.engines.llama_cpp import LISTENER_PREFIX, private_listener


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_the_directory_is_private_and_carries_the_pid(tmp_path, monkeypatch):
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    params = SimpleNamespace()
    directory = private_listener(params)
    assert os.path.basename(directory).startswith(f"{LISTENER_PREFIX}{os.getpid()}-")
    assert os.stat(directory).st_mode & 0o777 == 0o700
    assert params.hostnames == [os.path.join(directory, "http.sock")]
    assert params.endpoint_slots is False and params.endpoint_metrics is False


def test_a_dead_process_directory_is_swept_and_a_live_one_kept(tmp_path, monkeypatch):
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    dead = tmp_path / f"{LISTENER_PREFIX}{_dead_pid()}-abc_123"
    live = tmp_path / f"{LISTENER_PREFIX}{os.getppid()}-def456"
    other = tmp_path / f"{LISTENER_PREFIX}notapid"
    for d in (dead, live, other):
        d.mkdir(mode=0o700)
        (d / "http.sock").write_text("")
    made = private_listener(SimpleNamespace())
    assert not dead.exists()
    assert live.exists() and other.exists() and os.path.isdir(made)
