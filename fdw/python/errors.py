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


class LlmError(MulticornException):
    def __init__(self, message: str, hint: str | None = None, sqlstate: str = FDW_ERROR,
                 detail: str | None = None) -> None:
        super().__init__(message, hint=hint, detail=detail, sqlstate=sqlstate)


def error_from_rpc(err: grpc.RpcError, address: str) -> LlmError:
    """A gRPC failure as an error that says what happened and what to do."""
    code = err.code()
    text = err.details() or code.name
    if code == grpc.StatusCode.UNAVAILABLE:
        return LlmError(
            f"the llmfdw sidecar at {address} is not reachable: {text}",
            hint="Start it (make up), or point the server at it: "
                 "ALTER SERVER llm_sidecar OPTIONS (SET address 'unix:///path/to/sidecar.sock').",
            sqlstate=FDW_UNABLE_TO_ESTABLISH_CONNECTION,
        )
    if code == grpc.StatusCode.NOT_FOUND:
        return LlmError(text, hint="SELECT name, task FROM llm.models; lists the models the sidecar serves.",
                        sqlstate=UNDEFINED_OBJECT)
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return LlmError(text, sqlstate=INVALID_PARAMETER_VALUE)
    if code == grpc.StatusCode.FAILED_PRECONDITION:
        return LlmError(text, hint="SELECT name, task, state FROM llm.models; shows what each model can do.",
                        sqlstate=OBJECT_NOT_IN_PREREQUISITE_STATE)
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return LlmError(
            f"the sidecar did not answer in time: {text}",
            hint="Raise the server's timeout option (seconds) or statement_timeout, or ask for fewer tokens.",
            sqlstate=QUERY_CANCELED,
        )
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return LlmError(
            f"the sidecar refused the credentials: {text}",
            hint="Set the token in your user mapping: "
                 "ALTER USER MAPPING FOR CURRENT_USER SERVER llm_sidecar OPTIONS (SET token '...').",
            sqlstate=INVALID_AUTHORIZATION,
        )
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return LlmError(f"the sidecar is at its limit for this tenant: {text}",
                        hint="Retry later, or ask the operator to raise the tenant's limits.",
                        sqlstate=TOO_MANY_CONNECTIONS)
    return LlmError(f"the sidecar failed: {code.name}: {text}")
