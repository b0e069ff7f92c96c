"""The sidecar's YAML config: tenants, auth and limits; every mistake is an error naming where."""
from __future__ import annotations

import pytest

from llmfdw.sidecar.config import ConfigError, Limits, load_config

MODEL = """
models:
  - {name: m, task: embed, engine: sentence_transformers, source: {path: /x}}
"""


def load(tmp_path, text: str):
    path = tmp_path / "c.yaml"
    path.write_text(MODEL + text)
    return load_config(path)


def test_packaged_config_has_auth_off_and_default_limits():
    config = load_config()
    assert config.auth == "off" and config.tenants == {}
    assert config.limits("anyone") == Limits()


def test_tenants_limits_fall_back_to_default_limits(tmp_path):
    config = load(tmp_path, """
auth: required
default_limits: {max_in_flight: 16, max_queued: 64}
tenants:
  - {name: acme, token: "s3cret", max_in_flight: 4, max_queued: 8}
  - {name: beta, token: "t0ken", max_queued: 0}
""")
    assert config.auth == "required" and config.tenants["acme"].token == "s3cret"
    assert config.limits("acme") == Limits(4, 8)
    assert config.limits("beta") == Limits(16, 0)
    assert config.limits("other") == Limits(16, 64)


def test_bare_off_is_auth_off(tmp_path):
    assert load(tmp_path, "auth: off\n").auth == "off"


@pytest.mark.parametrize("text, words", [
    ("auth: on\n", "auth must be one of"),
    ("tenant: []\n", "unknown top-level keys ['tenant']"),
    ("default_limits: {max_inflight: 3}\n", "unknown keys ['max_inflight']"),
    ("default_limits: {max_in_flight: 0}\n", "max_in_flight: must be an integer >= 1"),
    ("tenants: [{name: a, token: x, max_queued: -1}]\n", "tenant a: max_queued"),
    ("tenants: [{name: a, tokn: x}]\n", "unknown keys ['tokn']"),
    ("tenants: [{name: a}, {name: a}]\n", "tenant a is configured twice"),
    ("tenants: [{name: a, token: 1234}]\n", "token must be a string"),
    ("auth: required\ntenants: [{name: a}]\n", "tenant a: auth is required, so it needs a token"),
    ("auth: required\n", "no tenants are configured"),
])
def test_mistakes_are_errors_that_say_where(tmp_path, text, words):
    with pytest.raises(ConfigError) as exc:
        load(tmp_path, text)
    assert words in str(exc.value)
