"""Write the generation parameters' reference from their registry (llm_inference.v1.params.PARAMS).

    .venv/bin/python -m deploy.params_reference           # rewrite README.md's table and the Helm schema
    .venv/bin/python -m deploy.params_reference --check   # exit 1 naming what drifted (tests/unit does this)

Two files state the parameters for readers who never open Python: README.md (the table between
the BEGIN/END marker comments) and helm/values.schema.json (a model's `defaults`, which the
sidecar's YAML check accepts: llm_sidecar.config.RequestDefaults).  Both are written from the
registry rather than by hand, so a parameter added there (or a range changed) reaches them by
running this; tests/unit/test_params_registry.py fails until it is run.  It reads the installed
package: after editing params.py, `make install` first (as for any change under proto/).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from llm_inference.v1.params import PARAMS, Param

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
HELM_SCHEMA = ROOT / "helm" / "values.schema.json"
COMMAND = ".venv/bin/python -m deploy.params_reference"
MARK = "<!-- BEGIN generation parameters"   # the BEGIN comment starts so (its text may change)
BEGIN = f"{MARK}: generated from proto/llm_inference/v1/params.py by `{COMMAND}`; do not edit -->"
END = "<!-- END generation parameters -->"
_JSON_TYPES = {int: "integer", float: "number"}


def _number(value: int | float) -> str:
    return str(value) if isinstance(value, int) else f"{value:g}"


def readme_table() -> str:
    """The Markdown table of llm.completions' generation parameters, markers included."""
    rows = [BEGIN,
            "| column | type | unit | default | valid values | meaning |",
            "| --- | --- | --- | --- | --- | --- |"]
    for p in PARAMS:
        default = "unset" if p.default is None else _number(p.default)
        rows.append(f"| `{p.name}` | {p.sql_type} | {p.unit} | {default} | {p.range}{p.note} | {p.doc} |")
    return "\n".join([*rows, END])


def defaults_schema() -> dict:
    """A model's `defaults` in helm/values.schema.json: one optional key per parameter."""
    return {
        "type": "object",
        "additionalProperties": False,
        "description": "What a generation request that leaves a parameter out gets "
                       "(generated from proto/llm_inference/v1/params.py).",
        "properties": {p.name: _property(p) for p in PARAMS},
    }


def _property(p: Param) -> dict:
    return {"type": _JSON_TYPES[p.kind], **p.bounds, "description": p.doc}


def _render_defaults(indent: str) -> str:
    """defaults_schema() as JSON in the schema file's compact style: one line per property."""
    schema = defaults_schema()
    inner = indent + "  "
    lines = ["{"]
    lines += [f"{inner}{json.dumps(k)}: {json.dumps(v)}," for k, v in schema.items() if k != "properties"]
    lines.append(f'{inner}"properties": {{')
    props = [f"{inner}  {json.dumps(name)}: {json.dumps(prop)}" for name, prop in schema["properties"].items()]
    lines.append(",\n".join(props))
    lines += [f"{inner}}}", f"{indent}}}"]
    return "\n".join(lines)


def updated_readme(text: str) -> str:
    """README.md's text with the table between the markers replaced."""
    start, end = text.find(MARK), text.find(END)
    if start < 0 or end < start:
        raise SystemExit(f"{README}: the marker comments are missing; put {BEGIN!r} and {END!r} where "
                         f"the table goes")
    return text[:start] + readme_table() + text[end + len(END):]


def updated_schema(text: str) -> str:
    """values.schema.json's text with a model's `defaults` object replaced (the rest kept as written)."""
    key = '"defaults": '
    if text.count(key) != 1:
        raise SystemExit(f"{HELM_SCHEMA}: expected one {key!r}, found {text.count(key)}")
    start = text.index(key) + len(key)
    _, length = json.JSONDecoder().raw_decode(text[start:])
    line_start = text.rindex("\n", 0, start) + 1
    indent = text[line_start:start - len(key)]
    return text[:start] + _render_defaults(indent) + text[start + length:]


def drifted() -> list[Path]:
    """The files whose generated part differs from what the registry gives."""
    return [path for path, update in ((README, updated_readme), (HELM_SCHEMA, updated_schema))
            if update(path.read_text(encoding="utf-8")) != path.read_text(encoding="utf-8")]


def main(argv: list[str]) -> int:
    if argv[1:] == ["--check"]:
        stale = drifted()
        for path in stale:
            print(f"{path.relative_to(ROOT)} is not what the registry gives: run {COMMAND}", file=sys.stderr)
        return 1 if stale else 0
    for path, update in ((README, updated_readme), (HELM_SCHEMA, updated_schema)):
        text = path.read_text(encoding="utf-8")
        if update(text) != text:
            path.write_text(update(text), encoding="utf-8")
            print(f"wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
