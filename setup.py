"""Packaging for llmfdw's Python half: the gRPC stubs (llm_inference), the sidecar
(llm_sidecar), the FDW classes (llm_tables) and the Multicorn2 API they are written against
(multicorn).

The gRPC stubs are generated from proto/ at build time (never committed), so the
.proto file stays the one source of truth for both halves.
"""
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).parent.resolve()
PROTO_DIR = ROOT / "proto"
# (component folder, package): the package's files are <component folder>/<package>/.
PACKAGE_ROOTS = (("proto", "llm_inference"), ("fdw", "llm_tables"), ("fdw", "multicorn"),
                 ("sidecar", "llm_sidecar"))
SUBPACKAGES = {"llm_inference": ("", ".v1"), "llm_sidecar": ("", ".engines")}


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
    version="0.3.0",
    description="Open-weight LLMs and embedding models as Postgres foreign tables, served by a gRPC sidecar",
    python_requires=">=3.11,<3.12",
    # Each Python package is the folder of the same name one level under its component folder
    # (README, "Where the code lives"): llm_inference -> proto/llm_inference, llm_tables and
    # multicorn -> fdw/<name>, llm_sidecar -> sidecar/llm_sidecar.
    package_dir={name: f"{root}/{name}" for root, name in PACKAGE_ROOTS},
    packages=[f"{name}{sub}" for root, name in PACKAGE_ROOTS for sub in SUBPACKAGES.get(name, ("",))],
    package_data={"llm_sidecar": ["*.yaml"]},
    cmdclass={"build_py": BuildWithProtos},
    entry_points={"console_scripts": ["llmfdw-sidecar = llm_sidecar.server:main"]},
)
