"""The Helm chart (helm/) and the Dockerfiles (docker/), checked with real tools, no cluster.

- Helm v4's own engine (helm-python-sdk bundles its Go SDK): `lint`, and `render` of every
  helm/ci/*.yaml values file, which also checks the values against values.schema.json.
- Every rendered manifest validates against the Kubernetes 1.33 API schemas (kubernetes-validate,
  strict: no unknown fields).
- checkov scans the rendered manifests and the Dockerfiles: no failed check. The open-source
  checkov gives no severities, so every failed check counts; each exception is a
  `checkov.io/skipN` annotation in the chart (or a `# checkov:skip=` line in a Dockerfile) with its
  reason, and the test checks that a reason is there.
- The shapes: what the sidecar, Service, GPU and tensor-parallel values turn into.
- The chart's init step (files/render_config.py) run for real on the rendered ConfigMap and
  Secret, then the sidecar's own config loader; a real sidecar with the rendered metrics
  arguments (its metrics port on every interface); files/probe.py against a real sidecar.
- The Dockerfiles cannot be built here (no Docker daemon, no registry): the test checks what can
  be checked: each one the chart names exists, base images are pinned by tag, every file they
  COPY exists.
"""
from __future__ import annotations

import base64
import json
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

helm_python = pytest.importorskip("helm_python", reason="requirements-deploy.txt is not installed (make test)")
kubernetes_validate = pytest.importorskip("kubernetes_validate")

REPO = Path(__file__).resolve().parent.parent
CHART = REPO / "helm"
DOCKER = REPO / "docker"
CI_VALUES = sorted((CHART / "ci").glob("*.yaml"))
KUBE_VERSION = "1.33"
RELEASE, NAMESPACE = "llm", "databases"
CHECKOV_TIMEOUT = 600


def _checkov() -> Path:
    from deploy import bootstrap

    return bootstrap.place(".venv") / "checkov" / "bin" / "checkov"


@pytest.fixture(scope="module")
def chart():
    return helm_python.Chart.load(str(CHART))


def _render(chart, values: dict) -> list[dict]:
    out = chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    docs = []
    for path, text in sorted(out.items()):
        for doc in yaml.safe_load_all(text):
            if doc:
                doc.setdefault("metadata", {}).setdefault("annotations", {})
                docs.append({**doc, "_template": path})
    return docs


def _values(path: Path) -> dict:
    return yaml.safe_load(path.read_text()) or {}


@pytest.fixture(scope="module")
def rendered(chart) -> dict[str, list[dict]]:
    """ci file name -> rendered documents (each with its template path under _template)."""
    return {p.name: _render(chart, _values(p)) for p in CI_VALUES}


def _kind(docs, kind: str, component: str | None = None) -> list[dict]:
    return [d for d in docs if d["kind"] == kind and
            (component is None or d["metadata"].get("labels", {}).get("app.kubernetes.io/component") == component)]


def _sidecar_config(docs) -> list[dict]:
    """The ConfigMap(s) holding the sidecar's YAML (not the dashboards' ConfigMap)."""
    return [d for d in _kind(docs, "ConfigMap") if "sidecar.yaml" in d.get("data", {})]


def _containers(pod_owner: dict) -> dict[str, dict]:
    spec = pod_owner["spec"]["template"]["spec"]
    return {c["name"]: c for c in spec.get("initContainers", []) + spec["containers"]}


def _strip(doc: dict) -> dict:
    return {k: v for k, v in doc.items() if k != "_template"}


# -- Helm itself -------------------------------------------------------------------------------

def test_ci_values_cover_every_shape():
    names = {p.name for p in CI_VALUES}
    assert {"cpu-values.yaml", "gpu-values.yaml", "tensor-parallel-values.yaml", "colocated-values.yaml",
            "shared-values.yaml"} <= names


@pytest.mark.parametrize("values", [None, *CI_VALUES], ids=lambda p: "defaults" if p is None else p.name)
def test_lint_is_clean(values):
    report = helm_python.lint(str(CHART), _values(values) if values else None, strict=True,
                              namespace=NAMESPACE, kube_version=f"v{KUBE_VERSION}.0")
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert not report["errors"] and not problems, report


@pytest.mark.parametrize("name", [p.name for p in CI_VALUES])
def test_every_manifest_validates_against_kubernetes_schemas(rendered, name):
    docs = rendered[name]
    assert docs
    for doc in docs:
        kubernetes_validate.validate(_strip(doc), KUBE_VERSION, strict=True)


BAD_VALUES = [
    ({"mode": "sidecar"}, "/mode"),
    ({"sidecar": {"gpu": {"count": -1}}}, "/sidecar/gpu/count"),
    ({"sidecar": {"grpcPort": "50051"}}, "/sidecar/grpcPort"),
    ({"sidecar": {"replicas": 0}}, "/sidecar/replicas"),
    ({"ddl": {"tls": {"caFile": "ca.pem"}}}, "/ddl/tls/caFile"),                # not an absolute path
    ({"ddl": {"tls": {"caFile": "/etc/it's.pem"}}}, "/ddl/tls/caFile"),        # a quote in the Job's shell
    ({"sidecar": {"tls": {"secretName": "Not_A_Name"}}}, "/sidecar/tls/secretName"),
    ({"sidecar": {"config": {"models": []}}}, "/sidecar/config/models"),
    ({"sidecar": {"config": {"auth": "maybe"}}}, "/sidecar/config/auth"),
    ({"sidecar": {"config": {"models": [{"name": "m", "task": "chat", "engine": "vllm", "source": {}}]}}},
     "/sidecar/config/models/0/task"),
    ({"sidecar": {"config": {"models": [{"name": "m", "task": "embed", "engine": "sentence_transformers",
                                         "source": {}, "max_batch": "64"}]}}}, "/sidecar/config/models/0/max_batch"),
    ({"sidecar": {"resources": {"requests": {"cpu": "lots", "memory": "1Gi"}, "limits": {"cpu": 1, "memory": "1Gi"}}}},
     "/sidecar/resources/requests/cpu"),
    ({"tenants": {"list": [{"name": "has space"}]}}, "/tenants/list/0/name"),
    ({"image": {"sidecar": {"repository": "llmfdw/sidecar", "tag": "latest"}}}, "/image/sidecar/tag"),
    ({"ddl": {"targets": [{"host": "pg; rm -rf /", "database": "app", "passwordSecret": {"name": "s"}}]}},
     "/ddl/targets/0/host"),
    ({"sidecar": {"unknown": 1}}, "unknown"),
]


@pytest.mark.parametrize("values,where", BAD_VALUES, ids=[w for _, w in BAD_VALUES])
def test_wrong_values_fail_at_install(chart, values, where):
    with pytest.raises(helm_python.HelmValuesError, match=re.escape(where)):
        chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)


TP_MODEL = {"name": "big", "task": "generate", "engine": "vllm", "source": {"path": "/models/big"},
            "engine_args": {"tensor_parallel_size": 4}}
FAILING_RENDERS = [
    ({"sidecar": {"gpu": {"count": 2}, "config": {"models": [TP_MODEL]}}}, "tensor_parallel_size 4 is more than"),
    ({"sidecar": {"config": {"models": [{**TP_MODEL, "engine_args": {}}]}}}, "set sidecar.gpu.count"),
    ({"sidecar": {"config": {"auth": "required", "models": [TP_MODEL]}, "gpu": {"count": 4}}}, "list the tenants"),
    ({"sidecar": {"config": {"auth": "required"}}, "tenants": {"list": [{"name": "a"}]}}, "tenant a has no token"),
    ({"mode": "colocated"}, "postgres.auth.existingSecret or postgres.auth.password"),
    ({"sidecar": {"tls": {"clientAuth": True}}}, "sidecar.tls.clientAuth needs sidecar.tls.secretName"),
    ({"ddl": {"tls": {"certFile": "/c.pem", "keyFile": "/k.pem"}}}, "need caFile"),
    ({"ddl": {"tls": {"caFile": "/ca.pem", "certFile": "/c.pem"}}}, "needs both certFile and keyFile"),
    ({"mode": "colocated", "postgres": {"auth": {"password": "x"}}, "ddl": {"tls": {"caFile": "/ca.pem"}}},
     "ddl.tls is for a sidecar over TCP"),
]


@pytest.mark.parametrize("values,message", FAILING_RENDERS, ids=[m for _, m in FAILING_RENDERS])
def test_inconsistent_values_fail_at_install(chart, values, message):
    with pytest.raises(helm_python.HelmRenderError, match=re.escape(message)):
        chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)


# -- checkov -----------------------------------------------------------------------------------

def _skip_annotations(docs) -> list[tuple[str, str]]:
    found = []
    for doc in docs:
        for key, value in doc["metadata"]["annotations"].items():
            if key.startswith("checkov.io/skip"):
                check, _, reason = value.partition("=")
                found.append((check, reason))
    return found


def test_checkov_finds_no_misconfiguration(rendered, tmp_path):
    checkov = _checkov()
    if not checkov.exists():
        pytest.fail(f"{checkov} is missing: run make test (it builds the checkov venv)")
    for name, docs in rendered.items():
        target = tmp_path / name
        target.mkdir()
        for i, doc in enumerate(docs):
            (target / f"{i:02d}-{doc['kind'].lower()}.yaml").write_text(yaml.safe_dump(_strip(doc)))
    docker = tmp_path / "docker"
    shutil.copytree(DOCKER, docker, ignore=shutil.ignore_patterns("*.dockerignore"))
    result = subprocess.run(
        [str(checkov), "-d", str(tmp_path), "--framework", "kubernetes", "dockerfile", "-o", "json", "--quiet",
         "--compact", "--skip-download"],
        capture_output=True, text=True, timeout=CHECKOV_TIMEOUT, env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path),
                                                                      "BC_SKIP_MAPPING": "TRUE"})
    reports = json.loads(result.stdout)
    reports = reports if isinstance(reports, list) else [reports]
    failed, passed, skipped = [], 0, 0
    for report in reports:
        passed += report["summary"]["passed"]
        skipped += report["summary"]["skipped"]
        failed += [f"{c['check_id']} {c['check_name']} in {c['file_path']} {c.get('resource')}"
                   for c in report.get("results", {}).get("failed_checks", [])]
    print(f"\ncheckov: {passed} passed, {len(failed)} failed, {skipped} skipped (each with its reason)")
    assert {r["check_type"] for r in reports} == {"kubernetes", "dockerfile"}, result.stderr[-2000:]
    assert passed > 500, result.stderr[-2000:]
    assert not failed, "\n".join(failed)
    # every exception carries its reason
    for check, reason in [s for docs in rendered.values() for s in _skip_annotations(docs)]:
        assert re.fullmatch(r"CKV2?_K8S_\d+", check) and len(reason) > 40, (check, reason)
    for dockerfile in DOCKER.glob("*.Dockerfile"):
        for line in dockerfile.read_text().splitlines():
            if "checkov:skip=" in line:
                assert re.search(r"checkov:skip=CKV_DOCKER_\d+: .{20,}", line), line


# -- the shapes --------------------------------------------------------------------------------

def _args(container: dict) -> list[str]:
    return container.get("args", [])


def _arg(container: dict, flag: str) -> list[str]:
    args = _args(container)
    return [args[i + 1] for i, a in enumerate(args) if a == flag]


def test_sidecar_container_everywhere(rendered):
    from deploy import embedded

    for name, docs in rendered.items():
        owners = _kind(docs, "Deployment", "sidecar") + _kind(docs, "StatefulSet", "postgres")
        assert len(owners) == 1, name
        pod = owners[0]["spec"]["template"]
        sidecar = _containers(owners[0])["sidecar"]
        port = sidecar["ports"][0]["containerPort"]
        tls = "--tls-cert" in sidecar["args"]
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            if tls:   # the kubelet's gRPC probe speaks no TLS: probe.py on a socket inside the pod
                assert sidecar[probe]["exec"]["command"] == [
                    "python", "/etc/llmfdw/scripts/probe.py", "unix:///run/llmfdw-probe/health.sock"], (name, probe)
            else:
                assert sidecar[probe]["grpc"]["port"] == port, (name, probe)
        assert f"0.0.0.0:{port}" in _arg(sidecar, "--listen")
        assert _arg(sidecar, "--config") == ["/run/llmfdw-config/sidecar.yaml"]
        metrics_port = int(_arg(sidecar, "--metrics-port")[0])
        assert pod["metadata"]["annotations"]["prometheus.io/port"] == str(metrics_port)
        assert pod["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
        for container in _containers(owners[0]).values():
            sc = container["securityContext"]
            assert sc["runAsNonRoot"] and sc["readOnlyRootFilesystem"] and not sc["allowPrivilegeEscalation"]
            assert sc["capabilities"]["drop"] == ["ALL"]
            assert container["resources"]["limits"]["memory"]
        env = {e["name"]: e["value"] for e in sidecar["env"]}
        assert embedded.SIDECAR_MALLOC_ENV.items() <= env.items()   # the malloc settings `make up` uses
        mounts = {m["mountPath"] for m in sidecar["volumeMounts"]}
        assert {"/home/llmfdw", "/tmp", "/run/llmfdw-config"} <= mounts
        volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
        assert volumes["rendered-config"]["emptyDir"]["medium"] == "Memory"
        assert "emptyDir" in volumes["home"] and "emptyDir" in volumes["tmp"]
        assert _kind(docs, "NetworkPolicy")
        assert len(_sidecar_config(docs)) == 1


def test_secret_files_are_readable_by_the_containers_that_mount_them(rendered):
    """Secret volumes are files root:<fsGroup>: readable by a container only through that group."""
    for name, docs in rendered.items():
        for owner in [d for d in docs if "template" in d.get("spec", {})]:
            pod = owner["spec"]["template"]["spec"]
            secrets = {v["name"]: v["secret"] for v in pod["volumes"] if "secret" in v}
            for container in _containers(owner).values():
                for mount in container.get("volumeMounts", []):
                    if mount["name"] in secrets:
                        assert secrets[mount["name"]]["defaultMode"] & 0o040, (name, mount)
                        groups = {container["securityContext"]["runAsGroup"],
                                  *pod["securityContext"].get("supplementalGroups", [])}
                        assert pod["securityContext"]["fsGroup"] in groups, (name, container["name"], mount)


def test_gpu_scheduling(rendered):
    cpu = _containers(_kind(rendered["cpu-values.yaml"], "Deployment")[0])["sidecar"]
    assert "nvidia.com/gpu" not in cpu["resources"]["limits"]
    assert cpu["image"].startswith("llmfdw/sidecar:")
    for name, gpus in (("gpu-values.yaml", 1), ("tensor-parallel-values.yaml", 4)):
        deployment = _kind(rendered[name], "Deployment")[0]
        pod = deployment["spec"]["template"]["spec"]
        sidecar = _containers(deployment)["sidecar"]
        assert sidecar["resources"]["limits"]["nvidia.com/gpu"] == gpus
        assert sidecar["image"].startswith("llmfdw/sidecar-cuda:")
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
        assert pod["nodeSelector"]
        assert {"name": "VLLM_WORKER_MULTIPROC_METHOD", "value": "spawn"} in sidecar["env"]
        assert any(m["mountPath"] == "/dev/shm" for m in sidecar["volumeMounts"])
        assert any(m["mountPath"] == "/models" and m["readOnly"] for m in sidecar["volumeMounts"])
    config = yaml.safe_load(_kind(rendered["tensor-parallel-values.yaml"], "ConfigMap")[0]["data"]["sidecar.yaml"])
    assert config["models"][0]["engine_args"]["tensor_parallel_size"] == 4


def test_shared_shape(rendered):
    docs = rendered["shared-values.yaml"]
    deployment = _kind(docs, "Deployment", "sidecar")[0]
    assert deployment["spec"]["replicas"] == 3
    service = _kind(docs, "Service", "sidecar")[0]
    assert service["spec"]["clusterIP"] == "None"                       # headless: one DNS record per pod
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    assert {p["name"] for p in service["spec"]["ports"]} == {"grpc", "metrics"}
    pdb = _kind(docs, "PodDisruptionBudget")[0]
    assert pdb["spec"]["selector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]
    policy = _kind(docs, "NetworkPolicy")[0]
    grpc_rule = [r for r in policy["spec"]["ingress"] if r["ports"][0]["port"] == 50051][0]
    assert grpc_rule["from"][0]["podSelector"] == {"matchLabels": {"llmfdw-client": "true"}}
    assert not _kind(docs, "StatefulSet")
    job = _kind(docs, "Job")[0]
    script = _containers(job)["ddl"]["command"][-1]
    address = f"dns:///{RELEASE}-llmfdw-sidecar.{NAMESPACE}.svc.cluster.local:50051"
    assert script.count(f"-v sidecar_address='{address}'") == 2
    assert "host=pg.team-b.svc.cluster.local port=5433 dbname=app user=postgres sslmode=prefer" in script
    assert job["metadata"]["annotations"]["helm.sh/hook"] == "post-install,post-upgrade"
    # mutual TLS on the gRPC port: the Secret's three files, the options the DDL sets
    sidecar = _containers(deployment)["sidecar"]
    assert _arg(sidecar, "--max-connection-age") == ["300"]   # backends find pods added by a scale-up
    assert _arg(sidecar, "--tls-cert") == ["/etc/llmfdw/tls/tls.crt"]
    assert _arg(sidecar, "--tls-key") == ["/etc/llmfdw/tls/tls.key"]
    assert _arg(sidecar, "--tls-client-ca") == ["/etc/llmfdw/tls/ca.crt"]
    assert "unix:///run/llmfdw-probe/health.sock" in _arg(sidecar, "--listen")
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    assert volumes["tls"]["secret"]["secretName"] == "llmfdw-sidecar-tls"
    assert {i["path"] for i in volumes["tls"]["secret"]["items"]} == {"tls.crt", "tls.key", "ca.crt"}
    assert volumes["probe"]["emptyDir"]["medium"] == "Memory"
    assert {"name": "tls", "mountPath": "/etc/llmfdw/tls", "readOnly": True} in sidecar["volumeMounts"]
    assert script.count("-v tls_ca_file='/etc/llmfdw/tls/ca.crt' -v tls_cert_file='/etc/llmfdw/tls/client.crt' "
                        "-v tls_key_file='/etc/llmfdw/tls/client.key' -f /usr/share/llmfdw/llm_schema.sql") == 2
    assert "probe.py" in _sidecar_config(docs)[0]["data"]
    # the tokens come from the operator's Secret, the chart makes none
    assert not _kind(docs, "Secret")
    tokens = [v for v in deployment["spec"]["template"]["spec"]["volumes"] if v["name"] == "tokens"][0]
    assert tokens["secret"]["secretName"] == "llmfdw-tenant-tokens"


def test_colocated_shape(rendered):
    docs = rendered["colocated-values.yaml"]
    assert not _kind(docs, "Deployment") and not _kind(docs, "Service", "sidecar")
    statefulset = _kind(docs, "StatefulSet", "postgres")[0]
    pod = statefulset["spec"]["template"]["spec"]
    containers = _containers(statefulset)
    postgres, sidecar = containers["postgres"], containers["sidecar"]
    assert postgres["image"].startswith("llmfdw/postgres:")
    assert "unix:///var/run/llmfdw/sidecar.sock" in _arg(sidecar, "--listen")
    assert _arg(sidecar, "--socket-group") == ["postgres"]
    gid = postgres["securityContext"]["runAsGroup"]
    assert gid in pod["securityContext"]["supplementalGroups"]           # the sidecar may give it the socket
    socket_volume = [v for v in pod["volumes"] if v["name"] == "socket"][0]
    assert "emptyDir" in socket_volume
    for c in (postgres, sidecar):
        assert {"name": "socket", "mountPath": "/var/run/llmfdw"} in c["volumeMounts"]
    # no pod reaches the sidecar's TCP port (it is there for the kubelet's grpc probes)
    policy = _kind(docs, "NetworkPolicy")[0]
    assert {p["port"] for r in policy["spec"]["ingress"] for p in r["ports"]} == {5432, 9090, 9187}
    assert [r["ports"] for r in policy["spec"]["ingress"] if "from" not in r] == [
        [{"port": 9090, "protocol": "TCP"}, {"port": 9187, "protocol": "TCP"}]]
    job = _kind(docs, "Job")[0]
    script = _containers(job)["ddl"]["command"][-1]
    assert "-v sidecar_address='unix:///var/run/llmfdw/sidecar.sock'" in script
    assert f"host={RELEASE}-llmfdw-postgres port=5432 dbname=llmfdw" in script
    assert len(_kind(docs, "Secret")) == 1


def test_colocated_exporter_serves_vectorizer_metrics_as_a_monitoring_role(rendered, chart):
    """postgres.exporter (on in colocated-values.yaml): the postgres image's postgres_exporter with
    the vectorizer queries, logged in as the monitoring role, never as the superuser."""
    docs = rendered["colocated-values.yaml"]
    statefulset = _kind(docs, "StatefulSet", "postgres")[0]
    exporter = _containers(statefulset)["exporter"]
    assert exporter["image"] == _containers(statefulset)["postgres"]["image"]
    assert exporter["command"] == ["prometheus-postgres-exporter"]
    assert "--extend.query-path=/usr/share/llmfdw/postgres_exporter_queries.yaml" in exporter["args"]
    env = {e["name"]: e["value"] for e in exporter["env"]}
    assert env["DATA_SOURCE_USER"] == "llm_monitor" and env["DATA_SOURCE_URI"].startswith("127.0.0.1:5432/llmfdw?")
    assert "DATA_SOURCE_NAME" not in env and "DATA_SOURCE_PASS" not in env
    secret = [v for v in statefulset["spec"]["template"]["spec"]["volumes"] if v["name"] == "exporter-password"]
    assert secret[0]["secret"]["secretName"] == "llm-monitor"
    service = _kind(docs, "Service", "postgres")[0]
    assert {"name": "exporter", "port": 9187, "targetPort": "exporter", "protocol": "TCP"} in service["spec"]["ports"]
    dockerfile = (DOCKER / "postgres.Dockerfile").read_text()
    assert "prometheus-postgres-exporter" in dockerfile and "dashboards/postgres_exporter_queries.yaml" in dockerfile
    # the DDL Job makes that role (sql/monitor_role.sql, tests/test_monitor_role.py) from the same Secret
    assert "COPY sql/monitor_role.sql /usr/share/llmfdw/monitor_role.sql" in dockerfile
    job = _kind(docs, "Job")[0]
    script = _containers(job)["ddl"]["command"][-1]
    assert ("LLMFDW_MONITOR_PASSWORD_FILE=/etc/llmfdw/exporter/password psql \"$conn\" -v ON_ERROR_STOP=1 "
            "-v monitor_user='llm_monitor' -f /usr/share/llmfdw/monitor_role.sql") in script
    assert script.index("llm_schema.sql") < script.index("monitor_role.sql")   # llm_dashboard exists by then
    job_secret = [v for v in job["spec"]["template"]["spec"]["volumes"] if v["name"] == "exporter-password"]
    assert job_secret[0]["secret"] == secret[0]["secret"]
    assert {"name": "exporter-password", "mountPath": "/etc/llmfdw/exporter", "readOnly": True} in \
        _containers(job)["ddl"]["volumeMounts"]
    # off by default; on without a password Secret, refused
    default = _render(chart, {"mode": "colocated", "postgres": {"auth": {"password": "x"}}})
    assert "exporter" not in _containers(_kind(default, "StatefulSet", "postgres")[0])
    assert "monitor_role.sql" not in _containers(_kind(default, "Job")[0])["ddl"]["command"][-1]
    with pytest.raises(Exception, match="passwordSecret"):
        _render(chart, {"mode": "colocated", "postgres": {"auth": {"password": "x"}, "exporter": {"enabled": True}}})


def test_default_models_are_the_sidecars(chart):
    packaged = yaml.safe_load((REPO / "sidecar" / "llm_sidecar" / "models.yaml").read_text())
    assert chart.merge_values({})["sidecar"]["config"]["models"] == packaged["models"]


# -- the init step, the sidecar's arguments and the probe, for real ---------------------------------------------------

def _write_init_inputs(docs, directory: Path) -> tuple[Path, Path, Path]:
    configmap = _sidecar_config(docs)[0]["data"]
    (directory / "config").mkdir()
    (directory / "tokens").mkdir()
    (directory / "config" / "sidecar.yaml").write_text(configmap["sidecar.yaml"])
    (directory / "render_config.py").write_text(configmap["render_config.py"])
    for secret in _kind(docs, "Secret"):
        if secret["metadata"]["name"].endswith("-tenants"):
            for key, value in secret["data"].items():
                (directory / "tokens" / key).write_text(base64.b64decode(value).decode())
    return directory / "render_config.py", directory / "config" / "sidecar.yaml", directory / "tokens"


@pytest.mark.parametrize("name", [p.name for p in CI_VALUES])
def test_init_step_renders_a_config_the_sidecar_loads(rendered, name, tmp_path):
    from llm_sidecar.config import load_config

    script, source, tokens = _write_init_inputs(rendered[name], tmp_path)
    out = tmp_path / "sidecar.yaml"
    if name == "shared-values.yaml":   # tenants.existingSecret: the operator's Secret, here by hand
        (tokens / "team-a").write_text("token-a\n")
        (tokens / "team-b").write_text("token-b")
    result = subprocess.run([sys.executable, str(script), str(source), str(tokens), str(out)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert out.stat().st_mode & 0o077 == 0
    config = load_config(out)
    expected = _values(CHART / "ci" / name)["sidecar"].get("config", {}).get("models")
    assert [m.name for m in config.models] == [m["name"] for m in expected or
                                                yaml.safe_load((REPO / "sidecar/llm_sidecar/models.yaml").read_text())["models"]]
    if name == "cpu-values.yaml":
        assert config.auth == "required"
        assert config.tenant("acme").token == "ci-acme-token" and config.tenant("acme").max_in_flight == 4
    if name == "shared-values.yaml":
        assert config.tenant("team-a").token == "token-a" and config.tenant("team-b").token == "token-b"


def test_init_step_refuses_a_missing_token(rendered, tmp_path):
    script, source, tokens = _write_init_inputs(rendered["cpu-values.yaml"], tmp_path)
    (tokens / "globex").unlink()
    result = subprocess.run([sys.executable, str(script), str(source), str(tokens), str(tmp_path / "out.yaml")],
                            capture_output=True, text=True)
    assert result.returncode == 1 and "no key 'globex'" in result.stderr


def test_sidecar_serves_metrics_on_every_interface(rendered):
    """The container runs the sidecar module itself; with the rendered metrics arguments a real
    sidecar listens for Prometheus on 0.0.0.0 (127.0.0.1 is its default)."""
    import psutil

    from deploy import embedded
    from sidecar_process import EMBED_ONLY

    sidecar = _containers(_kind(rendered["cpu-values.yaml"], "Deployment")[0])["sidecar"]
    assert sidecar["command"] == ["python", "-m", "llm_sidecar.server"]
    assert _arg(sidecar, "--metrics-address") == ["0.0.0.0"]
    work = Path(tempfile.mkdtemp(prefix="llmfdw-metrics-", dir="/tmp"))
    work.chmod(0o755)
    try:
        (work / "config.yaml").write_text(EMBED_ONLY)
        (work / "config.yaml").chmod(0o644)
        port, metrics_port = embedded.free_port(), embedded.free_port()
        argv, kwargs = embedded.sidecar_process_args(
            f"127.0.0.1:{port}", home=work / "home", config=work / "config.yaml",
            extra=("--metrics-port", str(metrics_port), "--metrics-address", _arg(sidecar, "--metrics-address")[0]))
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, cwd=work, **kwargs)
        try:
            embedded.wait_serving(f"127.0.0.1:{port}", 120, alive=lambda: proc.poll() is None)
            listening = {c.laddr for c in psutil.net_connections("tcp") if c.status == psutil.CONN_LISTEN
                         and c.laddr.port == metrics_port}
            assert {a.ip for a in listening} == {"0.0.0.0"}, listening
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(30) == 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


def test_probe_script_says_serving_or_not(rendered, tmp_path):
    """helm/files/probe.py, as the ConfigMap ships it, against a real sidecar's Unix socket: exit 0
    while it serves, 1 once it is gone."""
    from sidecar_process import running_sidecar
    from test_sidecar_lifecycle import write_config

    probe = tmp_path / "probe.py"
    probe.write_text(_sidecar_config(rendered["shared-values.yaml"])[0]["data"]["probe.py"])
    sock = tmp_path / "s.sock"

    def run_probe() -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(probe), f"unix://{sock}"], capture_output=True, text=True,
                              timeout=30)

    with running_sidecar(str(sock), str(write_config(tmp_path / "c.yaml"))):
        serving = run_probe()
    assert serving.returncode == 0 and "SERVING" in serving.stdout, serving
    gone = run_probe()
    assert gone.returncode == 1 and "UNAVAILABLE" in gone.stderr, gone


# -- Dockerfiles --------------------------------------------------------------------------------

def _instructions(dockerfile: Path) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line.strip() else "")
            for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def test_chart_images_are_built_by_dockerfiles(rendered, chart):
    appversion = chart.metadata["appVersion"] if isinstance(chart.metadata, dict) else chart.metadata.app_version
    images = {c["image"] for docs in rendered.values() for d in docs if "template" in d.get("spec", {})
              for c in _containers(d).values()}
    assert images
    for image in images:
        repository, tag = image.rsplit(":", 1)
        assert tag == appversion, image
        owner, stem = repository.split("/")
        assert owner == "llmfdw" and (DOCKER / f"{stem}.Dockerfile").exists(), image
        assert f"-t {repository}:{appversion}" in (DOCKER / f"{stem}.Dockerfile").read_text()
    assert {i.rsplit(":", 1)[0] for i in images} == {f"llmfdw/{p.name.removesuffix('.Dockerfile')}"
                                                      for p in DOCKER.glob("*.Dockerfile")}


@pytest.mark.parametrize("dockerfile", sorted(DOCKER.glob("*.Dockerfile")), ids=lambda p: p.name)
def test_dockerfile_copies_files_that_exist_and_pins_its_bases(dockerfile):
    instructions = _instructions(dockerfile)
    stages = [args.split()[-1] for op, args in instructions if op == "FROM" and " AS " in args.upper()]
    for op, args in instructions:
        if op == "FROM":
            image = args.split()[0]
            assert image in stages or re.fullmatch(r"[a-z0-9./-]+:[0-9][A-Za-z0-9._-]*", image), image
        if op in ("COPY", "ADD"):
            words = args.split()
            if any(w.startswith("--from=") for w in words):
                continue
            sources = [w for w in words if not w.startswith("--")][:-1]
            assert sources, args
            for source in sources:   # Docker's COPY takes wildcards: each must match something
                assert any(REPO.glob(source)), f"{dockerfile.name}: COPY {source}: no such file"
    users = [args for op, args in instructions if op == "USER"]
    assert users and not users[-1].startswith(("root", "0")), "the image must end as a non-root user"
    ignore = dockerfile.with_name(dockerfile.name + ".dockerignore").read_text().splitlines()
    for op, args in instructions:
        if op == "COPY" and "--from=" not in args:
            for source in args.split()[:-1]:
                top = source.split("/")[0]
                assert any(line.lstrip("!").rstrip("/") in (source, top) for line in ignore if line.startswith("!")), \
                    f"{dockerfile.name}.dockerignore leaves out {source}"


def test_grafana_dashboards_configmap_carries_both_dashboards(rendered):
    maps = [d for d in rendered["shared-values.yaml"] if d["kind"] == "ConfigMap"
            and d["metadata"]["labels"].get("grafana_dashboard") == "1"]
    assert len(maps) == 1
    boards = maps[0]["data"]
    assert set(boards) == {"llmfdw-postgres.json", "llmfdw-prometheus.json"}
    assert all(json.loads(text)["panels"] for text in boards.values())
    assert not any(d["kind"] == "ConfigMap" and "grafana_dashboard" in d["metadata"].get("labels", {})
                   for d in rendered["cpu-values.yaml"])
