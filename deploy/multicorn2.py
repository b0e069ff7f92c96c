"""Build the real Multicorn2 (vendored source tarball) against the embedded Postgres, for
tests/test_multicorn2.py, which runs llmfdw's FDW classes under it unchanged.

    python deploy/multicorn2.py [--pg-config PATH] [--tarball PATH] [--force]
    python deploy/multicorn2.py --print-python-dir     # where its Python package went

Run it with the project venv's Python (`make multicorn2` does). It builds only what is missing and
says what it does:

  1. extracts the tarball into <venv>/multicorn2/src/ (never into the repository);
  2. builds multicorn.so with PGXS against the embedded Postgres's pg_config, linking Debian's
     libpython3.11 (/usr/bin/python3.11-config), as llmfdw's own host does, so that the server
     user `embedded_postgres` can load it; the gcc-12 flag fix of environment.md applies;
  3. installs multicorn.so, multicorn.control and multicorn--<version>.sql into the wheel's
     pginstall/ (Multicorn2's own `make install` would also pip-install its Python package into
     the system Python, which we do not want);
  4. puts Multicorn2's Python package `multicorn` (with its C helper `multicorn._utils`, compiled
     against Debian's Python headers and the Postgres server headers, as its setup.py does) in
     <venv>/multicorn2/python/multicorn.

Step 4 keeps the real package apart from the venv's site-packages, where `multicorn` is llmfdw's
own implementation of the API (fdw/multicorn). Multicorn2 never touches sys.path: its backends
see the interpreter's defaults plus the postmaster's PYTHONPATH, so a cluster that runs it is
started with PYTHONPATH=<venv>/multicorn2/python:<venv site-packages> (real package first). The
llmfdw host ignores PYTHONPATH (isolated interpreter config; its sys.path comes from the GUC
llmfdw.python_path), so that setting does not change it.

A missing tarball is not an error: the script says so and exits 0, and the test skips.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

try:  # run as deploy/multicorn2.py, or imported as deploy.multicorn2
    import vendored
except ImportError:
    from deploy import vendored

REPO = Path(__file__).resolve().parent.parent
VERSION = "3.2"
TARBALL_NAME = f"multicorn2-{VERSION}.tar.gz"
# Debian's interpreter: the library the backend embeds (same as fdw/Makefile's PYTHON_CONFIG).
SYSTEM_PYTHON = "/usr/bin/python3.11"
SYSTEM_PYTHON_CONFIG = "/usr/bin/python3.11-config"
# The embedded Postgres was built with GCC 14; gcc 12 rejects this flag (environment.md).
GCC14_ONLY_FLAGS = {"-Wmissing-variable-declarations"}


def log(msg: str) -> None:
    print(f"multicorn2: {msg}", flush=True)


def venv_dir() -> Path:
    """The venv's real directory (a symlink target under /var/tmp when the clone is under /root)."""
    return Path(sys.prefix).resolve()


def build_root() -> Path:
    return venv_dir() / "multicorn2"


def python_dir() -> Path:
    """The directory to put first on a Multicorn2 backend's sys.path (holds `multicorn/`)."""
    return build_root() / "python"


def default_pg_config() -> Path:
    return (venv_dir() / "lib" / "python3.11" / "site-packages" / "embedded_postgres" / "pginstall"
            / "bin" / "pg_config")


def find_tarball(given: str | None) -> Path | None:
    """--tarball, else $LLMFDW_MULTICORN2_TARBALL, else the shared vendor directory."""
    return vendored.find(TARBALL_NAME, "LLMFDW_MULTICORN2_TARBALL", given)


def pg_config(pgc: Path, what: str) -> str:
    return subprocess.run([str(pgc), f"--{what}"], check=True, capture_output=True, text=True).stdout.strip()


def utils_suffix() -> str:
    """EXT_SUFFIX of the embedded interpreter (Debian's), e.g. .cpython-311-x86_64-linux-gnu.so."""
    out = subprocess.run([SYSTEM_PYTHON, "-c", "import sysconfig; print(sysconfig.get_config_var('EXT_SUFFIX'))"],
                         check=True, capture_output=True, text=True).stdout.strip()
    return out or sysconfig.get_config_var("EXT_SUFFIX")


def run(cmd: list, **kwargs) -> None:
    log("$ " + " ".join(map(str, cmd)))
    proc = subprocess.run([str(c) for c in cmd], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          **kwargs)
    if proc.returncode != 0:
        sys.stdout.write(proc.stdout[-6000:])
        raise SystemExit(f"multicorn2: failed (exit {proc.returncode}): {' '.join(map(str, cmd))}")


def targets(pgc: Path) -> dict[str, Path]:
    """Everything a complete install consists of."""
    pkglib = Path(pg_config(pgc, "pkglibdir"))
    ext = Path(pg_config(pgc, "sharedir")) / "extension"
    return {
        "library": pkglib / "multicorn.so",
        "control": ext / "multicorn.control",
        "script": ext / f"multicorn--{VERSION}.sql",
        "package": python_dir() / "multicorn" / "__init__.py",
        "utils": python_dir() / "multicorn" / f"_utils{utils_suffix()}",
        "stamp": build_root() / "installed.sha256",
    }


def missing(pgc: Path, tarball: Path) -> list[str]:
    want = targets(pgc)
    gone = [name for name, path in want.items() if not path.exists()]
    if not gone and want["stamp"].read_text().strip() != vendored.sha256(tarball):
        gone.append("stamp (a different tarball)")
    return gone


def extract(tarball: Path) -> Path:
    tops = vendored.unpack(tarball, build_root() / "src", log)
    if len(tops) != 1 or not (tops[0] / "multicorn.control").exists():
        raise SystemExit(f"multicorn2: unexpected tarball layout in {tarball}")
    return tops[0]


def build(pgc: Path, tarball: Path) -> None:
    for tool in (SYSTEM_PYTHON, SYSTEM_PYTHON_CONFIG):
        if not Path(tool).exists():
            raise SystemExit(f"multicorn2: {tool} is missing (apt-get install python3.11-dev; `make sysdeps`)")
    src = extract(tarball)
    cflags = " ".join(f for f in pg_config(pgc, "cflags").split() if f not in GCC14_ONLY_FLAGS)
    jobs = str(min(4, os.cpu_count() or 1))
    # The C extension: PGXS, with Debian's libpython (PYTHON_OVERRIDE/PYTHON_CONFIG select it in
    # Multicorn2's Makefile), no LLVM bitcode (the wheel's server has no JIT provider).
    run(["make", "-C", src, "-j", jobs, f"PG_CONFIG={pgc}", f"PYTHON_OVERRIDE={SYSTEM_PYTHON}",
         f"PYTHON_CONFIG={SYSTEM_PYTHON_CONFIG}", f"CFLAGS={cflags}", "with_llvm=no"])
    want = targets(pgc)
    # Install the server side by hand: Multicorn2's `make install` also runs pip on the system
    # Python (its python_code target).
    for name, source, mode in (("library", src / "multicorn.so", 0o755),
                               ("control", src / "multicorn.control", 0o644),
                               ("script", src / "sql" / f"multicorn--{VERSION}.sql", 0o644)):
        log(f"installing {source.name} -> {want[name]}")
        shutil.copyfile(source, want[name])
        want[name].chmod(mode)
    # The Python package, beside (not inside) the venv's site-packages.
    pkg = python_dir() / "multicorn"
    if python_dir().exists():
        shutil.rmtree(python_dir())
    log(f"copying its Python package to {pkg}")
    shutil.copytree(src / "python" / "multicorn", pkg, ignore=shutil.ignore_patterns("__pycache__"))
    init = pkg / "__init__.py"
    init.write_text(init.read_text().replace("'__VERSION__'", f"'{VERSION}'"))  # as its release-zip does
    # multicorn._utils, as its setup.py builds it: src/utils.c against the Postgres headers.
    includes = subprocess.run([SYSTEM_PYTHON_CONFIG, "--includes"], check=True, capture_output=True,
                              text=True).stdout.split()
    pg_includes = [f"-I{pg_config(pgc, d)}" for d in ("includedir", "pkgincludedir", "includedir-server")]
    run(["gcc", "-shared", "-fPIC", "-O2", "-fwrapv", "-fno-strict-aliasing", *includes, *pg_includes,
         f"-I{src / 'src'}", src / "src" / "utils.c", "-o", want["utils"]])
    want["stamp"].write_text(vendored.sha256(tarball) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pg-config", default=None, help="pg_config of the embedded Postgres")
    parser.add_argument("--tarball", default=None, help=f"the vendored {TARBALL_NAME}")
    parser.add_argument("--force", action="store_true", help="rebuild even if everything is installed")
    parser.add_argument("--print-python-dir", action="store_true",
                        help="print the directory holding the real `multicorn` package, build nothing")
    args = parser.parse_args(argv)
    if args.print_python_dir:
        print(python_dir())
        return 0
    pgc = Path(args.pg_config) if args.pg_config else default_pg_config()
    if not pgc.exists():
        raise SystemExit(f"multicorn2: {pgc} not found (run `make install` first)")
    tarball = find_tarball(args.tarball)
    if tarball is None:
        log(f"{TARBALL_NAME} not found (looked at $LLMFDW_MULTICORN2_TARBALL and "
            f"{', '.join(str(d / TARBALL_NAME) for d in vendored.VENDOR_DIRS)}); not building it, tests/test_multicorn2.py will skip")
        return 0
    gone = [] if args.force else missing(pgc, tarball)
    if not args.force and not gone:
        log(f"Multicorn2 {VERSION} is installed in {pgc.parent.parent} (python package: {python_dir()}); nothing to do")
        return 0
    log(f"building Multicorn2 {VERSION} ({'forced' if args.force else 'missing: ' + ', '.join(gone)})")
    old = os.umask(0o022)  # the Postgres server user must read all of it
    try:
        build(pgc, tarball)
    finally:
        os.umask(old)
    log(f"done: CREATE EXTENSION multicorn works in clusters of {pgc.parent.parent}; start such a cluster with "
        f"PYTHONPATH={python_dir()}:<venv site-packages>")
    return 0


if __name__ == "__main__":
    sys.exit(main())
