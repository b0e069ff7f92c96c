"""The sidecar's YAML config: tenants, auth and limits; every mistake is an error naming where."""
from __future__ import annotations

import pytest

from llm_sidecar.config import ConfigError, Limits, load_config

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
    assert config.auth == "off" and config.tenants == []
    assert config.limits("anyone") == Limits()


def test_tenants_limits_fall_back_to_default_limits(tmp_path):
    config = load(tmp_path, """
auth: required
default_limits: {max_in_flight: 16, max_queued: 64}
tenants:
  - {name: acme, token: "s3cret", max_in_flight: 4, max_queued: 8}
  - {name: beta, token: "t0ken", max_queued: 0}
""")
    assert config.auth == "required" and config.tenant("acme").token == "s3cret"
    assert config.limits("acme") == Limits(max_in_flight=4, max_queued=8)
    assert config.limits("beta") == Limits(max_in_flight=16, max_queued=0)
    assert config.limits("other") == Limits(max_in_flight=16, max_queued=64)


def test_bare_off_is_auth_off(tmp_path):
    assert load(tmp_path, "auth: off\n").auth == "off"


@pytest.mark.parametrize("text, words", [
    ("auth: on\n", "auth: must be one of 'off' or 'required', not True"),
    ("tenant: []\n", "unknown top-level keys ['tenant']"),
    ("default_limits: {max_inflight: 3}\n", "unknown keys ['max_inflight']"),
    ("default_limits: {max_in_flight: 0}\n", "default_limits.max_in_flight: must be >= 1, not 0"),
    ("tenants: [{name: a, token: x, max_queued: -1}]\n", "tenants[0].max_queued: must be >= 0, not -1"),
    ("tenants: [{name: a, tokn: x}]\n", "tenants[0]: unknown keys ['tokn']"),
    ("tenants: [{name: a}, {name: a}]\n", "tenants[1].name: 'a' is configured twice"),
    ("tenants: [{name: a, token: 1234}]\n", "tenants[0].token: must be a string, not 1234 (quote it)"),
    ("auth: required\ntenants: [{name: a}]\n", "tenants[0].token: auth is required, so tenant 'a' needs a token"),
    ("auth: required\n", "tenants: auth is required, so at least one tenant (with a token) is needed"),
])
def test_mistakes_are_errors_that_say_where(tmp_path, text, words):
    with pytest.raises(ConfigError) as exc:
        load(tmp_path, text)
    assert words in str(exc.value)
