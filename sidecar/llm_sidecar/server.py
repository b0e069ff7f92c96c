"""The sidecar process: gRPC on a Unix socket (and/or TCP), health, signals.

    python -m llm_sidecar.server --listen unix:///run/llmfdw/sidecar.sock [--config models.yaml]
        [--socket-group postgres] [--allow-root]
        [--listen 0.0.0.0:50051 --tls-cert cert.pem --tls-key key.pem [--tls-client-ca ca.pem]]

Models load after the server is listening, so a supervisor can poll
grpc.health.v1 (NOT_SERVING until every model is READY).  SIGTERM/SIGINT
turn health to NOT_SERVING, refuse new calls, give in-flight ones up to
--grace seconds to finish, then exit 0.  A model that fails to load makes
the process exit 2 and an engine that dies makes it exit 3, so that a
supervisor restarts it; after a failed load it first answers health
(NOT_SERVING) and ListModels (the model FAILED, with the error) for
--fail-linger seconds, so that a probe or an operator sees why.

Socket security.  Whoever can connect to the socket can run every model and
read usage, so the socket is private from the moment it exists: the process
umask is 0o077, so bind() creates it owner-only (0700, then chmod 0600: the x
bit means nothing on a socket), owned by the sidecar's user.  With
--socket-group NAME (the sidecar and Postgres run as different users sharing
group NAME) it is then given to that group with mode 0660; until then only
its owner can connect.  It is never world-accessible.  The sidecar runs model
code on prompts from any database role, so it refuses to run as root unless
--allow-root says so.

TCP security.  --tls-cert/--tls-key serve TLS on every TCP listener (Unix
sockets stay plain: their mode is the boundary), and --tls-client-ca also
requires a client certificate signed by that CA (llm_sidecar/tls.py).  A
plain-text TCP listener on a non-loopback address is logged as a warning.

Logging.  The log names roles, databases and sessions, one line per request.
By default it goes to stderr (a container's log).  With --log-file PATH the
sidecar writes it itself: mode 0600, renamed to PATH.1 ... PATH.N when it
reaches --log-max-bytes (--log-backups N), and its stdout and stderr (where
native code such as llama.cpp logs, and where a crash's traceback goes) are
pointed at the current file too, so that nothing grows past the rotation.
"""
from __future__ import annotations

import argparse
import asyncio
import grp
import logging
import logging.handlers
import os
import signal
import stat
import sys

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from llm_sidecar import engines, metrics
from llm_sidecar.config import DEFAULT_CONFIG, ConfigError, SidecarConfig, load_config
from llm_sidecar.engines.base import FAILED, READY, Engine
from llm_sidecar.servicer import InferenceServicer
from llm_sidecar.tls import server_credentials
from llm_inference.v1 import inference_pb2 as pb
from llm_inference.v1 import inference_pb2_grpc as pb_grpc

log = logging.getLogger("llm_sidecar")
SERVICE = pb.DESCRIPTOR.services_by_name["Inference"].full_name   # "llm_inference.v1.Inference"
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
# Connecting to a Unix socket needs write permission on it: owner only, or owner and group.
PRIVATE_SOCKET_MODE = 0o600
GROUP_SOCKET_MODE = 0o660
PRIVATE_LOG_MODE = 0o600    # the log names roles, databases and sessions
STOP_GRACE_S = 2.0          # after the drain, for the calls that were arriving: they end with a refusal


class LogFile(logging.handlers.RotatingFileHandler):
    """The log file, rotated by size, that also holds this process's stdout and stderr.

    Every (re)opening makes the file private and points file descriptors 1 and 2 at it: native
    libraries write there directly, and they must follow the rotation or keep one renamed file
    growing forever.  Their bytes count toward the size checked at each log record."""

    def _open(self):
        stream = super()._open()
        os.fchmod(stream.fileno(), PRIVATE_LOG_MODE)   # an older file may be looser
        sys.stdout.flush()
        sys.stderr.flush()
        for fd in (1, 2):
            os.dup2(stream.fileno(), fd)
        return stream


def setup_logging(level: str, log_file: str | None, max_bytes: int, backups: int) -> None:
    """Log to stderr, or to `log_file` (see LogFile) when one is given."""
    handler: logging.Handler = logging.StreamHandler(sys.stderr)
    if log_file is not None:
        handler = LogFile(log_file, maxBytes=max_bytes, backupCount=backups)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    logging.basicConfig(level=level.upper(), handlers=[handler])


def positive_int(text: str) -> int:
    """argparse type for sizes and counts where 0 would turn rotation off."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


class SocketError(Exception):
    """A Unix socket path that cannot be made, or cannot be given to the requested group."""


def unix_path(address: str) -> str | None:
    """The filesystem path of a unix:// listen address, None for TCP."""
    return address[len("unix://"):] if address.startswith("unix://") else None


def remove_stale_socket(path: str) -> None:
    """Unlink a socket left by a crashed run; refuse to delete anything that is not a socket."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise SocketError(f"{path} exists and is not a socket: not removing it")
    os.unlink(path)


def restrict_socket(path: str, gid: int | None) -> None:
    """Set a freshly bound (owner-only) socket's final mode: 0600, or 0660 for group `gid`.

    The group is changed before the mode, so the group bits never apply to the wrong group."""
    if gid is not None:
        try:
            os.chown(path, -1, gid)
        except PermissionError:
            raise SocketError(f"cannot give {path} to group {grp.getgrgid(gid).gr_name}: the "
                              f"sidecar's user must be a member of that group") from None
    os.chmod(path, PRIVATE_SOCKET_MODE if gid is None else GROUP_SOCKET_MODE)


def loopback(address: str) -> bool:
    """Whether a host:port listen address is reachable from this machine only."""
    host = address.rsplit(":", 1)[0].strip("[]")
    return host in ("localhost", "::1") or host.startswith("127.")


class Sidecar:
    def __init__(self, models: dict[str, Engine], config: SidecarConfig, listen: list[str], grace: float,
                 fail_linger: float, socket_gid: int | None = None,
                 tls: grpc.ServerCredentials | None = None, max_connection_age: float = 0) -> None:
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
            # A client that connected long ago is asked (GOAWAY) to connect again, and so to resolve
            # its dns:/// name again: that is how backends find sidecar pods added since.  Calls
            # under way on the old connection finish there (no grace limit).
            *([("grpc.max_connection_age_ms", int(max_connection_age * 1000))] if max_connection_age else []),
        ])
        self.servicer = InferenceServicer(models, config, self.engine_failed)
        for engine in models.values():
            engine.on_failure = self.engine_failed
        pb_grpc.add_InferenceServicer_to_server(self.servicer, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        if tls is not None and all(unix_path(a) is not None for a in listen):
            log.warning("--tls-cert is given but every listener is a Unix socket, which serves no TLS")
        for address in listen:
            path = unix_path(address)
            if path is not None:
                remove_stale_socket(path)
            # gRPC binds and listens here; the umask (main) made the socket owner-only.  A socket's
            # boundary is its file mode; TCP gets TLS when it is configured.
            if path is None and tls is not None:
                self.server.add_secure_port(address, tls)
                continue
            if path is None and not loopback(address):
                log.warning("listening on %s without TLS: prompts, outputs and tokens cross the network "
                            "in clear text; pass --tls-cert and --tls-key", address)
            self.server.add_insecure_port(address)
            if path is not None:
                restrict_socket(path, socket_gid)

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
        # Calls still arrive after the drain (the client has not seen NOT_SERVING yet).  A graceful
        # stop sends GOAWAY and lets those our handlers began end with the draining refusal
        # (UNAVAILABLE); those gRPC core received but had not handed on are cancelled whatever we
        # do (CANCELLED, no headers).  The client retries both elsewhere (client.py RETRY_POLICY).
        await self.server.stop(STOP_GRACE_S)
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
    parser.add_argument("--max-connection-age", type=float, default=0, metavar="SECONDS",
                        help="ask each client to reconnect after about this long (gRPC adds 10%% jitter), "
                             "so that clients of a DNS name see sidecars added since (0: never)")
    parser.add_argument("--fail-linger", type=float, default=2.0,
                        help="seconds health and ListModels report a failed model load before exiting")
    parser.add_argument("--metrics-port", type=int, default=0,
                        help="serve Prometheus /metrics on PORT (0: off)")
    parser.add_argument("--metrics-address", default="127.0.0.1",
                        help="the address /metrics listens on (default 127.0.0.1: this machine only; "
                             "0.0.0.0 in a pod, for Prometheus to scrape)")
    parser.add_argument("--socket-group", metavar="NAME",
                        help="give Unix sockets to this group, mode 0660 (default: owner only, 0600); "
                             "for a sidecar and Postgres that run as different users in one group")
    parser.add_argument("--tls-cert", metavar="PEM", help="serve TLS on the TCP listeners with this certificate "
                                                          "(chain); needs --tls-key")
    parser.add_argument("--tls-key", metavar="PEM", help="the private key of --tls-cert")
    parser.add_argument("--tls-client-ca", metavar="PEM",
                        help="require a client certificate signed by this CA (mutual TLS; needs --tls-cert)")
    parser.add_argument("--allow-root", action="store_true",
                        help="run even as root (refused by default: run it as the Postgres server's user)")
    parser.add_argument("--log-level", default="info")
    parser.add_argument("--log-file", metavar="PATH",
                        help="log to PATH (mode 0600, rotated by size; stdout and stderr go there too) "
                             "instead of stderr")
    parser.add_argument("--log-max-bytes", type=positive_int, default=10 * 1024 * 1024, metavar="N",
                        help="with --log-file: rename it to PATH.1 at about N bytes (default 10 MiB)")
    parser.add_argument("--log-backups", type=positive_int, default=4, metavar="N",
                        help="with --log-file: keep N renamed files, PATH.1 (newest) to PATH.N (default 4)")
    args = parser.parse_args(argv)
    # Everything this process creates is private: its log, its sockets from bind() on (see the
    # module doc), and its caches.
    os.umask(0o077)
    try:
        setup_logging(args.log_level, args.log_file, args.log_max_bytes, args.log_backups)
    except OSError as err:
        print(f"llmfdw-sidecar: cannot open the log file: {err}", file=sys.stderr)
        return 2
    if os.geteuid() == 0 and not args.allow_root:
        log.error("refusing to run as root: the sidecar runs model code on input from any database "
                  "role. Run it as the Postgres server's OS user (or as a user in its group, with "
                  "--socket-group), or pass --allow-root to run as root anyway")
        return 2
    socket_gid = None
    if args.socket_group is not None:
        try:
            socket_gid = grp.getgrnam(args.socket_group).gr_gid
        except KeyError:
            log.error("--socket-group: no group named %s", args.socket_group)
            return 2
    tls = None
    if args.tls_cert or args.tls_key or args.tls_client_ca:
        if not (args.tls_cert and args.tls_key):
            log.error("TLS needs both --tls-cert and --tls-key")
            return 2
        try:
            tls = server_credentials(args.tls_cert, args.tls_key, args.tls_client_ca)
        except PermissionError as err:
            log.error("TLS: %s", err)
            return 2
        except OSError as err:
            log.error("TLS: cannot read %s: %s", err.filename, err.strerror)
            return 2
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.metrics_port:
        metrics.serve(args.metrics_port, args.metrics_address)
    try:
        config = load_config(args.config)
        models = {m.name: engines.build(m) for m in config.models}
        log.info("auth %s; %d tenant(s) configured", config.auth, len(config.tenants))
        if any(t.token for t in config.tenants) and os.stat(args.config).st_mode & 0o004:
            log.warning("%s holds tenants' tokens and every user of this host may read it: chmod 640 "
                        "or 600 it (tokens in a Kubernetes Secret: the chart joins them in memory)",
                        args.config)
    except (ConfigError, ValueError) as err:
        log.error("bad configuration: %s", err)
        return 2

    async def serve() -> int:  # gRPC's aio server must be made inside the running loop
        try:
            sidecar = Sidecar(models, config, args.listen, args.grace, args.fail_linger, socket_gid, tls,
                              args.max_connection_age)
        except SocketError as err:
            log.error("%s", err)
            return 2
        return await sidecar.run()

    return asyncio.run(serve())


if __name__ == "__main__":
    sys.exit(main())
