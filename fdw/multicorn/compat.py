"""Multicorn2's ``multicorn.compat``: names its FDW modules import (Python 3 only here)."""
from __future__ import annotations

unicode_ = str
basestring_ = str


def bytes_(value: str) -> bytes:
    return bytes(value, "utf8")
