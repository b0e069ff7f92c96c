"""Constrained output (a JSON Schema or a list of choices): what both sides of the contract check.

A request may constrain its answer in one of two ways (GenerateRequest.json_schema, .choices;
llm.completions' request columns of the same names):
- a JSON Schema document (draft 2020-12): the engine constrains decoding so that the answer is JSON
  valid against it;
- a list of choices: the answer is exactly one of the strings.

The FDW (llm_tables.declarations) and the sidecar (llm_sidecar.servicer) both run these checks, so
a bad schema is refused with the same words before any token is spent, at the query (22023) or in
the sidecar (INVALID_ARGUMENT).  A schema must first be valid JSON Schema (jsonschema's metaschema
check), and then use only keywords that both engines enforce while decoding.  llama.cpp's
converter (measured with xllamacpp 2026.10, see tests/unit/test_constrained.py) silently ignores
many keywords: `not`, `if`, `multipleOf`, `uniqueItems`, `minProperties`, `format: email`, bounds
on a non-integer number, a `pattern` that is not anchored with ^...$ (it is taken as anchored,
JSON Schema searches); and it fails at `items: false`.  A schema using any of these is refused here,
naming the keyword and where it is, rather than decoded under a constraint that does not hold.
"""
from __future__ import annotations

import json
from typing import Any

MAX_CHOICES = 1000   # a choice list is one grammar: a few labels, not a vocabulary

# Keywords that never constrain the value (annotations, identifiers): allowed anywhere.
ANNOTATIONS = frozenset({"$schema", "$id", "$comment", "$anchor", "title", "description", "examples",
                         "default", "deprecated", "readOnly", "writeOnly"})
# Keywords the engines enforce while decoding, with the types they apply to (None: any).
ENFORCED: dict[str, frozenset[str] | None] = {
    "type": None, "enum": None, "const": None, "anyOf": None, "$ref": None, "$defs": None,
    "definitions": None,
    "properties": frozenset({"object"}), "required": frozenset({"object"}),
    "additionalProperties": frozenset({"object"}),
    "items": frozenset({"array"}), "prefixItems": frozenset({"array"}),
    "minItems": frozenset({"array"}), "maxItems": frozenset({"array"}),
    "minLength": frozenset({"string"}), "maxLength": frozenset({"string"}),
    "pattern": frozenset({"string"}), "format": frozenset({"string"}),
    "minimum": frozenset({"integer"}), "maximum": frozenset({"integer"}),
    "exclusiveMinimum": frozenset({"integer"}), "exclusiveMaximum": frozenset({"integer"}),
}
# Object and array keywords that also hold where "type" is left out (the engines infer it).
STRUCTURAL = frozenset({"properties", "required", "additionalProperties", "items", "prefixItems",
                        "minItems", "maxItems"})
# Integer bounds, whole numbers of at most 2**53 - 1 either way: llama.cpp's converter dropped
# the whole constraint, silently, for a minimum of -2**63 (the answer came back as free text), and
# let 10**18 through a maximum of 10**18 - 1 (bounds read as doubles lose digits past 2**53).
BOUNDS = frozenset({"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"})
BOUND_MOST = 2**53 - 1
FORMATS = ("date", "date-time", "uuid")   # the string formats the grammar spells out
# What a refused keyword can be written as instead, for the message's hint.
INSTEAD = {"oneOf": "anyOf (the engines do not enforce that only one branch matches)",
           "allOf": "one schema with the keywords merged"}
SCHEMA_HINT = (f"Supported keywords: {', '.join(sorted(ENFORCED))} (minimum/maximum on integers only; "
               f"format one of {', '.join(FORMATS)}; pattern anchored as ^...$), and annotations "
               f"such as title and description.")


class ConstraintError(ValueError):
    """The constraint cannot be used; the message names the problem and where it is."""


def load_schema(text: Any, label: str = "json_schema") -> dict:
    """The schema as a dict from its JSON text (or an already parsed value), checked: valid JSON
    Schema (draft 2020-12), an object, and only keywords the engines enforce (see the module
    docstring).  Raises ConstraintError naming the problem."""
    try:
        return _load_schema(text, label)
    except RecursionError:   # parsing and checking recurse once per level of nesting
        raise ConstraintError(f"{label} nests too deeply: Python's parser and the checks take a few "
                              f"hundred levels at most") from None


def _load_schema(text: Any, label: str) -> dict:
    if isinstance(text, (str, bytes)):
        try:
            schema = json.loads(text)
        except ValueError as err:
            raise ConstraintError(f"{label} is not valid JSON: {err}") from None
    else:
        schema = text
    if not isinstance(schema, dict):
        raise ConstraintError(f"{label} must be a JSON object (a JSON Schema document), got "
                              f"{json.dumps(schema)[:80]}")
    import jsonschema   # imported here: a query without a schema never pays for it

    try:
        jsonschema.Draft202012Validator.check_schema(schema)
    except jsonschema.SchemaError as err:
        where = _pointer(err.path)
        raise ConstraintError(f"{label} is not a valid JSON Schema: {err.message}"
                              f"{f' (at {where})' if where != '#' else ''}") from None
    _check_enforced(schema, schema, "#", label)
    return schema


def _pointer(path: Any) -> str:
    return "#" + "".join(f"/{p}" for p in path)


def _types(schema: dict) -> set[str]:
    kind = schema.get("type")
    if kind is None:
        return set()
    return {kind} if isinstance(kind, str) else set(kind)


def _check_enforced(schema: Any, root: dict, where: str, label: str) -> None:
    """Refuse, naming it, any keyword in `schema` (at JSON pointer `where`) or its subschemas
    that the engines would not enforce."""
    if isinstance(schema, bool):
        raise ConstraintError(f"{label} has the boolean schema {json.dumps(schema)} at {where}, which the "
                              f"engines cannot constrain to: write an object schema there")
    types = _types(schema)
    for key, value in schema.items():
        if key in ANNOTATIONS:
            continue
        if key not in ENFORCED:
            instead = f"; use {INSTEAD[key]}" if key in INSTEAD else ""
            raise ConstraintError(f"{label} uses {key!r} at {where}, which the engines do not enforce while "
                                  f"decoding: the answer could break it{instead}")
        applies = ENFORCED[key]
        if applies is not None and types != applies and not (not types and key in STRUCTURAL):
            shown = "/".join(sorted(types)) or "not given"
            raise ConstraintError(f"{label} uses {key!r} at {where}, where the type is {shown}: the engines "
                                  f"enforce it only under \"type\": \"{next(iter(applies))}\"")
        if key in BOUNDS and not (isinstance(value, int) and -BOUND_MOST <= value <= BOUND_MOST):
            raise ConstraintError(f"{label} has {key} {value} at {where}: the engines take integer bounds from "
                                  f"-{BOUND_MOST} to {BOUND_MOST} (whole numbers)")
        if key == "format" and value not in FORMATS:
            raise ConstraintError(f"{label} uses format {value!r} at {where}; the engines enforce only "
                                  f"{', '.join(FORMATS)}")
        if key == "pattern" and not (value.startswith("^") and value.endswith("$")):
            raise ConstraintError(f"{label} has the pattern {value!r} at {where}, which is not anchored: the "
                                  f"engines match a pattern against the whole string, so write it as ^...$")
        if key == "$ref":
            _resolve(value, root, where, label)
        for sub, path in _subschemas(key, value):
            _check_enforced(sub, root, f"{where}/{key}{path}", label)


def _subschemas(key: str, value: Any) -> list[tuple[Any, str]]:
    """(subschema, its path below the keyword) for a keyword that holds schemas."""
    if key in ("properties", "$defs", "definitions"):
        return [(v, f"/{k}") for k, v in value.items()]
    if key in ("anyOf", "prefixItems"):
        return [(v, f"/{i}") for i, v in enumerate(value)]
    if key == "items":
        return [(value, "")]
    if key == "additionalProperties" and isinstance(value, dict):
        return [(value, "")]
    return []


def _resolve(ref: str, root: dict, where: str, label: str) -> None:
    """A $ref must point into the document itself (#/...), at something there."""
    if not ref.startswith("#"):
        raise ConstraintError(f"{label} has the $ref {ref!r} at {where}: only references within the schema "
                              f"(#/$defs/...) can be used, nothing is fetched")
    node: Any = root
    for part in ref[1:].split("/")[1:] if ref != "#" else []:
        part = part.replace("~1", "/").replace("~0", "~")
        if not isinstance(node, dict) or part not in node:
            raise ConstraintError(f"{label} has the $ref {ref!r} at {where}, which points at nothing in the schema")
        node = node[part]


def check_choices(choices: list[Any], label: str = "choices") -> list[str]:
    """The choices, checked: at least one, each a non-empty string, no duplicates, at most
    MAX_CHOICES.  Raises ConstraintError naming the problem."""
    if not choices:
        raise ConstraintError(f"{label} must hold at least one choice")
    if len(choices) > MAX_CHOICES:
        raise ConstraintError(f"{label} holds {len(choices):,} choices; at most {MAX_CHOICES:,} are taken")
    for i, choice in enumerate(choices):
        if choice is None:
            raise ConstraintError(f"{label} must not contain NULL ({label}[{i + 1}])")
        if not isinstance(choice, str) or choice == "":
            raise ConstraintError(f"{label} must not contain empty strings ({label}[{i + 1}])")
    if len(set(choices)) != len(choices):
        seen = next(c for i, c in enumerate(choices) if c in choices[:i])
        raise ConstraintError(f"{label} lists {seen!r} twice")
    return list(choices)


def gbnf_literal(text: str) -> str:
    """`text` as a GBNF string literal (llama.cpp's grammar format): quotes, backslashes and
    control characters escaped, other characters (UTF-8) as they are."""
    out = []
    for ch in text:
        if ch in ('"', "\\"):
            out.append("\\" + ch)
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\r":
            out.append("\\r")
        elif ch == "\t":
            out.append("\\t")
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\x{ord(ch):02X}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def choices_grammar(choices: list[str]) -> str:
    """A GBNF grammar whose only sentences are the choices."""
    return "root ::= " + " | ".join(gbnf_literal(c) for c in choices)
