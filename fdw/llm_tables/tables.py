"""The virtual tables: completions, embeddings, models, usage, requests.

Each is a Multicorn-API FDW class built from its declaration in
declarations.py.  A foreign server of the llmfdw wrapper runs
``SidecarTables`` unless a superuser names another class; each foreign
table's ``table`` option picks the class, and ``IMPORT FOREIGN SCHEMA llm``
creates them all from their declarations.  Options (later wins): table, then
server, then user mapping; options.py says which names each level takes.
"""
from __future__ import annotations

import functools
import json
import struct
import sys
from array import array
from collections import OrderedDict
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, Iterator

from multicorn import ColumnDefinition, ForeignDataWrapper, Qual, TableDefinition

from llm_tables import interrupts, statements
from llm_tables.client import CallControl, SidecarClient, new_request_id, session_id
from llm_tables.declarations import COMPLETIONS, EMBEDDINGS, MODELS, REQUESTS, SPECS, USAGE, TableSpec
from llm_tables.errors import INVALID_PARAMETER_VALUE, LlmError
from llm_tables.keycolumns import KeyColumns, Range, Resolved, range_hint
from llm_tables.options import DEFAULT_TIMEOUT, parse_options
from llm_tables.tls import tls_settings
from llm_inference.v1 import inference_pb2 as pb
from llm_inference.v1.constraints import load_schema

try:  # inside the llmfdw host
    import _llmfdw_host as _host
except ImportError:  # under a real Multicorn2, or plain Python
    _host = None

# Planner estimates.  A scan without its required qual can only fail, so it
# is costed out of reach: the planner then prefers a parameterized nested
# loop that feeds the qual from a join (as Steampipe does).
UNUSABLE_ROWS = 1e9


def _time_left() -> float | None:
    return _host.statement_time_left() if _host is not None else None


# A model name longer than this is refused before sending (no served model has such a name).
MAX_MODEL_NAME_BYTES = 1024

# One embedding query's inputs go to the sidecar in requests of at most this much (embed_parts).
EMBED_PART_BYTES = 8 * 2**20
EMBED_PART_INPUTS = 4096

# text output -> value, per SQL type, for hosts that pass some values as text (Multicorn2)
_FROM_TEXT = {"double precision": float, "bigint": int, "integer": int, "boolean": lambda v: v in ("t", "true")}


def _client(options: dict[str, Any], server: str) -> SidecarClient:
    address = options.get("address")
    if not address:
        raise LlmError(f"foreign server {server} has no address option",
                       hint=f"ALTER SERVER {server} OPTIONS (ADD address 'unix:///path/to/sidecar.sock');")
    return SidecarClient(address, CallControl(interrupts.pending, _time_left, options.get("timeout", DEFAULT_TIMEOUT)),
                         tls_settings(options))


def _context(options: dict[str, Any]) -> pb.RequestContext:
    """Who is asking: the tenant (options, else the database), its token, this session."""
    session = _host.session() if _host is not None else {}
    database = session.get("database", "")
    return pb.RequestContext(tenant=options.get("tenant") or database, token=options.get("token", ""),
                             request_id=new_request_id(), database=database, role=session.get("role", ""),
                             session=session_id(), backend_pid=session.get("pid", 0))


class SidecarTable(ForeignDataWrapper):
    """Common plumbing: options, the client, the request context, the echoed request columns."""

    spec: TableSpec
    explain_label = "LLM"  # EXPLAIN's label for our lines (the host's default is "Multicorn")

    def __init__(self, options: dict[str, str], columns: "OrderedDict[str, ColumnDefinition]") -> None:
        super().__init__(options, columns)
        self.spec.check_column_types(columns)
        self.columns = columns
        self.options, self.defaults = parse_options(self.spec, options)
        self.default_model = self.defaults.get("model", "")
        self.client = _client(self.options, self.server_name)
        self.address = self.client.address

    @property
    def table_name(self) -> str:
        """The foreign table as the user named it (the llmfdw host sets _llmfdw_table)."""
        return getattr(self, "_llmfdw_table", None) or f"llm.{self.spec.name}"

    @property
    def server_name(self) -> str:
        return getattr(self, "_llmfdw_server", None) or "llm_sidecar"

    @functools.cached_property
    def keys(self) -> KeyColumns:
        return self.spec.keys(self.table_name)

    def resolve(self, quals: list[Qual]) -> Resolved:
        """The request values the quals give (see KeyColumns.resolve)."""
        quals = [_as_equality(q) for q in (quals if _host is not None else [self._typed(q) for q in quals])]
        resolved = self.keys.resolve(quals)
        self._note_scan(resolved)
        return resolved

    # ---- Progress, EXPLAIN ANALYZE and the cache opt-out (statements.py) ----
    _scan: statements.Scan | None = None   # the scan whose code runs now (statements.tracked sets it)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Each table's execute() is tracked as a scan of its statement (statements.tracked)."""
        super().__init_subclass__(**kwargs)
        if "execute" in cls.__dict__:
            cls.execute = statements.tracked(cls.execute)

    def _note_scan(self, resolved: Resolved) -> None:
        """Tell the running scan how many prompts or texts it will send (its list column's
        values that a pushed-down LIMIT/OFFSET keeps), and whether `cache = false` was asked."""
        scan = self._scan
        if scan is None or resolved.empty:
            return
        listed = next((c.name for c in self.keys.columns.values() if c.many), None)
        if listed is not None:
            scan.plan(len(_window(resolved.values.get(listed) or [], scan.kwargs)))
        if "cache" in self.keys.columns:
            scan.cache = resolved.one("cache") is not False

    def end_scan(self) -> None:
        statements.end_scan(self)

    def _typed(self, qual: Qual) -> Qual:
        """Multicorn2 hands float8, int8 and bool values over as their text output; our host
        as Python numbers and booleans.  Parse them by the column's type."""
        column = self.columns.get(qual.field_name)
        parse = _FROM_TEXT.get(column.base_type_name if column is not None else "")
        if parse is None:
            return qual
        value = qual.value
        if isinstance(value, list):
            value = [parse(v) if isinstance(v, str) else v for v in value]
        elif isinstance(value, str):
            value = parse(value)
        return Qual(qual.field_name, qual.operator, value)

    @property
    def request_columns(self) -> list[str]:
        """Columns whose quals become request fields and whose values each row echoes.  The
        host refuses a plan that leaves a condition on one of them out of the request (the
        echoed default would then be filtered: a silently wrong result)."""
        return list(self.keys.columns)

    # ---- Batched joins (fdw/src/batchjoin_plan.c, batchjoin_exec.c) ----
    @property
    def batch_key_columns(self) -> list[str]:
        """Key columns a join may send for a whole batch of outer rows as one
        "column = ANY(list)" qual: the host matches each returned row to its
        outer rows by the key values it echoes (see request_columns)."""
        return [c.name for c in self.keys.columns.values() if c.many]

    def param(self, resolved: Resolved, name: str) -> Any:
        """A request parameter: from the query's quals, else the table's defaults."""
        value = resolved.one(name)
        return self.defaults.get(name) if value is None else value

    def echo(self, resolved: Resolved, **per_row: Any) -> dict[str, Any]:
        """The request columns of one row: what the request used (a list column's value
        for this row comes in per_row)."""
        return {c.name: per_row[c.name] if c.many else self.param(resolved, c.name)
                for c in self.spec.request_columns}

    def context(self) -> pb.RequestContext:
        context = _context(self.options)
        statements.stamp(context, self._scan)
        return context

    def model_for(self, resolved: Resolved) -> str:
        model = self.param(resolved, "model")
        if not model:
            raise LlmError(f"{self.table_name}: no model given and no default model",
                           hint=f"Add WHERE model = '...', or ALTER FOREIGN TABLE {self.table_name} "
                                f"OPTIONS (ADD model '...'); the models table lists them.",
                           sqlstate=INVALID_PARAMETER_VALUE)
        size = len(model.encode())
        if size > MAX_MODEL_NAME_BYTES:
            # refused here: sent on, the sidecar's "not served" error would quote it back, and a
            # name this long overflows gRPC's metadata limit ("metadata size exceeds hard limit")
            raise LlmError(f"{self.table_name}: the model name is {size:,} bytes long; model names are at most "
                           f"{MAX_MODEL_NAME_BYTES:,} bytes",
                           hint="SELECT name FROM llm.models; lists the models the sidecar serves.",
                           sqlstate=INVALID_PARAMETER_VALUE)
        return model

    def get_rel_size(self, quals: list[Qual], columns: set[str]) -> tuple[float, int]:
        statements.planning()
        if not self.keys.has_required(quals):
            return (UNUSABLE_ROWS, 1000)
        rows = 1
        for q in quals:
            if q.is_list_operator and q.field_name in self.keys.columns:
                # a list known only at run time (= ANY($1), an init-plan array): guess
                rows = max(rows, len(q.value) if isinstance(q.value, list) else 1000)
        return (rows, 1000)

    def get_path_keys(self) -> list[tuple[tuple[str, ...], float]]:
        return [((c.name,), 1) for c in self.keys.required]

    def explain(self, quals: list[Qual], columns: set[str], sortkeys=None, verbose: bool = False,
                **kwargs: Any) -> list[str]:
        pushed = ", ".join(_shown(q) for q in quals if q.field_name in self.keys.columns) or "none"
        lines = [f"{self.spec.name} via sidecar {self.address}",
                 f"model: {self.default_model or '(from quals)'}",
                 f"request quals: {pushed}"]
        if kwargs.get("limit") is not None or kwargs.get("offset") is not None:
            lines.append(f"limit: {kwargs.get('limit', 'all')}, offset: {kwargs.get('offset') or 0}"
                         f" (requests only for those rows)")
        if verbose:
            lines.append(f"columns: {', '.join(sorted(columns))}")
        counts = statements.counts(self)   # EXPLAIN ANALYZE: what this node's scans got back
        return lines + (counts.lines() if counts is not None else [])


def _as_equality(qual: Qual) -> Qual:
    """A boolean condition as "column = value": Postgres plans `WHERE NOT cache` and
    `cache = false` as `cache <> true`, which the key columns take as `cache = false`."""
    if qual.operator == "<>" and isinstance(qual.value, bool):
        return Qual(qual.field_name, "=", not qual.value)
    return qual


def _shown(qual: Qual) -> str:
    """A qual for EXPLAIN, its value quoted (Qual's repr is Multicorn2's: the value's str()).
    EXPLAIN runs before values are known: a parameter ($1 of a prepared statement under a
    generic plan, an outer row's value, an init-plan's result) comes as None and is shown as
    Multicorn2 shows it, "?" (so is "col IS NULL", which the host passes the same way)."""
    value = "?" if qual.value is None else repr(qual.value)
    if qual.is_list_operator:
        name, any_ = qual.operator
        return f"{qual.field_name} {name} {'ANY' if any_ else 'ALL'}({value})"
    return f"{qual.field_name} {qual.operator} {value}"


def _bounds(count: int, kwargs: dict[str, Any]) -> tuple[int, int]:
    """The [first, end) positions of a request list that a pushed-down OFFSET/LIMIT leaves.
    The host pushes them down only when every condition is "request column = value" (or =
    ANY), which every row meets, and each distinct value gives one row: so a LIMIT 1 over
    prompt = ANY(...) runs one prompt, not all of them."""
    offset = min(kwargs.get("offset") or 0, count)
    limit = kwargs.get("limit")
    return offset, count if limit is None else min(count, offset + limit)


def _window(values: list[Any], kwargs: dict[str, Any]) -> list[Any]:
    """The values a pushed-down OFFSET/LIMIT leaves of a request list (see _bounds); the list
    itself when they leave all of it (no copy of 200,000 texts: see keycolumns._distinct)."""
    first, end = _bounds(len(values), kwargs)
    return values if first == 0 and end >= len(values) else values[first:end]


# GenerationParams fields a request column (or its default) sets; stop is a list, set apart
_SCALAR_PARAMS = [c.name for c in COMPLETIONS.request_columns
                  if c.name in pb.GenerationParams.DESCRIPTOR.fields_by_name and c.name != "stop"]


class CompletionsTable(SidecarTable):
    """One row per prompt: the model's completion and what it cost.

    With json_schema or choices the sidecar constrains decoding, and completion_json carries the
    parsed answer (a JSON string for a choice).  An answer that still does not parse or validate
    (max_tokens cut the JSON short) is that row's error.  With on_error = 'null' a row whose
    request failed on its own (client.per_row_error: a prompt over the context, an engine error
    on it) or whose answer does not parse comes back with the reason in `error` and NULL outputs;
    with 'abort' (the default) the statement fails, as does any failure of the whole statement
    (sidecar unreachable, cancel, statement_timeout, credentials, tenant limits) either way."""

    spec = COMPLETIONS

    def can_limit(self, limit: int | None, offset: int | None) -> bool:
        return True  # execute() requests only the prompts the LIMIT/OFFSET keeps (_bounds)

    def execute(self, quals: list[Qual], columns: set[str], **kwargs: Any) -> Iterator[dict[str, Any]]:
        resolved = self.resolve(quals)
        if resolved.empty:
            return
        model = self.model_for(resolved)
        params = pb.GenerationParams()
        for name in _SCALAR_PARAMS:
            value = self.param(resolved, name)
            if value is not None:
                setattr(params, name, value)
        stop = resolved.one("stop")
        if stop:
            params.stop.extend(stop if isinstance(stop, list) else [stop])
        system = self.param(resolved, "system") or ""
        answer = _Answer.of(resolved)
        row_errors = resolved.one("on_error") == "null"
        prompts = resolved.values["prompt"]
        first, stop_at = _bounds(len(prompts), kwargs)
        # built one at a time as the client's window advances (not a request per prompt up front)
        requests = (pb.GenerateRequest(model=model, prompt=prompts[i], system=system, params=params,
                                       context=self.context(), **answer.fields) for i in range(first, stop_at))
        for index, done in self.client.generate_many(requests, row_errors=row_errors):
            echoed = {**self.echo(resolved, prompt=prompts[first + index]), "model": model}
            if isinstance(done, LlmError):
                yield {**echoed, "error": done.message}
                continue
            final = done.final
            finish = pb.FinishReason.Name(final.finish_reason).removeprefix("FINISH_REASON_").lower()
            row = {**echoed, "completion": done.text, "finish_reason": finish,
                   "input_tokens": final.usage.input_tokens, "output_tokens": final.usage.output_tokens,
                   "compute_ms": final.usage.compute_ns / 1e6}
            try:
                row["completion_json"] = answer.parse(done.text, finish)
            except LlmError as err:
                if not row_errors:
                    raise
                row.update(completion=None, error=err.message)
            yield row


# SQLSTATEs of an answer that does not parse (invalid_json_text) or does not validate (data_exception)
INVALID_JSON_TEXT, DATA_EXCEPTION = "22032", "22000"
_ANSWER_HINT = ("Raise max_tokens (the answer may have been cut short: finish_reason length), or add "
                "on_error = 'null' to get such rows back with their error in column error.")


@dataclass(frozen=True)
class _Answer:
    """A request's constraint (json_schema or choices, already checked by the key columns) and
    how its answer becomes completion_json: JSON text for a jsonb column, or None."""

    schema: dict | None = None
    schema_text: str = ""
    choices: tuple[str, ...] = ()

    @classmethod
    def of(cls, resolved: Resolved) -> "_Answer":
        text, choices = resolved.one("json_schema"), resolved.one("choices")
        if text is not None and choices is not None:
            raise LlmError("json_schema and choices cannot both be given: choose one constraint",
                           sqlstate=INVALID_PARAMETER_VALUE)
        if text is not None:
            return cls(schema=load_schema(text), schema_text=text)
        return cls(choices=tuple(choices or ()))

    @property
    def fields(self) -> dict[str, Any]:
        """The GenerateRequest fields that carry the constraint."""
        if self.schema is not None:
            return {"json_schema": self.schema_text}
        return {"choices": list(self.choices)} if self.choices else {}

    def parse(self, text: str, finish: str) -> str | None:
        """completion_json for an answer: NULL without a constraint; else the value as JSON text,
        or an LlmError when the answer does not parse or validate."""
        if self.choices:
            if text not in self.choices:
                raise LlmError(f"the answer {_start(text)} is not one of the choices (finish_reason {finish})",
                               hint=_ANSWER_HINT, sqlstate=DATA_EXCEPTION)
            return json.dumps(text)
        if self.schema is None:
            return None
        try:
            value = json.loads(text)
        except (ValueError, RecursionError) as err:   # RecursionError: nested past Python's limit
            raise LlmError(f"the answer {_start(text)} is not valid JSON ({err}; finish_reason {finish})",
                           hint=_ANSWER_HINT, sqlstate=INVALID_JSON_TEXT) from None
        problem = _schema_problem(self.schema, value)
        if problem:
            raise LlmError(f"the answer does not match json_schema: {problem}", hint=_ANSWER_HINT,
                           sqlstate=DATA_EXCEPTION)
        return json.dumps(value)


def _start(text: str, most: int = 60) -> str:
    """An answer quoted for an error message, cut short."""
    return repr(text) if len(text) <= most else f"{text[:most]!r}..."


def _schema_problem(schema: dict, value: Any) -> str | None:
    import jsonschema

    error = jsonschema.exceptions.best_match(jsonschema.Draft202012Validator(schema).iter_errors(value))
    if error is None:
        return None
    where = "#" + "".join(f"/{p}" for p in error.absolute_path)
    return f"{error.message} (at {where})"


class EmbeddingsTable(SidecarTable):
    """One row per distinct input: its embedding as a pgvector value.

    ``input = ANY(array)`` sends the whole array as one Embed request; rows
    stream back as the sidecar's batches complete.
    """

    spec = EMBEDDINGS

    def can_limit(self, limit: int | None, offset: int | None) -> bool:
        return True  # execute() embeds only the inputs the LIMIT/OFFSET keeps (_window)

    def __init__(self, options: dict[str, str], columns: "OrderedDict[str, ColumnDefinition]") -> None:
        super().__init__(options, columns)
        emb = columns.get("embedding")
        # vector(N) has typmod N; -1 means any dimension
        self.dimensions = emb.typmod if emb is not None and emb.typmod > 0 else None

    def execute(self, quals: list[Qual], columns: set[str], **kwargs: Any) -> Iterator[dict[str, Any]]:
        resolved = self.resolve(quals)
        if resolved.empty:
            return
        model = self.model_for(resolved)
        inputs = _window(resolved.values["input"], kwargs)
        if not inputs:
            return
        parts = embed_parts(inputs)
        requests = (pb.EmbedRequest(model=model, inputs=inputs[start:end], normalize=True, context=self.context())
                    for start, end in parts)   # built as the client's window advances
        want_vector = "embedding" in columns
        for part, message in self.client.embed_many(requests):
            start = parts[part][0]
            for emb in message.embeddings:
                if self.dimensions is not None and emb.dimensions != self.dimensions:
                    raise LlmError(
                        f"model {model} returns {emb.dimensions}-dimensional vectors but "
                        f"column embedding is vector({self.dimensions})",
                        hint=f"ALTER FOREIGN TABLE {self.table_name} ALTER COLUMN embedding TYPE vector({emb.dimensions});"
                             " or choose a model with matching dimensions.",
                        sqlstate=INVALID_PARAMETER_VALUE,
                    )
                yield {
                    **self.echo(resolved, input=inputs[start + emb.index]),
                    "model": model,
                    "embedding": _vector(emb.vector, emb.dimensions) if want_vector else None,
                    "dimensions": emb.dimensions,
                    "input_tokens": emb.input_tokens,
                    "truncated": emb.truncated,
                }


def embed_parts(inputs: list[str], max_bytes: int = EMBED_PART_BYTES,
                max_inputs: int = EMBED_PART_INPUTS) -> list[tuple[int, int]]:
    """[start, end) slices of `inputs`, each one request: at most max_inputs inputs and, unless
    one input alone is larger, max_bytes of UTF-8.  So `input = ANY(ARRAY(SELECT body FROM t))`
    is not bounded by a gRPC message (64 MiB) but by the backend's memory; an input over the
    message limit still fails before it is sent, naming the limit.  Asks Postgres whether to
    stop as it goes (a long list takes a while)."""
    parts, start, size = [], 0, 0
    for i, text in enumerate(interrupts.checked(inputs)):
        n = len(text.encode())
        if i > start and (size + n > max_bytes or i - start >= max_inputs):
            parts.append((start, i))
            start, size = i, 0
        size += n
    parts.append((start, len(inputs)))
    return parts


def _vector(raw: bytes, dims: int) -> bytes | str:
    """float32 little-endian bytes -> a pgvector value.  Our host passes bytes to the column
    type's receive function: pgvector's binary format (int16 dims, int16 unused, big-endian
    float4s), so no float is ever formatted as text.  Multicorn2 passes every value through the
    type's text input: there, the text form (repr() of a float32 reads back as the same float32)."""
    values = array("f", raw)
    if _host is None:
        return "[" + ",".join(map(repr, values)) + "]"
    if sys.byteorder == "little":
        values.byteswap()
    return struct.pack(">hh", dims, 0) + values.tobytes()


class ListingTable(SidecarTable):
    """A table the sidecar returns whole, from one call: no quals needed, a few rows."""

    def get_rel_size(self, quals: list[Qual], columns: set[str]) -> tuple[float, int]:
        return (10, 200)


class ModelsTable(ListingTable):
    """What the sidecar serves, and whether each model is ready."""

    spec = MODELS

    def execute(self, quals: list[Qual], columns: set[str], **kwargs: Any) -> Iterator[dict[str, Any]]:
        response = self.client.list_models(pb.ListModelsRequest(context=self.context()))
        for m in response.models:
            yield {
                "name": m.name,
                "task": pb.Task.Name(m.task).removeprefix("TASK_").lower(),
                "engine": m.engine,
                "dimensions": m.dimensions or None,
                "context_length": m.context_length or None,
                "state": pb.ModelState.Name(m.state).removeprefix("MODEL_STATE_").lower(),
                "error": m.error or None,
                "source": m.source or None,
            }


class UsageTable(ListingTable):
    """Metered usage of this tenant (the sidecar never returns another tenant's)."""

    spec = USAGE

    def execute(self, quals: list[Qual], columns: set[str], **kwargs: Any) -> Iterator[dict[str, Any]]:
        response = self.client.usage(pb.UsageRequest(context=self.context()))
        since = datetime.fromtimestamp(response.since_unix_ns / 1e9, tz=timezone.utc).isoformat()
        for r in response.rows:
            yield {
                "tenant": r.tenant, "model": r.model, "requests": r.requests, "errors": r.errors,
                "input_tokens": r.input_tokens, "output_tokens": r.output_tokens,
                "embedded_inputs": r.embedded_inputs, "queue_ms": r.queue_ns / 1e6,
                "compute_ms": r.compute_ns / 1e6, "since": since,
                "cache_hits": r.cache_hits,
            }


_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_MICROSECOND = timedelta(microseconds=1)


def _unix_ns(value: Any) -> int | None:
    """A timestamptz qual value as Unix nanoseconds, or None when it cannot be read (then the qual
    is left to Postgres).  Our host hands timestamptz over as its text output: ISO 8601 with the
    offset under the default DateStyle (ISO); another DateStyle, 'infinity', or a datetime without
    a zone (which instant it means is unknown here) is not read."""
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value)
        except ValueError:
            return None
    if not isinstance(value, datetime) or value.tzinfo is None:
        return None
    return (value - _EPOCH) // _MICROSECOND * 1000


def _timestamptz(unix_ns: int) -> str:
    """Unix nanoseconds -> timestamptz text, to the microsecond (exact: no float on the way)."""
    return (_EPOCH + timedelta(microseconds=unix_ns // 1000)).isoformat()


class RequestsTable(SidecarTable):
    """This tenant's recent requests, from the sidecar's bounded window (sidecar/llm_sidecar/history.py).

    Quals on ``at`` (> >= < <= =, BETWEEN) are sent as the request's bounds, so the sidecar ships
    only the rows in range; ``at`` is a range column, not a request column (Postgres rechecks the
    quals on it, see keycolumns.range_hint)."""

    spec = REQUESTS

    def time_range(self, quals: list[Qual]) -> Range:
        return range_hint(quals, "at", _unix_ns)

    def get_rel_size(self, quals: list[Qual], columns: set[str]) -> tuple[float, int]:
        # the window holds up to 10,000 rows by default; a time range usually keeps a few
        bounded = any(q.field_name == "at" and q.operator in (">", ">=", "<", "<=", "=") for q in quals)
        return (100 if bounded else 1000, 120)

    def explain(self, quals: list[Qual], columns: set[str], sortkeys=None, verbose: bool = False,
                **kwargs: Any) -> list[str]:
        sent = [_shown(q) for q in quals if q.field_name == "at"
                and not q.is_list_operator and q.operator in (">", ">=", "<", "<=", "=")]
        return [f"{self.spec.name} via sidecar {self.address}",
                f"time range sent: {', '.join(sent) or 'none (the whole window)'}"]

    def execute(self, quals: list[Qual], columns: set[str], **kwargs: Any) -> Iterator[dict[str, Any]]:
        span = self.time_range(quals)
        request = pb.RequestsRequest(context=self.context())
        if span.low is not None:
            request.after_unix_ns, request.after_inclusive = span.low, span.low_inclusive
        if span.high is not None:
            request.before_unix_ns, request.before_inclusive = span.high, span.high_inclusive
        response = self.client.requests(request)
        for r in response.rows:
            yield {
                "at": _timestamptz(r.at_unix_ns), "tenant": r.tenant, "model": r.model or None,
                "kind": r.kind, "status": r.status, "queue_ms": r.queue_ns / 1e6,
                "first_token_ms": r.first_token_ns / 1e6 if r.HasField("first_token_ns") else None,
                "total_ms": r.total_ns / 1e6, "input_tokens": r.input_tokens,
                "output_tokens": r.output_tokens, "embedded_inputs": r.embedded_inputs,
                "compute_ms": r.compute_ns / 1e6, "request_id": r.request_id,
            }


from llm_tables.chunks import ChunksTable  # noqa: E402  (a SidecarTable: imported once that is defined)
from llm_tables.progress import ProgressTable  # noqa: E402  (likewise)
from llm_tables.rerank import RerankTable  # noqa: E402  (likewise)

TABLES: dict[str, type[SidecarTable]] = {cls.spec.name: cls for cls in
                                         (CompletionsTable, EmbeddingsTable, ModelsTable, UsageTable,
                                          RequestsTable, ChunksTable, ProgressTable, RerankTable)}
assert TABLES.keys() == SPECS.keys(), "every declared table has its class"


class SidecarTables:
    """The server's wrapper class: builds the class named by the table's
    ``table`` option, so one server (one sidecar address) serves every table."""

    def __new__(cls, options: dict[str, str], columns: "OrderedDict[str, ColumnDefinition]") -> SidecarTable:
        kind = options.get("table")
        if kind not in TABLES:
            raise LlmError(
                f"unknown llmfdw table kind {kind!r}; expected one of {', '.join(sorted(TABLES))}",
                hint="IMPORT FOREIGN SCHEMA llm FROM SERVER your_server INTO llm; creates the tables.",
                sqlstate=INVALID_PARAMETER_VALUE,
            )
        return TABLES[kind](options, columns)

    @classmethod
    def import_schema(cls, schema: str, srv_options: dict[str, str], options: dict[str, str],
                      restriction_type: str | None, restricts: list[str]) -> list[TableDefinition]:
        """IMPORT FOREIGN SCHEMA llm: every declared table, with the sidecar's first model of
        each task as the table's default model and the embedding model's dimensions as
        vector(N), so that what the DDL says matches what the sidecar serves."""
        if schema != "llm":
            raise LlmError(f"the sidecar has no remote schema {schema!r}; it has one, llm",
                           hint="IMPORT FOREIGN SCHEMA llm FROM SERVER your_server INTO your_schema;",
                           sqlstate=INVALID_PARAMETER_VALUE)
        if options:
            raise LlmError(f"IMPORT FOREIGN SCHEMA llm takes no options, got {', '.join(sorted(options))}",
                           sqlstate=INVALID_PARAMETER_VALUE)
        conn, _ = parse_options(USAGE, srv_options)
        models = _client(conn, "your_server").list_models(pb.ListModelsRequest(context=_context(conn))).models
        first = {task: next((m for m in models if m.task == task), None)
                 for task in (pb.TASK_GENERATE, pb.TASK_EMBED, pb.TASK_RERANK)}
        defaults = {COMPLETIONS.name: first[pb.TASK_GENERATE], EMBEDDINGS.name: first[pb.TASK_EMBED],
                    "chunks": first[pb.TASK_EMBED], "rerank": first[pb.TASK_RERANK]}
        tables = []
        for spec in SPECS.values():
            model = defaults.get(spec.name)
            typmods = {"embedding": model.dimensions} if spec is EMBEDDINGS and model and model.dimensions else {}
            columns = [ColumnDefinition(name, type_name=sql_type) for name, sql_type in spec.column_types(typmods)]
            table_options = {"table": spec.name, **({"model": model.name} if model else {})}
            tables.append(TableDefinition(spec.name, columns, options=table_options))
        return tables
