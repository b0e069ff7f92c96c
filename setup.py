"""Packaging for llmfdw's Python half: the proto stubs, the sidecar, the FDW classes.

The gRPC stubs are generated from proto/ at build time (never committed), so the
.proto file stays the one source of truth for both halves.
"""
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).parent.resolve()
PROTO_DIR = ROOT / "proto"


class BuildWithProtos(build_py):
    """build_py that first compiles proto/**/*.proto into the build tree."""

    def run(self) -> None:
        super().run()
        from grpc_tools import protoc  # build-time dependency (pyproject.toml)
        import grpc_tools

        include = str(Path(grpc_tools.__file__).parent / "_proto")
        for proto in sorted(PROTO_DIR.rglob("*.proto")):
            args = [
                "protoc",
                f"-I{PROTO_DIR}",
                f"-I{include}",
                f"--python_out={self.build_lib}",
                f"--pyi_out={self.build_lib}",
                f"--grpc_python_out={self.build_lib}",
                str(proto),
            ]
            if protoc.main(args) != 0:
                raise RuntimeError(f"protoc failed on {proto}")


setup(
    name="llmfdw",
    version="0.1.0",
    description="Open-weight LLMs and embedding models as Postgres foreign tables, served by a gRPC sidecar",
    python_requires=">=3.11,<3.12",
    package_dir={
        "llmfdw": "proto/llmfdw",
        "llmfdw.v1": "proto/llmfdw/v1",
        "llmfdw.sidecar": "sidecar",
        "llmfdw.sidecar.engines": "sidecar/engines",
        "llmfdw.fdw": "fdw/python",
        "multicorn": "fdw/multicorn",
    },
    packages=[
        "llmfdw",
        "llmfdw.v1",
        "llmfdw.sidecar",
        "llmfdw.sidecar.engines",
        "llmfdw.fdw",
        "multicorn",
    ],
    package_data={"llmfdw.sidecar": ["*.yaml"]},
    cmdclass={"build_py": BuildWithProtos},
    entry_points={"console_scripts": ["llmfdw-sidecar = llmfdw.sidecar.server:main"]},
)
