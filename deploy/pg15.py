"""PostgreSQL 15 beside the wheel's 18: Debian's packages, pgvector and llmfdw built into them, for
tests/test_pg15.py (the second major version the extension is tested on).

    python deploy/pg15.py [--force]      # install/build what is missing, say what it does
    python deploy/pg15.py --check        # print what is missing (nothing: exit 0), change nothing

Run it with the project venv's Python from the repository root (`make pg15` does; `make test`
runs it first). It does only what is missing, and says so:

  1. Debian bookworm's postgresql-15 and postgresql-server-dev-15, with apt-get, as root (no
     prompts). The package makes a cluster 15/main on port 5432 and may start it: it is stopped
     and set to `manual` in /etc/postgresql/15/main/start.conf, so that it holds no port and does
     not start at boot. The tests start throwaway clusters of their own.
  2. pgvector, from the vendored ../shared/vendor/pgvector-0.8.6.tar.gz (never copied into the
     repository; also looked for in /work/shared/vendor), built in <venv>/pg15/ and installed
     into PostgreSQL 15's directories.
  3. llmfdw (fdw/), built out of tree: fdw/'s sources are copied to <venv>/pg15/llmfdw/ (the
     wheel's PostgreSQL 18 build keeps its objects in fdw/ itself), built with PGXS against
     /usr/lib/postgresql/15/bin/pg_config and installed there. A later run copies only changed
     sources, so make rebuilds only what changed, and installs only when the result differs
     from what is installed.

Without root, missing packages are not an error: the script says what to run and exits 0, and
tests/test_pg15.py skips. A missing pgvector tarball is the same.
"""
from __future__ import annotations

import argparse
import filecmp
import os
import shutil
import subprocess
import sys
from pathlib import Path

try:  # run as deploy/pg15.py, or imported as deploy.pg15
    import vendored
except ImportError:
    from deploy import vendored

REPO = Path(__file__).resolve().parent.parent
MAJOR = 15
# libkrb5-dev: Debian's PostgreSQL 15 is built with GSSAPI, so its libpq/libpq-be.h (which the host's
# python.c includes, to check the client connection) includes <gssapi/gssapi.h>.
PACKAGES = [f"postgresql-{MAJOR}", f"postgresql-server-dev-{MAJOR}", "libkrb5-dev"]
BINDIR = Path(f"/usr/lib/postgresql/{MAJOR}/bin")
PG_CONFIG = BINDIR / "pg_config"
PGVECTOR_VERSION = "0.8.6"
PGVECTOR_TARBALL = f"pgvector-{PGVECTOR_VERSION}.tar.gz"
FDW = REPO / "fdw"
# What a PGXS build of fdw/ reads: copied to the build directory.
FDW_SOURCES = ["Makefile", "*.control", "*.sql", "src/*.c", "src/*.h"]


def log(msg: str) -> None:
    print(f"pg{MAJOR}: {msg}", flush=True)


def run(cmd: list, **kwargs) -> str:
    log("$ " + " ".join(map(str, cmd)))
    proc = subprocess.run([str(c) for c in cmd], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          stdin=subprocess.DEVNULL, **kwargs)
    if proc.returncode != 0:
        sys.stdout.write(proc.stdout[-6000:])
        raise SystemExit(f"pg{MAJOR}: failed (exit {proc.returncode}): {' '.join(map(str, cmd))}")
    return proc.stdout


def build_root() -> Path:
    """<venv>/pg15: the venv's real directory (a symlink target under /var/tmp for a clone under
    /root), never the repository."""
    return Path(sys.prefix).resolve() / f"pg{MAJOR}"


def find_tarball() -> Path | None:
    """$LLMFDW_PGVECTOR_TARBALL, else the shared vendor directory."""
    return vendored.find(PGVECTOR_TARBALL, "LLMFDW_PGVECTOR_TARBALL")


def pg_config(what: str) -> Path:
    return Path(subprocess.run([str(PG_CONFIG), f"--{what}"], check=True, capture_output=True,
                               text=True).stdout.strip())


# --------------------------------------------------------------------------------------------
# 1. Debian's packages

def missing_packages() -> list[str]:
    if shutil.which("dpkg-query") is None:  # not Debian: none of them
        return list(PACKAGES)
    gone = []
    for pkg in PACKAGES:
        proc = subprocess.run(["dpkg-query", "-W", "-f=${Status}", pkg], capture_output=True, text=True)
        if proc.returncode != 0 or "install ok installed" not in proc.stdout:
            gone.append(pkg)
    return gone


def install_packages(gone: list[str]) -> None:
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    log(f"installing {', '.join(gone)} with apt-get")
    run(["apt-get", "update", "-qq"], env=env)
    run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *gone], env=env)


def park_main_cluster() -> None:
    """The package's cluster 15/main: stopped, and `manual` so that nothing starts it on 5432."""
    start_conf = Path(f"/etc/postgresql/{MAJOR}/main/start.conf")
    if not start_conf.exists():
        return
    status = subprocess.run(["pg_ctlcluster", str(MAJOR), "main", "status"], capture_output=True, text=True)
    if status.returncode == 0:  # 0: running, 3: stopped
        log(f"stopping the package's cluster {MAJOR}/main (it holds port 5432)")
        run(["pg_ctlcluster", str(MAJOR), "main", "stop"])
    lines = start_conf.read_text().splitlines()
    if "manual" not in lines:
        log(f"setting {start_conf} to manual (the cluster {MAJOR}/main does not start by itself)")
        start_conf.write_text("\n".join(l for l in lines if l.strip() not in ("auto", "disabled"))
                              + "\nmanual\n")


# --------------------------------------------------------------------------------------------
# 2. pgvector

def pgvector_files() -> list[Path]:
    ext = pg_config("sharedir") / "extension"
    return [pg_config("pkglibdir") / "vector.so", ext / "vector.control",
            ext / f"vector--{PGVECTOR_VERSION}.sql"]


def pgvector_stamp() -> Path:
    return build_root() / "pgvector.sha256"


def pgvector_missing(tarball: Path) -> list[str]:
    gone = [str(p) for p in pgvector_files() if not p.exists()]
    stamp = pgvector_stamp()
    if not gone and (not stamp.exists() or stamp.read_text().strip() != vendored.sha256(tarball)):
        gone.append(f"{stamp} (built from another tarball)")
    return gone


def build_pgvector(tarball: Path) -> None:
    (src,) = [p for p in vendored.unpack(tarball, build_root() / "pgvector", log)
              if (p / "vector.control").exists()]
    jobs = str(min(4, os.cpu_count() or 1))
    # with_llvm=no: no JIT bitcode (it needs clang, and nothing needs the inlining).
    run(["make", "-C", src, "-j", jobs, f"PG_CONFIG={PG_CONFIG}", "with_llvm=no"])
    run(["make", "-C", src, f"PG_CONFIG={PG_CONFIG}", "with_llvm=no", "install"])
    pgvector_stamp().write_text(vendored.sha256(tarball) + "\n")


# --------------------------------------------------------------------------------------------
# 3. llmfdw, out of tree

def fdw_build_dir() -> Path:
    return build_root() / "llmfdw"


def sync_fdw_sources() -> list[str]:
    """Copy fdw/'s sources into the build directory where they differ (copy2 keeps mtimes, so
    make rebuilds only changed files); remove sources deleted from fdw/. Returns what changed."""
    dest = fdw_build_dir()
    want = {p.relative_to(FDW) for pattern in FDW_SOURCES for p in FDW.glob(pattern) if p.is_file()}
    have = {p.relative_to(dest) for pattern in FDW_SOURCES for p in dest.glob(pattern) if p.is_file()}
    changed = []
    for rel in sorted(want):
        target = dest / rel
        if target.exists() and filecmp.cmp(FDW / rel, target, shallow=False):
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(FDW / rel, target)
        changed.append(str(rel))
    for rel in sorted(have - want):
        (dest / rel).unlink()
        changed.append(f"{rel} (removed)")
    return changed


def fdw_installed_files() -> dict[Path, Path]:
    """Built file -> where `make install` puts it."""
    dest, ext = fdw_build_dir(), pg_config("sharedir") / "extension"
    pairs = {dest / "llmfdw.so": pg_config("pkglibdir") / "llmfdw.so"}
    for pattern in ("*.control", "*.sql"):
        for p in dest.glob(pattern):
            pairs[p] = ext / p.name
    return pairs


def build_fdw(force: bool) -> None:
    dest = fdw_build_dir()
    if force and dest.exists():
        shutil.rmtree(dest)
    changed = sync_fdw_sources()
    if changed:
        log(f"copied into {dest}: {', '.join(changed)}")
    # PGXS knows what is up to date; with_llvm=no as in fdw/Makefile (there it comes too late to
    # stop Debian's server from asking for bitcode).
    out = run(["make", "-C", dest, "-j", str(min(4, os.cpu_count() or 1)), f"PG_CONFIG={PG_CONFIG}",
               "with_llvm=no"])
    warnings = [line for line in out.splitlines() if "warning:" in line]
    if warnings:
        log(f"{len(warnings)} compiler warning(s):\n" + "\n".join(warnings))
    stale = [str(dst) for src, dst in fdw_installed_files().items()
             if not dst.exists() or not filecmp.cmp(src, dst, shallow=False)]
    if stale:
        run(["make", "-C", dest, f"PG_CONFIG={PG_CONFIG}", "with_llvm=no", "install"])
    else:
        log(f"llmfdw is installed in PostgreSQL {MAJOR} and up to date")


# --------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--force", action="store_true", help="rebuild pgvector and llmfdw")
    parser.add_argument("--check", action="store_true", help="print what is missing, change nothing")
    args = parser.parse_args(argv)

    tarball = find_tarball()
    gone = missing_packages()
    if args.check:
        problems = [f"packages {', '.join(gone)}"] if gone else []
        if tarball is None:
            problems.append(f"{PGVECTOR_TARBALL}")
        elif not gone:
            problems += pgvector_missing(tarball)
        print("\n".join(problems) or "ok")
        return 1 if problems else 0

    if gone:
        if shutil.which("apt-get") is None:
            log(f"{', '.join(gone)} not installed and there is no apt-get (not Debian): not building for "
                f"PostgreSQL {MAJOR}; tests/test_pg15.py will skip")
            return 0
        if os.geteuid() != 0:
            log(f"{', '.join(gone)} not installed and we are not root: not building for PostgreSQL {MAJOR} "
                f"(as root: apt-get install {' '.join(PACKAGES)}); tests/test_pg15.py will skip")
            return 0
        install_packages(gone)
    else:
        log(f"{', '.join(PACKAGES)} installed")
    if os.geteuid() == 0:
        park_main_cluster()

    if tarball is None:
        log(f"{PGVECTOR_TARBALL} not found (looked at $LLMFDW_PGVECTOR_TARBALL and "
            f"{', '.join(str(d / PGVECTOR_TARBALL) for d in vendored.VENDOR_DIRS)}); not building, tests/test_pg15.py will skip")
        return 0
    writable = os.access(pg_config("pkglibdir"), os.W_OK)
    old = os.umask(0o022)  # the server's OS user must read all of it
    try:
        build_root().mkdir(parents=True, exist_ok=True)
        missing = [] if args.force else pgvector_missing(tarball)
        if args.force or missing:
            if not writable:
                log(f"pgvector is missing from PostgreSQL {MAJOR} and {pg_config('pkglibdir')} is not "
                    f"writable (run as root); tests/test_pg15.py will skip")
                return 0
            log(f"building pgvector {PGVECTOR_VERSION} for PostgreSQL {MAJOR} "
                f"({'forced' if args.force else 'missing: ' + ', '.join(missing)})")
            build_pgvector(tarball)
        else:
            log(f"pgvector {PGVECTOR_VERSION} is installed in PostgreSQL {MAJOR}")
        if not writable:
            log(f"{pg_config('pkglibdir')} is not writable: not installing llmfdw (run as root)")
            return 0
        build_fdw(args.force)
    finally:
        os.umask(old)
    log(f"done: PostgreSQL {MAJOR} ({BINDIR}) has pgvector and llmfdw")
    return 0


if __name__ == "__main__":
    sys.exit(main())
