"""The FDW's gRPC client for the sidecar: one channel per address per backend.

Every call is interruptible: responses are read by a helper thread into a
queue, and the calling thread waits on that queue in short slices, asking
Postgres between slices whether the query was cancelled (Ctrl-C,
pg_cancel_backend, statement_timeout).  On a cancel the gRPC call is
cancelled, which cancels the handler in the sidecar and stops the engine.
The deadline of each call is the smaller of the server's `timeout` option
and the time left under statement_timeout.
"""
from __future__ import annotations

import heapq
import json
import queue
import re
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Callable, Iterator

import grpc

from llm_tables.errors import (INVALID_PARAMETER_VALUE, PROGRAM_LIMIT_EXCEEDED, LlmError, QueryCanceled,
                                error_from_rpc, mark_of)
from llm_tables.tls import TlsSettings
from llm_inference.v1 import inference_pb2 as pb
from llm_inference.v1 import inference_pb2_grpc as pb_grpc

# How often a waiting call asks Postgres whether to stop.
POLL_SECONDS = 0.02
# Calls one scan keeps open at once (prompt = ANY(array) runs its prompts
# concurrently so the sidecar batches them, but not thousands at a time).
MAX_IN_FLIGHT = 16
EMBED_WINDOW = 2   # parts of one embedding query in flight (embed_many)
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
# gRPC's default reconnect backoff grows to 120 s: a backend that queried while the sidecar
# was down kept failing for seconds after it came back.  Retry the connection at least every
# second instead (a local socket is cheap to try).
RECONNECT_BACKOFF_MS = {"initial": 100, "min": 100, "max": 1000}
# The sidecar's mark on a RESOURCE_EXHAUSTED that only means "the tenant's queue is full now"
# (see the proto's status contract): a scan with calls of its own still open waits for one of
# them instead.
QUEUE_FULL = "queue-full"

# This backend's session, for the sidecar's fairness between sessions of one tenant (each
# backend is its own process and imports this module once).
SESSION_ID = uuid.uuid4().hex

# Several sidecars behind one server: the `address` option may list targets separated by commas
# (or be one dns:///name:port, which resolves to every address of a headless Service).  gRPC
# itself balances and retries; nothing here picks a sidecar.
#   - round_robin: every call goes to the next connected sidecar (a broken or closed
#     connection drops out until it reconnects).
#   - retryPolicy on UNAVAILABLE: a call that got no response headers yet (the sidecar was
#     unreachable, was killed before answering, or refused it while draining or loading) is
#     sent again, to the next sidecar.  gRPC commits a call once headers arrive, and the sidecar
#     sends them with its first message (the first token, or an embedding batch), so a
#     generation is retried until its first token and never after: rows already returned are
#     never returned twice.  An embedding call retries until its first message.
#   - and on CANCELLED: a sidecar's gRPC core cancels the calls it had received but not yet handed
#     to the servicer when it stops (after a SIGTERM's drain), with no headers, so they retry
#     elsewhere too.  A cancel from this side (Postgres gave up) is never retried by gRPC.
# One sidecar (one unix:// socket or one IP address) gets round_robin but no retries: trying the
# same dead sidecar again only delays the error, and keeps the channel (and its reconnect
# backoff) that forget_channel would replace, so a restarted sidecar would be seen later.
SERVICE = pb.DESCRIPTOR.services_by_name["Inference"].full_name   # "llm_inference.v1.Inference"
RETRY_POLICY = {
    "maxAttempts": 5,             # gRPC caps it at 5: the first try and four more
    "initialBackoff": "0.05s",
    "maxBackoff": "0.5s",
    "backoffMultiplier": 2,
    "retryableStatusCodes": ["UNAVAILABLE", "CANCELLED"],
}
SERVICE_CONFIG = json.dumps({
    "loadBalancingConfig": [{"round_robin": {}}],
    "methodConfig": [{"name": [{"service": SERVICE}], "retryPolicy": RETRY_POLICY}],
})
SINGLE_SERVICE_CONFIG = json.dumps({"loadBalancingConfig": [{"round_robin": {}}]})
_IPV4 = re.compile(r"^(?:ipv4:)?(\d{1,3}(?:\.\d{1,3}){3}:\d+)$")
_IPV6 = re.compile(r"^(?:ipv6:)?(\[[0-9A-Fa-f:.%]+\]:\d+)$")
_UNIX = re.compile(r"^(?:unix:(?://)?)?(/[^,]+)$")   # a bare /path continues a unix:///a,/b list

_channels: dict[tuple[str, TlsSettings | None], tuple[grpc.Channel, tuple]] = {}   # -> (channel, TLS files' stamp)
_END = object()


def channel_target(address: str) -> str:
    """The gRPC target for a server's `address` option.

    One target is used as it is (unix:///path, host:port, dns:///name:port).  A comma-separated
    list (`127.0.0.1:50051,127.0.0.1:50052`, `unix:///a.sock,unix:///b.sock`) becomes the one
    target gRPC's resolvers accept for several addresses of one kind: `ipv4:a:p,b:p`,
    `ipv6:[a]:p,[b]:p` or `unix:///path/a,/path/b` (all three split on commas).  gRPC has no
    target for several host names or for a mix of kinds."""
    parts = [p.strip() for p in address.split(",") if p.strip()]
    if len(parts) <= 1:
        return parts[0] if parts else address
    for pattern, join in ((_IPV4, "ipv4:"), (_IPV6, "ipv6:"), (_UNIX, "unix://")):
        matches = [pattern.match(p) for p in parts]
        if all(matches):
            return join + ",".join(m.group(1) for m in matches)
    raise LlmError(
        f"the address {address!r} lists several sidecars that gRPC cannot balance over: each must be "
        "an IPv4 address with a port (10.0.0.5:50051), an [IPv6]:port, or a unix:///abs/path.sock, "
        "all of one kind",
        hint="For a DNS name that stands for several sidecars (a Kubernetes headless Service) give that one "
             "name: ALTER SERVER llm_sidecar OPTIONS (SET address 'dns:///llmfdw-sidecar.ns.svc:50051');",
        sqlstate=INVALID_PARAMETER_VALUE)


def several_sidecars(target: str) -> bool:
    """Whether a gRPC target may stand for several sidecars: a list, or a name that DNS
    resolves (a headless Service gives one address per pod).  Not one socket or one IP."""
    if "," in target or target.startswith("dns:"):
        return True
    if target.startswith(("unix:", "unix-abstract:", "ipv4:", "ipv6:", "vsock:")):
        return False
    return not (_IPV4.match(target) or _IPV6.match(target))


def channel_for(address: str, tls: TlsSettings | None = None) -> grpc.Channel:
    """The cached channel to `address` (one sidecar, or several: see channel_target), over TLS
    when `tls` is given: a backend pays the connection once, and again when the TLS files
    change (the replaced channel closes when the calls still using it let it go)."""
    stamp = tls.stamp() if tls is not None else ()
    chan, made_from = _channels.get((address, tls), (None, None))
    if chan is None or made_from != stamp:
        target = channel_target(address)
        options = [
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            *((f"grpc.{name}_reconnect_backoff_ms", ms) for name, ms in RECONNECT_BACKOFF_MS.items()),
            ("grpc.service_config", SERVICE_CONFIG if several_sidecars(target) else SINGLE_SERVICE_CONFIG),
            ("grpc.service_config_disable_resolution", 1),   # never a config from DNS TXT records
            ("grpc.enable_retries", 1),
        ]
        if tls is None:
            chan = grpc.insecure_channel(target, options=options)
        else:
            chan = grpc.secure_channel(target, tls.credentials(), options=options + tls.channel_options())
        _channels[(address, tls)] = (chan, stamp)
    return chan


def forget_channel(address: str, tls: TlsSettings | None = None) -> None:
    """Close the cached channel after the sidecar was unreachable: the next call connects
    afresh instead of waiting out the old channel's backoff."""
    chan, _ = _channels.pop((address, tls), (None, None))
    if chan is not None:
        chan.close()


@dataclass
class CallControl:
    """How a call learns that Postgres gave up on it, and its time budget."""

    should_stop: Callable[[], bool]
    time_left: Callable[[], float | None]
    timeout: float


class SidecarClient:
    """Typed calls to the llm_inference.v1.Inference service."""

    def __init__(self, address: str, control: CallControl, tls: TlsSettings | None = None) -> None:
        self.address = address
        self.control = control
        self.tls = tls
        self._channel: grpc.Channel | None = None
        self._stub: pb_grpc.InferenceStub | None = None

    @property
    def stub(self) -> pb_grpc.InferenceStub:
        """A stub on the current channel (a new one after forget_channel)."""
        chan = channel_for(self.address, self.tls)
        if chan is not self._channel:
            self._channel, self._stub = chan, pb_grpc.InferenceStub(chan)
        return self._stub

    def _deadline(self) -> float:
        left = self.control.time_left()
        return self.control.timeout if left is None else max(0.001, min(self.control.timeout, left))

    def generate(self, request: pb.GenerateRequest) -> Iterator[pb.GenerateResponse]:
        return self._stream(self.stub.Generate, request)

    def embed(self, request: pb.EmbedRequest) -> Iterator[pb.EmbedResponse]:
        return self._stream(self.stub.Embed, request)

    def embed_many(self, requests: list[pb.EmbedRequest]) -> Iterator[tuple[int, pb.EmbedResponse]]:
        """The parts of one large embedding query, EMBED_WINDOW calls open at a time (the next
        part is on its way while the sidecar works on one), yielding (part index, message)."""
        return self._streams(self.stub.Embed, requests, window=EMBED_WINDOW)

    def list_models(self, request: pb.ListModelsRequest) -> pb.ListModelsResponse:
        return self._unary(self.stub.ListModels, request)

    def usage(self, request: pb.UsageRequest) -> pb.UsageResponse:
        return self._unary(self.stub.Usage, request)

    def requests(self, request: pb.RequestsRequest) -> pb.RequestsResponse:
        return self._unary(self.stub.Requests, request)

    def _unary(self, method, request):
        for response in self._stream(method, request, unary=True):
            return response
        raise LlmError("the sidecar returned no answer")

    def generate_many(self, requests: list[pb.GenerateRequest]) -> Iterator[tuple[int, pb.GenerateResponse]]:
        """Several Generate calls in flight at once (the sidecar batches them),
        yielding (request index, message) as messages arrive."""
        return self._streams(self.stub.Generate, requests)

    def _stream(self, method, request, unary: bool = False):
        for _, message in self._streams(method, [request], unary=unary):
            yield message

    def _streams(self, method, requests, unary: bool = False, window: int = MAX_IN_FLIGHT):
        """Run the calls with at most `window` open at once, all under one
        deadline; yield (request index, message) in arrival order.  A call the
        sidecar turns away because the tenant's queue is full is sent again
        once one of this scan's own calls ends, so a scan never needs more
        room than its tenant has."""
        for request in requests:
            _check_size(request)
        inbox: queue.Queue = queue.Queue()
        calls = []
        deadline = time.monotonic() + self._deadline()
        pending = list(enumerate(requests))  # a heap: lowest index first
        open_calls = 0
        answered: set[int] = set()
        next_poll = time.monotonic() + POLL_SECONDS

        def start_next() -> None:
            index, request = heapq.heappop(pending)
            timeout = max(0.001, deadline - time.monotonic())
            if unary:
                future = method.future(request, timeout=timeout)
                future.add_done_callback(lambda f, i=index: _deliver_unary(inbox, i, f))
                calls.append(future)
            else:
                call = method(request, timeout=timeout)
                calls.append(call)
                threading.Thread(target=_pump, args=(call, index, inbox), daemon=True,
                                 name="llmfdw-grpc").start()

        try:
            while open_calls or pending:
                while pending and open_calls < window:
                    start_next()
                    open_calls += 1
                # ask Postgres at least every POLL_SECONDS, also while messages keep coming
                # (tokens of several streams arrive faster than that)
                if time.monotonic() >= next_poll:
                    if self.control.should_stop():
                        raise QueryCanceled("query canceled")
                    next_poll = time.monotonic() + POLL_SECONDS
                try:
                    index, item = inbox.get(timeout=POLL_SECONDS)
                except queue.Empty:
                    continue
                if item is _END:
                    open_calls -= 1
                elif isinstance(item, grpc.RpcError):
                    open_calls -= 1
                    if open_calls and index not in answered and _queue_full(item):
                        heapq.heappush(pending, (index, requests[index]))
                        window = open_calls  # wait for one of ours to end before trying again
                        continue
                    if item.code() == grpc.StatusCode.UNAVAILABLE and mark_of(item) is None:
                        forget_channel(self.address, self.tls)  # not reachable (the sidecar marks its own)
                    raise error_from_rpc(item, self.address)
                else:
                    answered.add(index)
                    yield index, item
        finally:
            for call in calls:
                call.cancel()


def _check_size(request) -> None:
    size = request.ByteSize()
    if size > MAX_MESSAGE_BYTES:
        raise LlmError(
            f"the request is {size / 2**20:.1f} MiB; requests to the sidecar are limited to "
            f"{MAX_MESSAGE_BYTES // 2**20} MiB",
            hint="Send fewer or shorter inputs per query (split the array), or shorten the prompt.",
            sqlstate=PROGRAM_LIMIT_EXCEEDED)


def _queue_full(err: grpc.RpcError) -> bool:
    """Whether the sidecar turned the call away only because the tenant's queue is full."""
    return err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and mark_of(err) == QUEUE_FULL


def _pump(call, index: int, inbox: queue.Queue) -> None:
    """Move a streaming call's messages into the inbox (runs in a helper thread)."""
    try:
        for message in call:
            inbox.put((index, message))
    except grpc.RpcError as err:
        if err.code() != grpc.StatusCode.CANCELLED or not call.cancelled():
            inbox.put((index, err))
            return
    inbox.put((index, _END))


def _deliver_unary(inbox: queue.Queue, index: int, future) -> None:
    if future.cancelled():
        inbox.put((index, _END))
        return
    err = future.exception()
    if err is not None:
        inbox.put((index, err))
    else:
        inbox.put((index, future.result()))
        inbox.put((index, _END))


def new_request_id() -> str:
    return uuid.uuid4().hex[:16]
