"""Init step: write the sidecar's one YAML from the ConfigMap and the tenants' Secret.

    python render_config.py CONFIGMAP_YAML TOKENS_DIR OUTPUT

The ConfigMap holds everything but the tokens (models, auth, limits, tenants by name); the Secret,
mounted as TOKENS_DIR, holds one file per tenant, named after it, whose content is its token.  The
result goes to a memory-backed emptyDir, readable by the sidecar's user only, and is checked with
the sidecar's own loader, so a bad config fails here with the sidecar's message.
"""
import os
import sys

import yaml


def main(source: str, tokens_dir: str, output: str) -> int:
    with open(source, encoding="utf-8") as fh:
        config = yaml.safe_load(fh) or {}
    auth_required = config.get("auth") == "required"
    for tenant in config.get("tenants") or []:
        path = os.path.join(tokens_dir, tenant["name"])
        if os.path.exists(path):
            with open(path, encoding="utf-8") as fh:
                tenant["token"] = fh.read().strip()
        elif auth_required:
            print(f"render-config: auth is required but the tenants' Secret has no key {tenant['name']!r}",
                  file=sys.stderr)
            return 1
    os.umask(0o077)
    tmp = output + ".tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        yaml.safe_dump(config, fh, sort_keys=False)
    os.replace(tmp, output)
    try:
        from llm_sidecar.config import ConfigError, load_config
    except ImportError:
        return 0
    try:
        load_config(output)
    except ConfigError as err:
        print(f"render-config: {err}", file=sys.stderr)
        return 1
    print(f"render-config: wrote {output} ({len(config.get('models') or [])} model(s), "
          f"{len(config.get('tenants') or [])} tenant(s), auth {config.get('auth', 'off')})")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
