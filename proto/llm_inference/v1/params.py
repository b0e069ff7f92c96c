"""The generation parameters, each defined once: the registry both sides of the contract read.

Each Param states a parameter's name, SQL type (and so its Python type), default, range, unit and
meaning; PARAMS lists them in the order the tables show them.  Everything else is derived:
- inference.proto's GenerationParams carries one documented `optional` field per parameter, of
  the same name and width (tests/unit/test_params_registry.py checks they agree);
- the FDW (llm_tables.declarations) declares one request column of llm.completions per parameter,
  settable as a table option or server default (`default_<name>`), checked against the range when
  the DDL runs and when a query runs;
- the sidecar (llm_sidecar.servicer) reads each field from the message, falls back to the model's
  YAML default (llm_sidecar.config.RequestDefaults, built from PARAMS) and then to the default
  here, checks the range and hands the engine a mapping by name; an engine renames only where its
  own name differs (llama.cpp's repeat_penalty);
- helm/values.schema.json's model `defaults` and README.md's table of generation parameters are
  written from PARAMS by `python -m deploy.params_reference` (and a unit test fails when they drift).
So a value is refused with the same words wherever it is caught, and NaN or infinity nowhere passes.
What a model adds (max_tokens at most its context length) is checked by the sidecar alone.

A new parameter that both engines take under the same name as the proto field is two edits: its
field in GenerationParams and its entry in PARAMS.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

INT32_MAX = 2**31 - 1
# A request column's SQL type -> the Python type its values have on both sides
_PYTHON_TYPES: dict[str, type] = {"integer": int, "bigint": int, "double precision": float}


@dataclass(frozen=True)
class Param:
    """One generation parameter: its type, default, range, unit and what it means (for hints
    and the docs)."""

    name: str
    sql_type: str               # the request column's type: integer, bigint or double precision
    low: int | float            # the least valid value (excluded when low_open)
    high: int | float           # the greatest valid value (included)
    doc: str                    # what it does, in one or two sentences (hints, README, schema)
    default: int | float | None = None   # what a request that sets it nowhere gets (None: the engine's own)
    unit: str = ""              # e.g. "tokens"
    low_open: bool = False
    note: str = ""              # shown after the range, e.g. " (0 = greedy)"
    open_above: bool = False    # `high` is only the proto field's width: say "at least <low>"

    @property
    def kind(self) -> type:
        """The Python type of its values (int or float)."""
        return _PYTHON_TYPES[self.sql_type]

    @property
    def range(self) -> str:
        """The valid values in words: "in [0, 2]", "in (0, 1]" or "at least 1"."""
        if self.open_above:
            return f"at least {self.low}"
        return f"in {'(' if self.low_open else '['}{_shown(self.low)}, {_shown(self.high)}]"

    @property
    def bounds(self) -> dict[str, int | float]:
        """The range as JSON Schema keywords (helm/values.schema.json; the YAML's check)."""
        return {"exclusiveMinimum" if self.low_open else "minimum": self.low, "maximum": self.high}

    def problem(self, value: object, label: str | None = None) -> str | None:
        """Why `value` is not valid for this parameter (the message names it as `label`), or None."""
        label = label or self.name
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not number or (self.kind is int and not isinstance(value, int)):
            kind = "an integer" if self.kind is int else "a number"
            return f"{label} must be {kind}, got {value!r}"
        if self.open_above and value > self.high:
            return f"{label} must be at most {self.high}, got {_shown(value)}"
        above_low = value > self.low if self.low_open else value >= self.low
        if above_low and value <= self.high and math.isfinite(value):   # NaN compares false, inf is not finite
            return None
        return f"{label} must be {self.range}{self.note}, got {_shown(value)}"

    @property
    def hint(self) -> str:
        return f"{self.name}: {self.doc}"


def _shown(value: int | float) -> str:
    """2 rather than 2.0, nan and inf as Python and Postgres both read them."""
    return str(value) if isinstance(value, int) else f"{value:g}"


PARAMS: tuple[Param, ...] = (
    Param("max_tokens", "integer", 1, INT32_MAX, open_above=True, default=128, unit="tokens",
          doc="the most tokens the model may generate for one prompt (and at most the model's context "
              "length; SELECT name, context_length FROM llm.models; shows it)."),
    Param("temperature", "double precision", 0.0, 2.0, note=" (0 = greedy)", default=0.0,
          doc="0 takes the likeliest token each time (greedy: the same answer every time); higher values, "
              "up to 2, sample more freely."),
    Param("top_p", "double precision", 0.0, 1.0, low_open=True,
          doc="nucleus sampling: sample only from the likeliest tokens whose probabilities add up to top_p; "
              "1 (the engine's default) considers every token."),
    # llama.cpp takes a 32-bit seed and reads 0xFFFFFFFF as "random": 31 bits are what every engine takes.
    Param("seed", "bigint", 0, INT32_MAX,
          doc="the random seed of sampled decoding (temperature > 0): the same seed gives the same answer."),
    # The penalties: llama.cpp counts the last 64 tokens (its repeat_last_n), vLLM all of them.
    Param("frequency_penalty", "double precision", -2.0, 2.0,
          doc="OpenAI's frequency penalty: lowers each token's score by this much for every time it already "
              "appeared, so positive values make repeating the same words less likely (unset: 0, off)."),
    Param("presence_penalty", "double precision", -2.0, 2.0,
          doc="OpenAI's presence penalty: lowers the score of every token that already appeared by this much, "
              "once, so positive values push towards new words (unset: 0, off)."),
    Param("repetition_penalty", "double precision", 0.0, 2.0, low_open=True,
          doc="penalises tokens that already appeared by this factor: above 1 discourages repeats, below 1 "
              "favours them (unset: 1, off)."),
)

BY_NAME: dict[str, Param] = {p.name: p for p in PARAMS}
