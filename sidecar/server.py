"""The sidecar process: gRPC on a Unix socket (and/or TCP), health, signals.

    python -m llmfdw.sidecar.server --listen unix:///run/llmfdw/sidecar.sock [--config models.yaml]

Models load after the server is listening, so a supervisor can poll
grpc.health.v1 (NOT_SERVING until every model is READY).  SIGTERM/SIGINT
turn health to NOT_SERVING, refuse new calls, give in-flight ones up to
--grace seconds to finish, then exit 0.  A model that fails to load makes
the process exit 2 and an engine that dies makes it exit 3, so that a
supervisor restarts it; after a failed load it first answers health
(NOT_SERVING) and ListModels (the model FAILED, with the error) for
--fail-linger seconds, so that a probe or an operator sees why.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from llmfdw.sidecar import engines, metrics
from llmfdw.sidecar.config import DEFAULT_CONFIG, ConfigError, SidecarConfig, load_config
from llmfdw.sidecar.engines.base import FAILED, READY, Engine
from llmfdw.sidecar.servicer import InferenceServicer
from llmfdw.v1 import llmfdw_pb2_grpc as pb_grpc

log = logging.getLogger("llmfdw.sidecar")
SERVICE = "llmfdw.v1.Inference"
MAX_MESSAGE_BYTES = 64 * 1024 * 1024


class Sidecar:
    def __init__(self, models: dict[str, Engine], config: SidecarConfig, listen: list[str], grace: float,
                 fail_linger: float) -> None:
        self.models = models
        self.listen = listen
        self.grace = grace
        self.fail_linger = fail_linger
        self.exit_code = 0
        self.stopping = asyncio.Event()
        self.health = health.aio.HealthServicer()
        self.server = grpc.aio.server(options=[
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ])
        self.servicer = InferenceServicer(models, config, self.engine_failed)
        pb_grpc.add_InferenceServicer_to_server(self.servicer, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        for address in listen:
            if address.startswith("unix://"):
                path = address[len("unix://"):]
                if os.path.exists(path):
                    os.unlink(path)  # a stale socket from a crashed run
            self.server.add_insecure_port(address)

    async def set_health(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", SERVICE):
            await self.health.set(name, status)

    def engine_failed(self, err: Exception) -> None:
        log.error("engine failed, shutting down: %s", err)
        self.exit_code = 3
        self.stopping.set()

    async def load_models(self) -> None:
        for engine in self.models.values():
            try:
                await engine.load()
                log.info("model %s ready (%s)", engine.name, engine.engine_name)
            except Exception as err:
                engine.state, engine.error = FAILED, f"{type(err).__name__}: {err}"
                log.error("model %s failed to load: %s", engine.name, engine.error)
                self.exit_code = 2
                await asyncio.sleep(self.fail_linger)   # cut short by SIGTERM
                self.stopping.set()
                return
        await self.set_health(True)
        log.info("serving %d model(s) on %s", len(self.models), ", ".join(self.listen))

    async def run(self) -> int:
        await self.set_health(False)
        await self.server.start()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopping.set)
        loader = asyncio.create_task(self.load_models())
        await self.stopping.wait()
        log.info("stopping: %.0f s grace for in-flight requests", self.grace)
        await self.set_health(False)
        loader.cancel()
        if not await self.servicer.drain(self.grace):
            log.warning("grace period over: cancelling the requests still running")
        await self.server.stop(None)
        for engine in self.models.values():
            if engine.state == READY:
                await engine.close()
        log.info("stopped (exit code %d)", self.exit_code)
        return self.exit_code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="llmfdw-sidecar", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="models YAML (default: the packaged one)")
    parser.add_argument("--listen", action="append", required=True,
                        help="unix:///abs/path.sock or host:port; repeatable")
    parser.add_argument("--grace", type=float, default=10.0, help="seconds in-flight calls get on SIGTERM")
    parser.add_argument("--fail-linger", type=float, default=2.0,
                        help="seconds health and ListModels report a failed model load before exiting")
    parser.add_argument("--metrics-port", type=int, default=0,
                        help="serve Prometheus /metrics on 127.0.0.1:PORT (0: off)")
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.metrics_port:
        metrics.serve(args.metrics_port)
    try:
        config = load_config(args.config)
        models = {m.name: engines.build(m) for m in config.models}
        log.info("auth %s; %d tenant(s) configured", config.auth, len(config.tenants))
    except (ConfigError, ValueError) as err:
        log.error("bad configuration: %s", err)
        return 2

    async def serve() -> int:  # gRPC's aio server must be made inside the running loop
        return await Sidecar(models, config, args.listen, args.grace, args.fail_linger).run()

    return asyncio.run(serve())


if __name__ == "__main__":
    sys.exit(main())
