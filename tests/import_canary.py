"""A module whose import leaves a mark: tests check that no role can make a backend import
code by naming it in an option (the mark is a file the backend's user can write)."""
from pathlib import Path

MARK = Path("/tmp/llmfdw-import-canary")
MARK.write_text("imported\n")


class Canary:
    """A class to name as a wrapper."""
