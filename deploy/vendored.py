"""The vendored sources in shared/vendor (Multicorn2, pgvector; PostgreSQL licence): where a tarball
is, how it is unpacked for a build, and which tarball a build came from.  They are read from the
shared directory beside the checkout and unpacked under the venv, never copied into the repository."""
from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parent.parent
# The shared directory beside the checkout (CI lays a copy there), then the workplace's own.
VENDOR_DIRS = [REPO.parent / "shared" / "vendor", Path("/work/shared/vendor")]


def find(name: str, env: str, given: str | None = None) -> Path | None:
    """The tarball called `name`: `given`, else $`env`, else the first vendor directory that has it."""
    override = os.environ.get(env)
    for candidate in [*([Path(given)] if given else []), *([Path(override)] if override else []),
                      *(d / name for d in VENDOR_DIRS)]:
        if candidate.is_file():
            return candidate.resolve()
    return None


def sha256(path: Path) -> str:
    """The stamp a build keeps, so a different tarball means a rebuild."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def unpack(tarball: Path, into: Path, log: Callable[[str], None]) -> list[Path]:
    """Unpack `tarball` into an emptied `into`; its top-level directories."""
    if into.exists():
        shutil.rmtree(into)
    into.mkdir(parents=True)
    log(f"extracting {tarball} into {into}")
    with tarfile.open(tarball) as tar:
        tar.extractall(into, filter="data")
    return [p for p in into.iterdir() if p.is_dir()]
