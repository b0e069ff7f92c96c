"""The generation parameters' types and ranges, defined once for both sides of the contract.

GenerationParams (inference.proto) carries max_tokens, temperature, top_p and seed; this module
says which values are valid.  The FDW (llm_tables) checks table and server options against it
when the DDL runs and request columns when a query runs; the sidecar (llm_sidecar.servicer and
its YAML's model defaults) checks every request against it before an engine sees it.  So a value
is refused with the same words wherever it is caught, and NaN or infinity nowhere passes.

What a model adds (max_tokens at most its context length) is checked by the sidecar alone.
"""
from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Param:
    """One request parameter: its type, its range and what it means (for hints)."""

    name: str
    kind: type            # int or float
    low: int | float      # the least valid value (excluded when low_open)
    high: int | float     # the greatest valid value (included)
    meaning: str          # one sentence for hints
    low_open: bool = False
    note: str = ""        # shown after the range, e.g. "(0 = greedy)"
    open_above: bool = False   # `high` is only the proto field's width: say "at least <low>"

    @property
    def range(self) -> str:
        """The valid values in words: "in [0, 2]", "in (0, 1]" or "at least 1"."""
        if self.open_above:
            return f"at least {self.low}"
        return f"in {'(' if self.low_open else '['}{_shown(self.low)}, {_shown(self.high)}]"

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
        return f"{self.name}: {self.meaning}"


def _shown(value: int | float) -> str:
    """2 rather than 2.0, nan and inf as Python and Postgres both read them."""
    return str(value) if isinstance(value, int) else f"{value:g}"


INT32_MAX = 2**31 - 1

MAX_TOKENS = Param("max_tokens", int, 1, INT32_MAX, open_above=True,
                   meaning="the most tokens the model may generate for one prompt (and at most the model's "
                           "context length; SELECT name, context_length FROM llm.models; shows it).")
TEMPERATURE = Param("temperature", float, 0.0, 2.0, note=" (0 = greedy)",
                    meaning="0 takes the likeliest token each time (greedy: the same answer every time); "
                            "higher values, up to 2, sample more freely.")
TOP_P = Param("top_p", float, 0.0, 1.0, low_open=True,
              meaning="nucleus sampling: sample only from the likeliest tokens whose probabilities add up "
                      "to top_p; 1 considers every token.")
# llama.cpp takes a 32-bit seed and reads 0xFFFFFFFF as "random": 31 bits are what every engine takes.
SEED = Param("seed", int, 0, INT32_MAX,
             meaning="the random seed of sampled decoding (temperature > 0): the same seed gives the same answer.")

PARAMS: dict[str, Param] = {p.name: p for p in (MAX_TOKENS, TEMPERATURE, TOP_P, SEED)}
