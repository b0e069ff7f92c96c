"""Generation on GGUF models on the CPU, with llama.cpp's own server loop.

xllamacpp runs llama.cpp's server in-process: `parallel` slots decode
concurrently (continuous batching), so requests from different Postgres
sessions share decoding steps and a long answer never blocks a short one.

Each request runs in a worker thread blocked in handle_chat_completions; its
streaming callback forwards chunks to the event loop and returns True to
make llama.cpp drop the request, which it does when the gRPC call went away.
The sidecar's admission never hands llama.cpp more requests than it has
slots, so a request starts decoding as soon as it gets here: its queue time
is measured in admission, not hidden in llama.cpp's own task queue.

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
import os
import secrets
import shutil
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, AsyncIterator

from llm_sidecar import metrics
from llm_sidecar.config import ModelConfig
from llm_sidecar.metering import Metered
from llm_inference.v1.constraints import choices_grammar
from llm_sidecar.engines.base import (READY, EngineFailed, GenerateFinal, GenerateParams,
                                         GenerationEngine)

_FINISH = {"stop": "stop", "length": "length"}
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


def private_listener(params: Any) -> str:
    """Confine llama.cpp's HTTP server, which xllamacpp cannot leave out, to this process's user.

    Upstream llama.cpp listens on a Unix socket when a host name ends in .sock; the socket sits
    in a fresh 0700 directory (mkdtemp), so no other user can connect.  A random key and closed
    slots and metrics endpoints keep it shut should that directory ever be opened.  Returns the
    directory, for close() to remove."""
    directory = tempfile.mkdtemp(prefix="llmfdw-llama-")
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
        self._http_dir = ""

    async def load(self) -> None:
        import xllamacpp

        cfg = self.config
        params = xllamacpp.CommonParams()
        params.model.path = cfg.path()
        params.n_parallel = cfg.slots()
        params.n_ctx = cfg.context_length * cfg.slots()   # each slot gets context_length
        threads = cfg.threads or os.cpu_count() or 1
        params.cpuparams.n_threads = threads
        params.cpuparams_batch.n_threads = threads
        params.use_jinja = False        # llama.cpp's built-in template for the model
        # llama.cpp keeps finished prompts' KV state in host memory for reuse, 8 GiB by default:
        # with many distinct prompts (one sidecar for many databases) that is what a soak saw as
        # steady growth.  Bound it; engine_args: {cache_ram_mib: N} changes it (0: off).
        params.cache_ram_mib = PROMPT_CACHE_MIB
        for key, value in cfg.engine_args.items():
            setattr(params, key, value)
        if not os.path.exists(params.model.path):
            raise FileNotFoundError(params.model.path)
        self._http_dir = private_listener(params)
        try:
            self._server = await asyncio.to_thread(xllamacpp.Server, params)
        except Exception:   # not on cancellation: the thread may still bind there
            shutil.rmtree(self._http_dir, ignore_errors=True)
            raise
        # One thread per in-flight request; the slots bound real concurrency.
        self._pool = ThreadPoolExecutor(max_workers=max(8, cfg.slots() * 8), thread_name_prefix=cfg.name)
        self.state = READY

    async def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        shutil.rmtree(self._http_dir, ignore_errors=True)   # llama.cpp leaves its socket behind

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
        stop = threading.Event()
        done = object()
        tokens = metrics.ENGINE_TOKENS.labels(self.name)
        decoded = 0

        def on_chunk(chunk: Any) -> bool:
            nonlocal decoded
            if any((ch.get("delta") or {}).get("content") or ch.get("text") for ch in chunk.get("choices", ())):
                tokens.inc()
                decoded += 1
            loop.call_soon_threadsafe(events.put_nowait, chunk)
            return stop.is_set()

        def run() -> None:
            try:
                handler = self._server.handle_chat_completions if kind == "chat" else self._server.handle_completions
                result = handler(body, on_chunk)
                if isinstance(result, dict) and "error" in result:
                    loop.call_soon_threadsafe(events.put_nowait, result)
            except ValueError as err:   # llama.cpp refused this request (std::invalid_argument)
                loop.call_soon_threadsafe(events.put_nowait, {"error": {"message": str(err)}})
            except Exception as err:  # the engine itself broke
                loop.call_soon_threadsafe(events.put_nowait, EngineFailed(str(err)))
            finally:
                loop.call_soon_threadsafe(events.put_nowait, done)

        started = time.monotonic_ns()
        future = loop.run_in_executor(self._pool, run)
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
                stop.set()
                await asyncio.wait({future}, timeout=STOP_WAIT_S)
                usage.output_tokens = decoded
                usage.compute_ns = time.monotonic_ns() - started
