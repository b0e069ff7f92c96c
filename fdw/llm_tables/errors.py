"""Errors the FDW classes raise, written for the SQL user who will read them.

LlmError carries a hint and a SQLSTATE; the host turns it into
``ERROR: <message> / HINT: <hint>`` with that code.  It subclasses Multicorn's
exception so that a real Multicorn2 reports it cleanly too.
"""
from __future__ import annotations

import grpc

from multicorn.utils import MulticornException

try:  # llmfdw's own multicorn (fdw/multicorn) has it; a real Multicorn2's utils does not
    from multicorn.utils import QueryCanceled
except ImportError:
    class QueryCanceled(Exception):  # type: ignore[no-redef]
        """Postgres asked the running query to stop."""

__all__ = ["LlmError", "QueryCanceled", "error_from_rpc"]

# SQLSTATEs (https://www.postgresql.org/docs/current/errcodes-appendix.html)
FDW_ERROR = "HV000"
INVALID_PARAMETER_VALUE = "22023"
FDW_UNABLE_TO_ESTABLISH_CONNECTION = "HV00N"
UNDEFINED_OBJECT = "42704"
INVALID_AUTHORIZATION = "28000"
TOO_MANY_CONNECTIONS = "53300"
QUERY_CANCELED = "57014"
OBJECT_NOT_IN_PREREQUISITE_STATE = "55000"
PROGRAM_LIMIT_EXCEEDED = "54000"
CANNOT_CONNECT_NOW = "57P03"


class LlmError(MulticornException):
    def __init__(self, message: str, hint: str | None = None, sqlstate: str = FDW_ERROR,
                 detail: str | None = None) -> None:
        # Not MulticornException.__init__: Multicorn2's takes (message, code, hint, detail),
        # ours (message, hint, detail, sqlstate).  These attributes serve both hosts.
        Exception.__init__(self, message)
        self.message, self.hint, self.detail, self.sqlstate = message, hint, detail, sqlstate
        self.code = 3  # Multicorn2: report as an ERROR, with message, hint and detail, no traceback
        self._is_multicorn_exception = True


# The sidecar's marks in trailing metadata (see the status contract in proto/llm_inference/v1/inference.proto):
# a status code that may carry one -> the metadata key.  UNAVAILABLE with "llmfdw-unavailable"
# means the sidecar is up but cannot serve now; without it, gRPC could not reach the sidecar.
# RESOURCE_EXHAUSTED with "llmfdw-rejected" means the tenant is at its limits; without it, gRPC
# refused a message over its size limit.
UNAVAILABLE_KEY, REJECTED_KEY = "llmfdw-unavailable", "llmfdw-rejected"
_MARK_KEYS = {grpc.StatusCode.UNAVAILABLE: UNAVAILABLE_KEY, grpc.StatusCode.RESOURCE_EXHAUSTED: REJECTED_KEY}
ANY_MARK = "*"   # a mark this client does not know (a newer sidecar): the code's generic marked entry

_RETRY_HINT = "Retry shortly; SELECT name, state, error FROM llm.models; shows each model."

# (status code, mark) -> (message template, hint, SQLSTATE); templates see {address}, {text}, {code}.
# mark: the value of the code's key in _MARK_KEYS, or None when the call carries none.
_BY_CODE: dict[tuple[grpc.StatusCode, str | None], tuple[str, str | None, str]] = {
    (grpc.StatusCode.UNAVAILABLE, None): (
        "the llmfdw sidecar at {address} is not reachable: {text}",
        "Start it (make up), or point the server at it: "
        "ALTER SERVER llm_sidecar OPTIONS (SET address 'unix:///path/to/sidecar.sock').",
        FDW_UNABLE_TO_ESTABLISH_CONNECTION),
    (grpc.StatusCode.UNAVAILABLE, "loading"): ("{text}", _RETRY_HINT, CANNOT_CONNECT_NOW),
    (grpc.StatusCode.UNAVAILABLE, "failed"): (
        "{text}", "The sidecar restarts (its supervisor starts it again); "
                  "SELECT name, state, error FROM llm.models; shows why the model failed.",
        CANNOT_CONNECT_NOW),
    (grpc.StatusCode.UNAVAILABLE, "restarting"): (
        "{text}", "Run the statement again in a few seconds, once the model has loaded in its new process; "
                  "SELECT name, state, error FROM llm.models; shows it.", CANNOT_CONNECT_NOW),
    (grpc.StatusCode.UNAVAILABLE, "draining"): (
        "{text}", "Retry shortly: the sidecar is restarting.", CANNOT_CONNECT_NOW),
    (grpc.StatusCode.UNAVAILABLE, ANY_MARK): ("{text}", _RETRY_HINT, CANNOT_CONNECT_NOW),
    (grpc.StatusCode.RESOURCE_EXHAUSTED, "queue-full"): (
        "the sidecar is at its limit for this tenant: {text}",
        "Retry later, or ask the operator to raise the tenant's limits.", TOO_MANY_CONNECTIONS),
    (grpc.StatusCode.RESOURCE_EXHAUSTED, ANY_MARK): (
        "the sidecar is at its limit for this tenant: {text}",
        "Retry later, or ask the operator to raise the tenant's limits.", TOO_MANY_CONNECTIONS),
    (grpc.StatusCode.RESOURCE_EXHAUSTED, None): (
        "a message to or from the sidecar is too large: {text}",
        "Send fewer or shorter inputs per query (split the array).", PROGRAM_LIMIT_EXCEEDED),
    (grpc.StatusCode.NOT_FOUND, None): (
        "{text}", "SELECT name, task FROM llm.models; lists the models the sidecar serves.", UNDEFINED_OBJECT),
    (grpc.StatusCode.INVALID_ARGUMENT, None): ("{text}", None, INVALID_PARAMETER_VALUE),
    (grpc.StatusCode.FAILED_PRECONDITION, None): (
        "{text}", "SELECT name, task, state FROM llm.models; shows what each model can do.",
        OBJECT_NOT_IN_PREREQUISITE_STATE),
    (grpc.StatusCode.DEADLINE_EXCEEDED, None): (
        "the sidecar did not answer in time: {text}",
        "Raise the server's timeout option (seconds) or statement_timeout, or ask for fewer tokens.",
        QUERY_CANCELED),
    (grpc.StatusCode.UNAUTHENTICATED, None): (
        "the sidecar refused the credentials: {text}",
        "Set the token in your user mapping: "
        "ALTER USER MAPPING FOR CURRENT_USER SERVER llm_sidecar OPTIONS (SET token '...').",
        INVALID_AUTHORIZATION),
}
# Over TCP "not reachable" is also what a TLS mismatch looks like ("Socket closed" when one side
# speaks TLS and the other does not, or the sidecar refuses the client's certificate).
_TCP_UNREACHABLE_HINT = (
    "Check that a sidecar listens at that address and that this host may reach it. A sidecar that "
    "serves TLS (--tls-cert) needs tls_ca_file on the server; one that asks for client certificates "
    "(--tls-client-ca) also tls_cert_file and tls_key_file; an address its certificate does not name, "
    "tls_server_name. A sidecar without TLS needs none of them.")
_OTHER = ("the sidecar failed: {code}: {text}", None, FDW_ERROR)   # INTERNAL, and codes it never sends


def mark_of(err: grpc.RpcError) -> str | None:
    """The sidecar's mark on a failed call (the value of its code's key in _MARK_KEYS), or None."""
    key = _MARK_KEYS.get(err.code())
    if key is None:
        return None
    return next((value for k, value in (err.trailing_metadata() or ()) if k == key), None)


def error_from_rpc(err: grpc.RpcError, address: str) -> LlmError:
    """A gRPC failure as an error that says what happened and what to do: by its status code and
    the sidecar's mark, never by its message."""
    code = err.code()
    text = err.details() or code.name
    mark = mark_of(err)
    entry = _BY_CODE.get((code, mark))
    if entry is None and mark is not None:
        entry = _BY_CODE.get((code, ANY_MARK))
    template, hint, sqlstate = entry or _OTHER
    if code == grpc.StatusCode.UNAVAILABLE and mark is None and not address.startswith("unix:"):
        hint = _TCP_UNREACHABLE_HINT
    return LlmError(template.format(address=address, text=text, code=code.name), hint=hint, sqlstate=sqlstate)
