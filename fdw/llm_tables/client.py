"""The FDW's gRPC client for the sidecar: one channel per address per backend.

Every call is interruptible: responses are read by a helper thread into a
queue, and the calling thread waits on that queue in short slices, asking
Postgres between slices whether the query was cancelled (Ctrl-C,
pg_cancel_backend, statement_timeout).  On a cancel the gRPC call is
cancelled, which cancels the handler in the sidecar and stops the engine.
The deadline of each call is the smaller of the server's `timeout` option
and the time left under statement_timeout.

Work in flight is bounded by what the consumer takes.  A query with many
requests (prompt = ANY of a million prompts) builds each request only when
the window has room for it and keeps state only for the calls in flight.
And a consumer that stops reading (an idle cursor between FETCHes: the
generator is suspended and nothing here runs) does not keep the engine busy:
a watchdog thread cancels, after IDLE_SECONDS, the open calls none of whose
results the consumer has had yet, and they are sent again once it reads on.
A restarted call is recomputed from scratch, so no result is given twice.
"""
from __future__ import annotations

import collections
import heapq
import json
import os
import queue
import re
import threading
import time
import uuid
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

import grpc

from llm_tables import interrupts
from llm_tables.errors import (INVALID_PARAMETER_VALUE, PROGRAM_LIMIT_EXCEEDED, LlmError, QueryCanceled,
                                error_from_rpc, mark_of)
from llm_tables.tls import TlsSettings
from llm_inference.v1 import inference_pb2 as pb
from llm_inference.v1 import inference_pb2_grpc as pb_grpc

# How often a waiting call asks Postgres whether to stop where it must poll (under a real
# Multicorn2): a cancel waits half of it on average.  Inside the llmfdw host a waiting backend
# sleeps in Postgres's own wait instead, woken at once by a message or a signal (_Inbox), and
# this is only how often it also asks while messages keep coming.
POLL_SECONDS = 0.005
# The longest such a sleep lasts with nothing happening (a safety net: a signal wakes it).
HOST_WAIT_SECONDS = 1.0
# Calls one scan keeps open at once (prompt = ANY(array) runs its prompts
# concurrently so the sidecar batches them, but not thousands at a time).
MAX_IN_FLIGHT = 16
EMBED_WINDOW = 2   # parts of one embedding query in flight (embed_many)
# A consumer that has not asked for the next result for this long (an idle cursor) has its
# unstarted-for-it calls cancelled; they run again when it reads on (see the module docstring).
IDLE_SECONDS = 0.5
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
# gRPC's default reconnect backoff grows to 120 s: a backend that queried while the sidecar
# was down kept failing for seconds after it came back.  Retry the connection at least every
# second instead (a local socket is cheap to try): initial and max are the waits between
# attempts.  "min" is not a wait: gRPC core takes min_reconnect_backoff_ms as the minimum
# connect timeout, the time one attempt may take until the server's SETTINGS frame arrives
# (doc/connection-backoff.md: TryConnect(max(deadline, now + MIN_CONNECT_TIMEOUT)), then
# SleepUntil(deadline)).  At 100 ms a busy sidecar failed new sessions' first query with
# "connection attempt timed out before receiving SETTINGS frame".  A dead sidecar is still
# seen at once: connect() to a socket with no process (or no socket file) fails immediately.
RECONNECT_BACKOFF_MS = {"initial": 100, "min": 10000, "max": 1000}
# The sidecar's mark on a RESOURCE_EXHAUSTED that only means "the tenant's queue is full now"
# (see the proto's status contract): a scan with calls of its own still open waits for one of
# them instead.
QUEUE_FULL = "queue-full"

_session_id = uuid.uuid4().hex


def session_id() -> str:
    """This backend's session, for the sidecar's fairness between sessions of one tenant."""
    return _session_id


def _new_session() -> None:
    """A new id in a forked child: backends forked from a postmaster that preloaded this module
    (llmfdw.preload_python) must not share their parent's, and so each other's, session."""
    global _session_id
    _session_id = uuid.uuid4().hex


os.register_at_fork(after_in_child=_new_session)

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
            # A streaming call's messages are read by the thread that iterates it (our _pump),
            # not handed over from a "channel spin" thread that grpc starts whenever a channel
            # goes from no call to one, i.e. on every one-row query of a backend
            ("SingleThreadedUnaryStream", 1),   # grpc.experimental.ChannelOptions.SingleThreadedUnaryStream
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

    def embed_many(self, requests: Iterable[pb.EmbedRequest]) -> Iterator[tuple[int, pb.EmbedResponse]]:
        """The parts of one large embedding query, EMBED_WINDOW calls open at a time (the next
        part is on its way while the sidecar works on one), yielding (part index, message)."""
        return self._streams(self.stub.Embed, requests, window=EMBED_WINDOW)

    def list_models(self, request: pb.ListModelsRequest) -> pb.ListModelsResponse:
        return self._unary(self.stub.ListModels, request)

    def usage(self, request: pb.UsageRequest) -> pb.UsageResponse:
        return self._unary(self.stub.Usage, request)

    def requests(self, request: pb.RequestsRequest) -> pb.RequestsResponse:
        return self._unary(self.stub.Requests, request)

    def chunk(self, request: pb.ChunkRequest) -> pb.ChunkResponse:
        return self._unary(self.stub.Chunk, request)

    def progress(self, request: pb.ProgressRequest) -> pb.ProgressResponse:
        return self._unary(self.stub.Progress, request)

    def rerank(self, request: pb.RerankRequest) -> pb.RerankResponse:
        return self._unary(self.stub.Rerank, request)

    def _unary(self, method, request):
        for response in self._stream(method, request, unary=True):
            return response
        raise LlmError("the sidecar returned no answer")

    def generate_many(self, requests: Iterable[pb.GenerateRequest],
                      row_errors: bool = False) -> Iterator[tuple[int, Generated | LlmError]]:
        """Several Generate calls in flight at once (the sidecar batches them), yielding
        (request index, Generated) as each call finishes.  `requests` is read lazily: a
        request is built only when the window has room for it.  With row_errors, a call that
        failed for a reason of its own (per_row_error) yields its LlmError in place of a
        result, and the others go on; any other failure ends them all, as without it."""
        return self._streams(self.stub.Generate, requests, fold=_fold_generation,
                             per_row=per_row_error if row_errors else None)

    def _stream(self, method, request, unary: bool = False):
        for _, message in self._streams(method, [request], unary=unary):
            yield message

    def _streams(self, method, requests: Iterable, unary: bool = False, window: int = MAX_IN_FLIGHT,
                 fold: Callable[[_Open, Any], Any] | None = None,
                 per_row: Callable[[grpc.RpcError], bool] | None = None) -> Iterator[tuple[int, Any]]:
        """Run the calls with at most `window` open at once, all under one deadline; yield
        (request index, result) in arrival order, where a result is each message, or what
        `fold` makes of a call's messages (it returns None until it has a result).

        Requests are taken from `requests` only when there is room, and a call's state is
        dropped when it ends: memory is bounded by the window, not by the number of requests.
        A call the sidecar turns away because the tenant's queue is full is sent again once
        one of this scan's own calls ends, so a scan never needs more room than its tenant
        has.  While the consumer does not resume this generator (an idle cursor), a watchdog
        cancels the calls it has had nothing of yet; they are sent again when it resumes."""
        inbox = _Inbox()
        deadline = time.monotonic() + self._deadline()
        fresh = enumerate(requests)
        again: list[tuple[int, Any]] = []   # a heap, lowest index first: calls to send again
        opened: dict[int, _Open] = {}
        watchdog = _Watchdog()
        next_poll = time.monotonic() + POLL_SECONDS

        def start(index: int, request) -> None:
            _check_size(request)
            entry = opened[index] = _Open(index, request)
            timeout = max(0.001, deadline - time.monotonic())
            if unary:
                entry.call = method.future(request, timeout=timeout)
                entry.call.add_done_callback(lambda f: _deliver_unary(inbox, entry, f))
            else:
                entry.call = method(request, timeout=timeout)
                threading.Thread(target=_pump, args=(entry.call, entry, inbox), daemon=True,
                                 name="llmfdw-grpc").start()

        def fill() -> None:
            while len(opened) < window:
                if again:
                    start(*heapq.heappop(again))
                elif (item := next(fresh, None)) is not None:
                    start(*item)
                else:
                    return

        try:
            fill()
            while opened:
                # ask Postgres at least every POLL_SECONDS, also while messages keep coming
                # (tokens of several streams arrive faster than that)
                if time.monotonic() >= next_poll:
                    if self.control.should_stop():
                        raise QueryCanceled("query canceled")
                    next_poll = time.monotonic() + POLL_SECONDS
                try:
                    entry, item = inbox.get()
                except queue.Empty:
                    next_poll = 0.0   # woken by a signal (or the wait ran out): ask Postgres now
                    continue
                if opened.get(entry.index) is not entry:
                    continue   # from a call that was cancelled to be sent again
                if item is _END:
                    del opened[entry.index]
                    fill()
                    continue
                if isinstance(item, grpc.RpcError):
                    del opened[entry.index]
                    if opened and not entry.answered and _queue_full(item):
                        heapq.heappush(again, (entry.index, entry.request))
                        window = len(opened)  # wait for one of ours to end before trying again
                        continue
                    if per_row is None or not per_row(item):
                        if item.code() == grpc.StatusCode.UNAVAILABLE and mark_of(item) is None:
                            forget_channel(self.address, self.tls)  # not reachable (the sidecar marks its own)
                        raise error_from_rpc(item, self.address)
                    result = error_from_rpc(item, self.address)   # this call's own failure: its row's
                else:
                    entry.answered = True
                    result = item if fold is None else fold(entry, item)
                    if result is None:
                        continue
                    entry.given = True
                watchdog.arm([e for e in opened.values() if not e.given])
                yield entry.index, result
                for stalled in watchdog.disarm():
                    if opened.get(stalled.index) is stalled:
                        del opened[stalled.index]
                        heapq.heappush(again, (stalled.index, stalled.request))
                fill()
        finally:
            watchdog.disarm()
            for entry in opened.values():
                entry.call.cancel()


@dataclass
class Generated:
    """A finished generation: its whole text and the final message (finish reason, usage)."""

    text: str
    final: pb.GenerateFinal


@dataclass(eq=False)
class _Open:
    """One call in flight (a new one each time a call is sent again): what a restart needs,
    and how far it got."""

    index: int
    request: Any
    call: Any = None
    answered: bool = False   # a message arrived: the sidecar admitted it
    given: bool = False      # the consumer has had a result of it: it can no longer be restarted
    parts: list[str] = field(default_factory=list)   # a generation's deltas so far


def _fold_generation(entry: _Open, message: pb.GenerateResponse) -> Generated | None:
    """Collect a Generate call's deltas; its result once the final message arrives."""
    if message.HasField("delta"):
        entry.parts.append(message.delta)
        return None
    text, entry.parts = "".join(entry.parts), []
    return Generated(text, message.final)


class _Watchdog:
    """Cancels the calls of a suspended consumer.  arm() before a yield starts a timer;
    disarm() after it stops the timer and returns the calls it cancelled (to send again).
    The lock makes the two outcomes exclusive: a consumer that resumes just as the timer
    fires either finds its calls untouched or finds them all on the returned list."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._timer: threading.Timer | None = None
        self._cancelled: list[_Open] = []

    def arm(self, restartable: list[_Open]) -> None:
        if restartable:
            self._timer = threading.Timer(IDLE_SECONDS, self._fire, args=(restartable,))
            self._timer.daemon = True
            self._timer.start()

    def _fire(self, restartable: list[_Open]) -> None:
        with self._lock:
            if self._timer is None:
                return   # the consumer resumed first
            for entry in restartable:
                entry.call.cancel()
            self._cancelled = restartable

    def disarm(self) -> list[_Open]:
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()
            self._timer = None
            cancelled, self._cancelled = self._cancelled, []
        return cancelled


def _check_size(request) -> None:
    size = request.ByteSize()
    if size > MAX_MESSAGE_BYTES:
        raise LlmError(
            f"the request is {size / 2**20:.1f} MiB; requests to the sidecar are limited to "
            f"{MAX_MESSAGE_BYTES // 2**20} MiB",
            hint="Send fewer or shorter inputs per query (split the array), or shorten the prompt.",
            sqlstate=PROGRAM_LIMIT_EXCEEDED)


# Status codes that concern one request only (see the proto's status contract): its own fields
# (a prompt over the model's context: INVALID_ARGUMENT), a bug or an engine error on it
# (INTERNAL), a message over gRPC's size limit (RESOURCE_EXHAUSTED without the sidecar's
# queue-full mark).  Every other code concerns the whole statement: the sidecar unreachable,
# loading or draining, cancel and deadlines, credentials, an unknown model or the wrong task.
ROW_CODES = (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.INTERNAL, grpc.StatusCode.RESOURCE_EXHAUSTED)


def per_row_error(err: grpc.RpcError) -> bool:
    """Whether a failed call failed for a reason of its own (ROW_CODES), which a statement
    with on_error = 'null' reports in that row instead of failing."""
    return err.code() in ROW_CODES and mark_of(err) is None


def _queue_full(err: grpc.RpcError) -> bool:
    """Whether the sidecar turned the call away only because the tenant's queue is full."""
    return err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and mark_of(err) == QUEUE_FULL


class _Inbox:
    """What the gRPC threads hand the backend's thread.  Inside the llmfdw host the backend sleeps
    in Postgres's own wait on an eventfd that put() signals (interrupts.wait_readable), so a
    message or a signal (a cancel sets the latch) wakes it at once and nothing polls: it had woken
    every POLL_SECONDS, 200 times a second per waiting backend.  Elsewhere, a queue polled every
    POLL_SECONDS.  The eventfd is closed when the last thread holding the inbox lets it go (a
    gRPC thread may still put() after the scan ended)."""

    def __init__(self) -> None:
        self._fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) if interrupts.can_wait() else -1
        self._items: collections.deque = collections.deque()
        self._queue: queue.Queue | None = None
        if self._fd < 0:
            self._queue = queue.Queue()
        else:
            weakref.finalize(self, os.close, self._fd)

    def put(self, item: Any) -> None:
        """From any thread."""
        if self._queue is not None:
            self._queue.put(item)
            return
        self._items.append(item)
        os.eventfd_write(self._fd, 1)

    def get(self) -> Any:
        """The next item; queue.Empty when woken without one (a signal, or the wait ran out)."""
        if self._queue is not None:
            return self._queue.get(timeout=POLL_SECONDS)
        if not self._items:
            interrupts.wait_readable(self._fd, HOST_WAIT_SECONDS)
            try:
                os.eventfd_read(self._fd)
            except BlockingIOError:
                pass
        try:
            return self._items.popleft()
        except IndexError:
            raise queue.Empty from None


def _pump(call, entry: _Open, inbox: _Inbox) -> None:
    """Move a streaming call's messages into the inbox (runs in a helper thread)."""
    try:
        for message in call:
            inbox.put((entry, message))
    except grpc.RpcError as err:
        if err.code() != grpc.StatusCode.CANCELLED or not call.cancelled():
            inbox.put((entry, err))
            return
    inbox.put((entry, _END))


def _deliver_unary(inbox: _Inbox, entry: _Open, future) -> None:
    if future.cancelled():
        inbox.put((entry, _END))
        return
    err = future.exception()
    if err is not None:
        inbox.put((entry, err))
    else:
        inbox.put((entry, future.result()))
        inbox.put((entry, _END))


def new_request_id() -> str:
    return uuid.uuid4().hex[:16]
