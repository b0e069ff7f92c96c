"""Errors the FDW classes raise, written for the SQL user who will read them.

LlmError carries a hint and a SQLSTATE; the host turns it into
``ERROR: <message> / HINT: <hint>`` with that code.  It subclasses Multicorn's
exception so that a real Multicorn2 reports it cleanly too.
"""
from __future__ import annotations

import grpc

from multicorn.utils import MulticornException, QueryCanceled

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
        super().__init__(message, hint=hint, detail=detail, sqlstate=sqlstate)


# status code -> (message template, hint, SQLSTATE); templates see {address}, {text}, {code}
_BY_CODE: dict[grpc.StatusCode, tuple[str, str | None, str]] = {
    grpc.StatusCode.UNAVAILABLE: (
        "the llmfdw sidecar at {address} is not reachable: {text}",
        "Start it (make up), or point the server at it: "
        "ALTER SERVER llm_sidecar OPTIONS (SET address 'unix:///path/to/sidecar.sock').",
        FDW_UNABLE_TO_ESTABLISH_CONNECTION),
    grpc.StatusCode.NOT_FOUND: (
        "{text}", "SELECT name, task FROM llm.models; lists the models the sidecar serves.", UNDEFINED_OBJECT),
    grpc.StatusCode.INVALID_ARGUMENT: ("{text}", None, INVALID_PARAMETER_VALUE),
    grpc.StatusCode.FAILED_PRECONDITION: (
        "{text}", "SELECT name, task, state FROM llm.models; shows what each model can do.",
        OBJECT_NOT_IN_PREREQUISITE_STATE),
    grpc.StatusCode.DEADLINE_EXCEEDED: (
        "the sidecar did not answer in time: {text}",
        "Raise the server's timeout option (seconds) or statement_timeout, or ask for fewer tokens.",
        QUERY_CANCELED),
    grpc.StatusCode.UNAUTHENTICATED: (
        "the sidecar refused the credentials: {text}",
        "Set the token in your user mapping: "
        "ALTER USER MAPPING FOR CURRENT_USER SERVER llm_sidecar OPTIONS (SET token '...').",
        INVALID_AUTHORIZATION),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (
        "the sidecar is at its limit for this tenant: {text}",
        "Retry later, or ask the operator to raise the tenant's limits.", TOO_MANY_CONNECTIONS),
}


# UNAVAILABLE the sidecar itself sends (it is up, but cannot serve this now), by message start
_SIDECAR_UNAVAILABLE = ("model ", "the sidecar is shutting down", "the model engine failed")


def error_from_rpc(err: grpc.RpcError, address: str) -> LlmError:
    """A gRPC failure as an error that says what happened and what to do."""
    code = err.code()
    text = err.details() or code.name
    if code == grpc.StatusCode.UNAVAILABLE and text.startswith(_SIDECAR_UNAVAILABLE):
        return LlmError(text, hint="Retry shortly; SELECT name, state, error FROM llm.models; shows each model.",
                        sqlstate=CANNOT_CONNECT_NOW)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED and "message larger than max" in text:
        return LlmError(f"a message to or from the sidecar is too large: {text}",
                        hint="Send fewer or shorter inputs per query (split the array).",
                        sqlstate=PROGRAM_LIMIT_EXCEEDED)
    template, hint, sqlstate = _BY_CODE.get(code, ("the sidecar failed: {code}: {text}", None, FDW_ERROR))
    message = template.format(address=address, text=text, code=code.name)
    return LlmError(message, hint=hint, sqlstate=sqlstate)
