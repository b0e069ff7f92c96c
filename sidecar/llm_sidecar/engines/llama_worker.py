"""llama.cpp's server in a child process of the sidecar, and the sidecar's end of the pipe to it.

Why a process of its own: torch (the embedding and rerank engines) and llama.cpp both link
libgomp.so.1, which a process loads once.  libgomp counts the threads of every OpenMP pool in
the process, and once they outnumber the CPUs it all but stops spinning at barriers: a waiting
thread sleeps in the kernel and is woken again, at each of the ~100 barriers of a decoding step
or a forward pass.  In one process, a one-text embedding took 16.8 ms instead of 9.1 ms beside a
loaded llama.cpp (2 CPUs), and generation ran 20-40% slower beside an embedding model
(engines/compute_thread.py).  In its own process each library has its libgomp to itself.  It
also keeps a crash inside llama.cpp (an abort, a segfault, the OOM killer) from taking the
sidecar down: the requests it was running fail (UNAVAILABLE, "restarting"), and the engine
starts a new child (engines/llama_cpp.py: on_death) while the other models keep serving.

The protocol over a socketpair (multiprocessing.connection, pickled tuples), parent -> child:
  ("generate", rid, kind, body)  run handle_chat_completions ("chat") or handle_completions;
  ("stop", rid)                  the next token's callback tells llama.cpp to drop rid;
child -> parent:
  ("ready",) | ("failed", message)   once, after loading;
  ("chunk", rid, chunk)              each streamed chunk (or an {"error": ...} result);
  ("refused", rid, message)          llama.cpp refused the request (std::invalid_argument);
  ("broken", rid, message)           the engine itself failed on it;
  ("done", rid)                      the request left llama.cpp.
and, made up by the reader here when the child is gone, to each request it was running:
  ("died", rid, message), then ("done", rid).
The child dies with the sidecar (PR_SET_PDEATHSIG) and exits when the pipe closes; its stdout and
stderr (llama.cpp's log lines) reach the sidecar's stderr through another pipe.
"""
from __future__ import annotations

import asyncio
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
from multiprocessing.connection import Connection
from typing import Any, Callable

PR_SET_PDEATHSIG = 1


class LlamaWorker:
    """The sidecar's end: starts the child, sends it requests, routes what comes back to each
    request's callback (called on the reader thread), and fails them all if the child dies."""

    def __init__(self, settings: dict[str, Any], on_death: Callable[[str], None] | None = None) -> None:
        self._settings = settings
        self._on_death = on_death   # called on the reader thread when the child dies unasked
        self._proc: subprocess.Popen | None = None
        self._conn: Connection | None = None
        self._send_lock = threading.Lock()
        self._routes: dict[int, Callable[[tuple], None]] = {}
        self._next = 0
        self._dead = ""
        self.http_dir = ""

    def start(self) -> None:
        """Start the child and wait until its model is loaded (blocking: run it in a thread)."""
        mine, theirs = socket.socketpair()
        try:
            # llama.cpp's own output comes back through a pipe and goes out on this process's
            # stderr: with --log-file that descriptor follows the log's rotation (server.LogFile),
            # which a descriptor the child inherited would not
            self._proc = subprocess.Popen([sys.executable, "-m", __name__, str(theirs.fileno())],
                                          pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL,
                                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        finally:
            theirs.close()
        threading.Thread(target=_relay, args=(self._proc.stdout.fileno(),), name="llama-worker-output",
                         daemon=True).start()
        self._conn = Connection(mine.detach())
        self._conn.send(self._settings)
        try:
            answer = self._conn.recv()
        except EOFError:
            answer = ("failed", f"llama.cpp's process exited with {self._proc.wait()} while loading")
        if answer[0] != "ready":
            self.close()
            raise RuntimeError(answer[1])
        self.http_dir = answer[1]
        threading.Thread(target=self._read, name="llama-worker-reader", daemon=True).start()

    def submit(self, kind: str, body: dict, route: Callable[[tuple], None]) -> int:
        """Send a request; `route` gets each message about it.  Returns its id (for stop())."""
        if self._dead:
            raise ChildDied(self._dead)
        self._next += 1
        rid = self._next
        self._routes[rid] = route
        self._send(("generate", rid, kind, body))
        return rid

    def stop(self, rid: int) -> None:
        if not self._dead and rid in self._routes:   # not for a request that is done
            self._send(("stop", rid))

    def _send(self, message: tuple) -> None:
        try:
            with self._send_lock:
                self._conn.send(message)
        except OSError as err:
            raise ChildDied(f"llama.cpp's process is gone ({err})") from None

    def _read(self) -> None:
        try:
            while True:
                message = self._conn.recv()
                route = self._routes.get(message[1])
                if message[0] == "done":
                    self._routes.pop(message[1], None)
                if route is not None:
                    route(message)
        except (EOFError, OSError):
            code = self._proc.wait() if self._proc else None
            asked = self._dead == "closed"
            self._dead = f"llama.cpp's process exited (status {code})"
            for rid, route in list(self._routes.items()):
                route(("died", rid, self._dead))
                route(("done", rid))
            self._routes.clear()
            if not asked and self._on_death is not None:
                self._on_death(self._dead)

    def close(self) -> None:
        """Close the pipe (the child exits), then make sure it did."""
        self._dead = self._dead or "closed"
        if self._conn is not None:
            self._conn.close()
        if self._proc is not None:
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        if self.http_dir:
            shutil.rmtree(self.http_dir, ignore_errors=True)   # llama.cpp leaves its socket behind


def _relay(fd: int) -> None:
    """Copy the child's output to this process's stderr (fd 2, wherever it points now)."""
    while data := os.read(fd, 65536):
        os.write(2, data)


class ChildDied(RuntimeError):
    """llama.cpp's process is gone."""


# -- the child ----------------------------------------------------------------

def build_server(settings: dict[str, Any]) -> tuple[Any, str]:
    """xllamacpp.Server from the settings LlamaCppEngine made (its CommonParams fields)."""
    import xllamacpp

    from llm_sidecar.engines.llama_cpp import private_listener

    params = xllamacpp.CommonParams()
    params.model.path = settings["model_path"]
    params.cpuparams.n_threads = params.cpuparams_batch.n_threads = settings["threads"]
    for key, value in settings["params"].items():
        setattr(params, key, value)
    directory = private_listener(params)
    try:
        return xllamacpp.Server(params), directory
    except BaseException:
        shutil.rmtree(directory, ignore_errors=True)
        raise


def _serve(conn: Connection) -> None:
    settings = conn.recv()
    try:
        server, directory = build_server(settings)
    except Exception as err:
        conn.send(("failed", f"llama.cpp could not load the model: {err}"))
        return
    conn.send(("ready", directory))
    send_lock = threading.Lock()
    # a stop that arrives after its request finished must leave nothing behind: both sets
    # change only under state_lock, and only running requests can be stopped
    state_lock = threading.Lock()
    running: set[int] = set()
    stopped: set[int] = set()

    def send(message: tuple) -> None:
        with send_lock:
            conn.send(message)

    def run(rid: int, kind: str, body: dict) -> None:
        def on_chunk(chunk: Any) -> bool:
            send(("chunk", rid, chunk))
            return rid in stopped
        try:
            handler = server.handle_chat_completions if kind == "chat" else server.handle_completions
            result = handler(body, on_chunk)
            if isinstance(result, dict) and "error" in result:
                send(("chunk", rid, result))
        except ValueError as err:   # llama.cpp refused this request (std::invalid_argument)
            send(("refused", rid, str(err)))
        except Exception as err:  # the engine itself broke
            send(("broken", rid, str(err)))
        finally:
            with state_lock:
                running.discard(rid)
                stopped.discard(rid)
            send(("done", rid))

    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            os._exit(0)   # the sidecar closed the pipe or died: llama.cpp's threads need no goodbye
        if message[0] == "generate":
            with state_lock:
                running.add(message[1])
            threading.Thread(target=run, args=message[1:], daemon=True).start()
        elif message[0] == "stop":
            with state_lock:
                if message[1] in running:
                    stopped.add(message[1])


def main() -> None:
    ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    # A signal to the sidecar's process group must not cut short what its graceful stop lets
    # finish: this process ends when the sidecar closes the pipe (or dies).
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    conn = Connection(int(sys.argv[1]))
    if os.getppid() == 1:   # the sidecar died before prctl took effect
        os._exit(0)
    _serve(conn)


if __name__ == "__main__":
    main()
