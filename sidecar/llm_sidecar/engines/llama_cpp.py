"""Generation on GGUF models on the CPU, with llama.cpp's own server loop.

xllamacpp runs llama.cpp's server, here in a child process of the sidecar
(engines/llama_worker.py says why: OpenMP, and crashes): its slots decode
concurrently (continuous batching), so requests from different Postgres
sessions share decoding steps and a long answer never blocks a short one.

Each request runs in a thread of that process blocked in
handle_chat_completions; its streaming callback sends chunks back over the
pipe, and returns True to make llama.cpp drop the request once the sidecar
has said stop, which it does when the gRPC call went away.
The sidecar's admission never hands llama.cpp more requests than it has
slots, so a request starts decoding as soon as it gets here: its queue time
is measured in admission, not hidden in llama.cpp's own task queue.

A llama.cpp process that dies (a crash on some input, the OOM killer) is
started again in place: the requests it ran fail with UNAVAILABLE
("restarting"), the model answers "starting again" until the new process has
loaded it, and every other model keeps serving.  More than MAX_RESTARTS deaths
within RESTART_WINDOW_S is a crash loop, which a restart in place cannot
mend: the engine fails and the sidecar exits 3 for its supervisor.

llama.cpp's HTTP server comes with it: xllamacpp always starts its listener
(an empty host list crashes the process), by default on 127.0.0.1 at a random
port without a key, where any local user could generate past the sidecar's
socket, tenants and metering.  We never use it (requests go through the
handle_* calls), so it listens on a Unix socket in a directory of its own
(mode 0700, the sidecar's user), requires a random key nobody is told, and
has its slots and metrics endpoints off; engine_args may not change that.
"""
from __future__ import annotations

import asyncio
import logging
import os
import re
import secrets
import shutil
import tempfile
import time
from typing import Any, AsyncIterator

from llm_sidecar import metrics
from llm_sidecar.config import ModelConfig
from llm_sidecar.metering import Metered
from llm_inference.v1.constraints import choices_grammar
from llm_sidecar.engines.base import (FAILED, LOADING, READY, EngineFailed, EngineRestarting, GenerateFinal,
                                         GenerateParams, GenerationEngine)
from llm_sidecar.engines.llama_worker import ChildDied, LlamaWorker

log = logging.getLogger("llm_sidecar")

_FINISH = {"stop": "stop", "length": "length"}
# A dead llama.cpp process is started again, unless it died more than MAX_RESTARTS times within
# RESTART_WINDOW_S (a model that crashes on load, or on every request, would restart forever).
MAX_RESTARTS = 3
RESTART_WINDOW_S = 600.0
# How long a cancelled request may take to leave its slot (llama.cpp checks at each token;
# a long prompt still being read is not interrupted, so do not wait for it forever).
STOP_WAIT_S = 2.0
# Host memory for llama.cpp's prompt cache (see load()).
PROMPT_CACHE_MIB = 256
# Generation parameters (llm_inference.v1.params) that llama.cpp's server reads under another name;
# it takes the rest (max_tokens, temperature, top_p, seed, the OpenAI penalties) as they are.
RENAMES = {"repetition_penalty": "repeat_penalty"}
# CommonParams that shape llama.cpp's HTTP listener: private_listener() sets them, engine_args may not.
LISTENER_ARGS = ("hostnames", "port", "reuse_port", "api_keys", "endpoint_slots", "endpoint_props",
                 "endpoint_metrics", "n_threads_http", "ssl_file_cert", "ssl_file_key")


LISTENER_PREFIX = "llmfdw-llama-"
_LISTENER_NAME = re.compile(re.escape(LISTENER_PREFIX) + r"(\d+)-[a-z0-9_]+")


def sweep_listeners(root: str) -> None:
    """Remove this user's listener directories whose process is gone (SIGKILLed: a sidecar and
    its llama.cpp worker die together), leaving every other process's alone."""
    for entry in os.scandir(root):
        match = _LISTENER_NAME.fullmatch(entry.name)
        if match is None or not entry.is_dir(follow_symlinks=False) or entry.stat().st_uid != os.getuid():
            continue
        if not _alive(int(match.group(1))):
            shutil.rmtree(entry.path, ignore_errors=True)


def _alive(pid: int) -> bool:
    """Whether `pid` runs (another user's process counts: not ours to judge); a zombie does not
    (an orphan in a container whose first process does not reap stays one)."""
    try:
        os.kill(pid, 0)
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except PermissionError:
        return True
    except (ProcessLookupError, FileNotFoundError, IndexError):
        return False


def private_listener(params: Any) -> str:
    """Confine llama.cpp's HTTP server, which xllamacpp cannot leave out, to this process's user.

    Upstream llama.cpp listens on a Unix socket when a host name ends in .sock; the socket sits
    in a fresh 0700 directory (mkdtemp), so no other user can connect.  A random key and closed
    slots and metrics endpoints keep it shut should that directory ever be opened.  Returns the
    directory, for close() to remove.  Its name carries this process's pid, so that what a killed
    process could not remove is removed by the next one here (sweep_listeners)."""
    sweep_listeners(tempfile.gettempdir())
    directory = tempfile.mkdtemp(prefix=f"{LISTENER_PREFIX}{os.getpid()}-")
    params.hostnames = [os.path.join(directory, "http.sock")]
    params.api_keys = [secrets.token_urlsafe(32)]
    params.endpoint_slots = False
    params.endpoint_props = False
    params.endpoint_metrics = False
    params.n_threads_http = 1   # nothing is served there
    return directory


def constraint(params: GenerateParams) -> dict[str, Any]:
    """The request body's keys that constrain decoding: a JSON Schema as llama.cpp's server
    reads it (`json_schema`: its converter turns it into a grammar), choices as a GBNF grammar
    of the quoted alternatives, so the answer is the label itself (no JSON quotes to strip)."""
    if params.json_schema is not None:
        return {"json_schema": dict(params.json_schema)}
    if params.choices:
        return {"grammar": choices_grammar(list(params.choices))}
    return {}


class LlamaCppEngine(GenerationEngine):
    engine_name = "llama_cpp"

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        listener = sorted(set(config.engine_args) & set(LISTENER_ARGS))
        if listener:  # raised by engines.build: the sidecar refuses to start, before loading anything
            raise ValueError(f"model {config.name}: engine_args {listener} would open llama.cpp's HTTP "
                             f"server; the sidecar keeps it private and serves only through gRPC")
        self._worker: LlamaWorker | None = None
        self._deaths: list[float] = []              # when its processes died (time.monotonic)
        self._restart: asyncio.Task | None = None   # starting a new process

    async def load(self) -> None:
        settings = self.settings()
        if not os.path.exists(settings["model_path"]):
            raise FileNotFoundError(settings["model_path"])
        self._worker = await self._start()
        self.state = READY

    async def _start(self) -> LlamaWorker:
        """A new llama.cpp process with the model loaded; its death calls _died on this loop."""
        loop = asyncio.get_running_loop()

        def on_death(why: str) -> None:   # on the worker's reader thread
            if not loop.is_closed():
                loop.call_soon_threadsafe(self._died, worker, why)
        worker = LlamaWorker(self.settings(), on_death=on_death)
        await asyncio.to_thread(worker.start)
        return worker

    def _died(self, worker: LlamaWorker, why: str) -> None:
        """llama.cpp's process ended on its own (killed, crashed): start another at once, not at
        the next request, unless this is a crash loop; then the model is failed, so that the
        sidecar stops and its supervisor restarts it."""
        if worker is not self._worker or self.state == FAILED:
            return
        now = time.monotonic()
        self._deaths = [t for t in self._deaths if now - t < RESTART_WINDOW_S] + [now]
        metrics.ENGINE_RESTARTS.labels(self.name).inc()
        if len(self._deaths) > MAX_RESTARTS:
            self._fail(f"{why}, the {len(self._deaths)}th time in {RESTART_WINDOW_S:.0f} s: not started again")
            return
        log.warning("model %s: %s; starting a new llama.cpp process", self.name, why)
        self.state, self.error = LOADING, why
        self._restart = asyncio.create_task(self._start_again(worker), name=f"{self.name}-restart")

    async def _start_again(self, dead: LlamaWorker) -> None:
        await asyncio.to_thread(dead.close)   # reaped already; removes its listener directory
        try:
            worker = await self._start()
        except Exception as err:
            self._fail(f"{self.error}; starting it again failed: {err}")
            return
        self._worker = worker
        self.state, self.error = READY, ""
        log.info("model %s ready again (llama.cpp process restarted)", self.name)

    def _restarting(self, why: str) -> EngineRestarting:
        """What a request that lost its llama.cpp process raises."""
        return EngineRestarting(f"model {self.name!r}: {why}; a new one is starting, retry shortly")

    def _fail(self, why: str) -> None:
        self.state, self.error = FAILED, why
        log.error("model %s: %s", self.name, why)
        if self.on_failure is not None:
            self.on_failure(EngineFailed(why))

    def settings(self) -> dict[str, Any]:
        """What llama_worker builds llama.cpp's server from: the model, the threads, and
        CommonParams fields (engine_args last: they may change any but the listener's)."""
        cfg = self.config
        params = {
            "n_parallel": cfg.slots(),
            "n_ctx": cfg.context_length * cfg.slots(),   # each slot gets context_length
            "use_jinja": False,        # llama.cpp's built-in template for the model
            # llama.cpp keeps finished prompts' KV state in host memory for reuse, 8 GiB by default:
            # with many distinct prompts (one sidecar for many databases) that is what a soak saw as
            # steady growth.  Bound it; engine_args: {cache_ram_mib: N} changes it (0: off).
            "cache_ram_mib": PROMPT_CACHE_MIB,
            **cfg.engine_args,
        }
        return {"model_path": cfg.path(), "threads": cfg.threads or os.cpu_count() or 1, "params": params}

    async def close(self) -> None:
        if self._restart is not None:
            self._restart.cancel()   # a process it was starting dies with the sidecar (PDEATHSIG)
        if self._worker is not None:
            await asyncio.to_thread(self._worker.close)

    def _request(self, prompt: str, system: str, raw: bool, params: GenerateParams) -> tuple[str, dict]:
        """(which handler, the OpenAI-shaped body llama.cpp's server reads): each parameter under
        llama.cpp's name for it (RENAMES), an unset one left to llama.cpp's default."""
        body: dict[str, Any] = {
            **params.named(RENAMES),
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if params.stop:
            body["stop"] = params.stop
        body.update(constraint(params))
        if raw:
            body["prompt"] = prompt
            return "completions", body
        messages = [{"role": "system", "content": system}] if system else []
        body["messages"] = messages + [{"role": "user", "content": prompt}]
        return "chat", body

    async def generate(self, prompt: str, system: str, raw: bool, params: GenerateParams,
                       usage: Metered) -> AsyncIterator[str | GenerateFinal]:
        kind, body = self._request(prompt, system, raw, params)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        left = asyncio.Event()     # the request left llama.cpp ("done")
        done = object()
        tokens = metrics.ENGINE_TOKENS.labels(self.name)
        decoded = 0

        def route(message: tuple) -> None:   # on the worker's reader thread
            nonlocal decoded
            what = message[0]
            if what == "chunk":
                chunk = message[2]
                if any((ch.get("delta") or {}).get("content") or ch.get("text") for ch in chunk.get("choices", ())):
                    tokens.inc()
                    decoded += 1
                item: Any = chunk
            elif what == "refused":   # llama.cpp refused this request (std::invalid_argument)
                item = {"error": {"message": message[2]}}
            elif what == "broken":    # the engine itself broke
                item = EngineFailed(message[2])
            elif what == "died":      # its process died: _died starts another
                item = self._restarting(f"{message[2]} while running this request")
            else:
                loop.call_soon_threadsafe(left.set)
                item = done
            loop.call_soon_threadsafe(events.put_nowait, item)

        started = time.monotonic_ns()
        worker = self._worker   # the process this request runs in, even if a new one starts
        try:
            rid = worker.submit(kind, body, route)
        except ChildDied as err:   # it died just now; its on_death is on the way
            raise self._restarting(str(err)) from None
        finish, counts, timings = "stop", {}, {}
        completed = False
        try:
            while True:
                chunk = await events.get()
                if chunk is done:
                    break
                if isinstance(chunk, Exception):
                    raise chunk
                if "error" in chunk:
                    raise ValueError(chunk["error"].get("message", str(chunk["error"])))
                counts = chunk.get("usage") or counts
                timings = chunk.get("timings") or timings
                for choice in chunk.get("choices", []):
                    text = (choice.get("delta") or {}).get("content") if kind == "chat" else choice.get("text")
                    if text:
                        yield text
                    if choice.get("finish_reason"):
                        finish = _FINISH.get(choice["finish_reason"], "stop")
            # llama.cpp's own per-request timings: prompt processing plus decoding steps
            # (under batching, steps are shared with the other slots' requests)
            usage.input_tokens = counts.get("prompt_tokens", 0)
            usage.output_tokens = counts.get("completion_tokens", decoded)
            usage.compute_ns = int((timings.get("prompt_ms", 0) + timings.get("predicted_ms", 0)) * 1e6) \
                or time.monotonic_ns() - started
            completed = True
            yield GenerateFinal(finish, usage.input_tokens, usage.output_tokens, usage.compute_ns)
        finally:
            if not completed:
                # The caller went away or the request failed: the next token's callback
                # tells llama.cpp to drop it.  Wait for that (one decoding step), so the
                # slot is free before admission hands it on, and meter what it cost.
                try:
                    worker.stop(rid)
                except ChildDied:
                    pass   # nothing left to stop
                try:
                    await asyncio.wait_for(left.wait(), timeout=STOP_WAIT_S)
                except asyncio.TimeoutError:
                    pass
                usage.output_tokens = decoded
                usage.compute_ns = time.monotonic_ns() - started
