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

import queue
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Callable, Iterator

import grpc

from llmfdw.fdw.errors import LlmError, QueryCanceled, error_from_rpc
from llmfdw.v1 import llmfdw_pb2 as pb
from llmfdw.v1 import llmfdw_pb2_grpc as pb_grpc

# How often a waiting call asks Postgres whether to stop.
POLL_SECONDS = 0.02
# Calls one scan keeps open at once (prompt = ANY(array) runs its prompts
# concurrently so the sidecar batches them, but not thousands at a time).
MAX_IN_FLIGHT = 16
MAX_MESSAGE_BYTES = 64 * 1024 * 1024

_channels: dict[str, grpc.Channel] = {}
_END = object()


def channel_for(address: str) -> grpc.Channel:
    """The cached channel to `address`: a backend pays the connection once."""
    chan = _channels.get(address)
    if chan is None:
        chan = grpc.insecure_channel(
            address,
            options=[
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ],
        )
        _channels[address] = chan
    return chan


@dataclass
class CallControl:
    """How a call learns that Postgres gave up on it, and its time budget."""

    should_stop: Callable[[], bool]
    time_left: Callable[[], float | None]
    timeout: float


class SidecarClient:
    """Typed calls to the llmfdw.v1.Inference service."""

    def __init__(self, address: str, control: CallControl) -> None:
        self.address = address
        self.control = control
        self.stub = pb_grpc.InferenceStub(channel_for(address))

    def _deadline(self) -> float:
        left = self.control.time_left()
        return self.control.timeout if left is None else max(0.001, min(self.control.timeout, left))

    def generate(self, request: pb.GenerateRequest) -> Iterator[pb.GenerateResponse]:
        return self._stream(self.stub.Generate, request)

    def embed(self, request: pb.EmbedRequest) -> Iterator[pb.EmbedResponse]:
        return self._stream(self.stub.Embed, request)

    def list_models(self, request: pb.ListModelsRequest) -> pb.ListModelsResponse:
        return self._unary(self.stub.ListModels, request)

    def usage(self, request: pb.UsageRequest) -> pb.UsageResponse:
        return self._unary(self.stub.Usage, request)

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

    def _streams(self, method, requests, unary: bool = False):
        """Run the calls with at most MAX_IN_FLIGHT open at once, all under one
        deadline; yield (request index, message) in arrival order."""
        inbox: queue.Queue = queue.Queue()
        calls = []
        deadline = time.monotonic() + self._deadline()
        pending = iter(enumerate(requests))

        def start_next() -> bool:
            nxt = next(pending, None)
            if nxt is None:
                return False
            index, request = nxt
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
            return True

        try:
            open_calls = sum(start_next() for _ in range(MAX_IN_FLIGHT))
            while open_calls:
                try:
                    index, item = inbox.get(timeout=POLL_SECONDS)
                except queue.Empty:
                    if self.control.should_stop():
                        raise QueryCanceled("query canceled")
                    continue
                if item is _END:
                    open_calls += start_next() - 1  # a call ended: start the next, if any
                elif isinstance(item, grpc.RpcError):
                    raise error_from_rpc(item, self.address)
                else:
                    yield index, item
        finally:
            for call in calls:
                call.cancel()


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
