"""The Helm chart (deploy/helm/budrt), rendered offline with the chart's defaults and each values
file of deploy/values/: `helm lint`, every manifest against the Kubernetes schemas in strict mode,
and what a production install relies on (probes, limits, hardening, spread, redundancy, network
isolation, no secret outside a Secret, a config budrt itself accepts).

Rendering uses Helm's own Go SDK through helm-python-sdk (no `helm` binary, no cluster).
"""

from __future__ import annotations

import http.server
import importlib.util
import json
import os
import re
import threading
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import urlsplit

import kubernetes_validate
import pytest
import yaml
from pydantic import SecretStr

from budrt.config import load_settings

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "deploy" / "helm" / "budrt"
VALUES_DIR = ROOT / "deploy" / "values"
VALUES = ["defaults", "tiny-cpu", "multi-zone-gpu", "external-services"]
KUBE_VERSION = "1.32.0"  # the oldest version the schemas are checked against (Chart.yaml: >=1.30)
NAMESPACE = "ai"
# Custom resources: no schema in kubernetes-validate; their shape is checked below instead.
CRDS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
    ("cert-manager.io/v1", "Certificate"),
    ("cert-manager.io/v1", "Issuer"),
    ("keda.sh/v1alpha1", "ScaledObject"),
}
# Stand-ins for what the Secrets would hold, by env var (each must reach a budrt setting).
SECRET_VALUES = {
    "BUDRT_SECRET_KEY": "s" * 32,
    "BUDRT_INTERNAL_KEY": "internal-key-0123456789abcdef",
    "BUDRT_ADMIN_KEY": "budrt-" + "a" * 32,
    "BUDRT_DATABASE_URL": "postgresql://budrt:pw@db:5432/budrt",
    "BUDRT_DATABASE_REPLICA_URLS": '["postgresql://budrt:pw@replica:5432/budrt"]',
    "BUDRT_GATEWAY__REDIS_URL": "redis://:pw@redis:6379/0",
    "BUDRT_OBJECTS__S3__ACCESS_KEY_ID": "AKIAEXAMPLEEXAMPLE01",
    "BUDRT_OBJECTS__S3__SECRET_ACCESS_KEY": "x" * 40,
    "BUDRT_KMS__ACCESS_KEY_ID": "AKIAEXAMPLEEXAMPLE02",
    "BUDRT_KMS__SECRET_ACCESS_KEY": "y" * 40,
    "BUDRT_AUTH__JWT__SECRET": "j" * 32,
}
SECRET_NAME = re.compile(r"KEY|SECRET|PASSWORD|TOKEN|CREDENTIAL|_URLS?$")
URL_WITH_PASSWORD = re.compile(r"[a-z][a-z0-9+.-]*://[^/\s:@]*:[^/\s@]+@", re.IGNORECASE)
REFERENCE = re.compile(r"\$\((\w+)\)")  # the kubelet's $(VAR) expansion


def _import_helm() -> ModuleType:
    """helm-python-sdk; a platform without its native library skips this module (a missing
    package is an error: it is a pinned test dependency)."""
    try:
        import helm_python
    except ModuleNotFoundError:
        raise
    except Exception as exc:  # its HelmLibraryError, raised while the package loads the library
        if type(exc).__name__ != "HelmLibraryError":
            raise
        pytest.skip(f"helm-python-sdk cannot run here: {exc}", allow_module_level=True)
    return helm_python


helm = _import_helm()


class _UniqueKeyLoader(yaml.SafeLoader):
    """Refuses a mapping with a key twice: PyYAML keeps the last, the API server refuses it."""


def _construct_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> Any:
    keys = [loader.construct_object(key, deep=deep) for key, _ in node.value]
    duplicates = {k for k in keys if keys.count(k) > 1}
    assert not duplicates, f"duplicate keys {duplicates} at {node.start_mark}"
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def values_of(name: str) -> dict[str, Any]:
    return {} if name == "defaults" else yaml.safe_load((VALUES_DIR / f"{name}.yaml").read_text())


def render(values: dict[str, Any]) -> list[dict[str, Any]]:
    with helm.Chart.load(CHART) as chart:
        files = chart.render(values, name="budrt", namespace=NAMESPACE, is_install=True)
    docs = []
    for path, text in sorted(files.items()):
        if path.endswith(".yaml"):
            docs += [d for d in yaml.load_all(text, Loader=_UniqueKeyLoader) if d]
    return docs


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    return {name: render(values_of(name)) for name in VALUES}


def by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def component(doc: dict[str, Any]) -> str:
    return doc["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"]


def containers(pod: dict[str, Any]) -> list[dict[str, Any]]:
    return [*pod.get("initContainers", []), *pod["containers"]]


def budrt_config(docs: list[dict[str, Any]]) -> str:
    (config,) = [d for d in by_kind(docs, "ConfigMap") if d["metadata"]["name"].endswith("-config")]
    return config["data"]["budrt.yaml"]


def test_the_values_files_are_the_three_documented() -> None:
    assert sorted(p.stem for p in VALUES_DIR.glob("*.yaml")) == sorted(VALUES[1:])


@pytest.mark.parametrize("name", VALUES)
def test_helm_lint_is_clean(name: str) -> None:
    report = helm.lint(CHART, values_of(name), strict=True, kube_version=f"v{KUBE_VERSION}")
    assert report["errors"] == []
    # Severity 1 is informational ("icon is recommended"); warnings and errors fail.
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


@pytest.mark.parametrize("name", VALUES)
def test_every_manifest_validates_strictly(rendered: dict[str, list[dict[str, Any]]], name: str) -> None:
    for doc in rendered[name]:
        if (doc["apiVersion"], doc["kind"]) in CRDS:
            assert doc["metadata"]["name"] and isinstance(doc["spec"], dict), doc
            continue
        kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)


def test_strict_validation_catches_an_unknown_field(rendered: dict[str, list[dict[str, Any]]]) -> None:
    """The control for the test above: strict mode does refuse a misspelt field."""
    deployment = json.loads(json.dumps(by_kind(rendered["defaults"], "Deployment")[0]))
    deployment["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {"periodSeconds": 5}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBE_VERSION, strict=True)


def _check_container(c: dict[str, Any]) -> None:
    for part in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(c["resources"][part]), (c["name"], part)
    sc = c["securityContext"]
    assert sc["runAsNonRoot"] is True and sc["allowPrivilegeEscalation"] is False, c["name"]
    assert sc["readOnlyRootFilesystem"] is True, c["name"]
    assert sc["capabilities"]["drop"] == ["ALL"], c["name"]
    assert sc["seccompProfile"]["type"] == "RuntimeDefault", c["name"]


@pytest.mark.parametrize("name", VALUES)
def test_every_pod_is_probed_limited_hardened_and_spread(
    rendered: dict[str, list[dict[str, Any]]], name: str
) -> None:
    deployments = by_kind(rendered[name], "Deployment")
    assert {component(d) for d in deployments} == {"gateway", "model-server"}
    for deployment in deployments:
        pod = deployment["spec"]["template"]["spec"]
        assert pod["automountServiceAccountToken"] is False
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
        for c in containers(pod):
            _check_container(c)
        main = pod["containers"][0]
        assert main["readinessProbe"] and main["livenessProbe"], deployment["metadata"]["name"]
        if component(deployment) == "gateway":  # ready to route, whatever state the models are in
            assert main["readinessProbe"]["httpGet"]["path"] == "/health/ready?scope=gateway"
        keys = {(t["topologyKey"], t["whenUnsatisfiable"]) for t in pod["topologySpreadConstraints"]}
        assert {k for k, _ in keys} == {"topology.kubernetes.io/zone", "kubernetes.io/hostname"}
        assert pod["terminationGracePeriodSeconds"] > main["lifecycle"]["preStop"]["sleep"]["seconds"]
        if component(deployment) == "model-server":
            startup = main["startupProbe"]
            assert startup["periodSeconds"] * startup["failureThreshold"] >= 300  # a model load
            assert pod["affinity"]["podAntiAffinity"], "replicas of a group avoid one node"


@pytest.mark.parametrize("name", VALUES)
def test_gateways_are_redundant(rendered: dict[str, list[dict[str, Any]]], name: str) -> None:
    docs = rendered[name]
    (gateway,) = [d for d in by_kind(docs, "Deployment") if component(d) == "gateway"]
    (hpa,) = [h for h in by_kind(docs, "HorizontalPodAutoscaler") if h["apiVersion"] == "autoscaling/v2"]
    assert hpa["spec"]["scaleTargetRef"]["name"] == gateway["metadata"]["name"]
    # With the HPA the Deployment leaves `replicas` to it (helm upgrades would reset it otherwise).
    assert "replicas" not in gateway["spec"] and hpa["spec"]["minReplicas"] >= 2
    labels = gateway["spec"]["template"]["metadata"]["labels"]
    pdbs = [
        p
        for p in by_kind(docs, "PodDisruptionBudget")
        if p["spec"]["selector"]["matchLabels"].items() <= labels.items()
    ]
    assert len(pdbs) == 1 and pdbs[0]["spec"]["minAvailable"] >= 1


def over(base: Any, top: Any) -> Any:
    """`top` over `base`, maps merged key by key (as the chart reads a group over its defaults)."""
    if isinstance(base, dict) and isinstance(top, dict):
        return {k: over(base.get(k), top[k]) if k in top else base[k] for k in base.keys() | top.keys()}
    return top


def groups_of(name: str) -> list[dict[str, Any]]:
    with helm.Chart.load(CHART) as chart:
        values = chart.merge_values(values_of(name))
    return [over(values["modelServerDefaults"], group) for group in values["modelServers"]]


@pytest.mark.parametrize("name", VALUES)
def test_one_deployment_and_service_per_group(rendered: dict[str, list[dict[str, Any]]], name: str) -> None:
    docs = rendered[name]
    for group in groups_of(name):
        (deployment,) = [
            d for d in by_kind(docs, "Deployment") if d["metadata"]["name"] == f"budrt-ms-{group['name']}"
        ]
        (service,) = [
            s for s in by_kind(docs, "Service") if s["metadata"]["name"] == f"budrt-ms-{group['name']}"
        ]
        pod = deployment["spec"]["template"]["spec"]
        main = pod["containers"][0]
        assert main["args"] == ["model-server", "--name", group["name"]]
        assert deployment["spec"]["replicas"] == group["replicas"]
        assert deployment["spec"]["strategy"]["rollingUpdate"] == group["strategy"]  # maxSurge 0 kept
        assert main["ports"][0]["containerPort"] == service["spec"]["ports"][0]["port"] == group["port"]
        assert (
            service["spec"]["selector"].items()
            <= deployment["spec"]["template"]["metadata"]["labels"].items()
        )
        assert service["spec"]["trafficDistribution"] == "PreferClose"  # same-zone pods first
        gpus = group["resources"]["limits"].get("nvidia.com/gpu")
        assert main["resources"]["limits"].get("nvidia.com/gpu") == gpus
        assert pod.get("nodeSelector", {}) == group.get("nodeSelector", {})
        assert pod.get("tolerations", []) == group.get("tolerations", [])


@pytest.mark.parametrize("name", VALUES)
def test_model_servers_accept_only_gateways(rendered: dict[str, list[dict[str, Any]]], name: str) -> None:
    docs = rendered[name]
    gateway_labels = next(
        d["spec"]["template"]["metadata"]["labels"]
        for d in by_kind(docs, "Deployment")
        if component(d) == "gateway"
    )
    servers = [d["spec"]["template"]["metadata"]["labels"] for d in by_kind(docs, "Deployment")]
    servers = [labels for labels in servers if labels["app.kubernetes.io/component"] == "model-server"]
    policies = [
        p
        for p in by_kind(docs, "NetworkPolicy")
        if "Ingress" in p["spec"]["policyTypes"]
        and all(p["spec"]["podSelector"]["matchLabels"].items() <= labels.items() for labels in servers)
    ]
    assert len(policies) == 1
    for rule in policies[0]["spec"]["ingress"]:
        peers = rule["from"]  # a rule without `from` would admit every source
        assert any(
            p.get("podSelector", {}).get("matchLabels", {}).items() <= gateway_labels.items() for p in peers
        )
        assert all("ipBlock" not in p for p in peers)


@pytest.mark.parametrize("name", VALUES)
def test_service_account_mounts_no_token(rendered: dict[str, list[dict[str, Any]]], name: str) -> None:
    (account,) = by_kind(rendered[name], "ServiceAccount")
    assert account["automountServiceAccountToken"] is False
    for deployment in by_kind(rendered[name], "Deployment"):
        assert deployment["spec"]["template"]["spec"]["serviceAccountName"] == account["metadata"]["name"]


def _check_env(env: dict[str, Any]) -> None:
    if "value" in env:
        value = str(env["value"])
        assert not URL_WITH_PASSWORD.search(value), env["name"]
        secret_like = SECRET_NAME.search(env["name"].removeprefix("BUDRT_"))
        # A plain value may only name secrets by reference ($(BUDRT_INTERNAL_KEY)), never hold one.
        assert not secret_like, f"{env['name']} has a literal value"
        for quoted in re.findall(r'"api_key":"([^"]*)"', value):
            assert REFERENCE.fullmatch(quoted), env["name"]
    elif env["name"] in SECRET_VALUES:
        assert set(env["valueFrom"]) == {"secretKeyRef"}, env["name"]


@pytest.mark.parametrize("name", VALUES)
def test_no_secret_outside_a_secret(rendered: dict[str, list[dict[str, Any]]], name: str) -> None:
    docs = rendered[name]
    assert by_kind(docs, "Secret") == []  # the chart names existing Secrets, it never makes one
    for deployment in by_kind(docs, "Deployment"):
        for c in containers(deployment["spec"]["template"]["spec"]):
            for env in c.get("env", []):
                _check_env(env)
                if SECRET_NAME.search(env["name"].removeprefix("BUDRT_")) and env["name"].startswith(
                    "BUDRT_"
                ):
                    assert env["name"] in SECRET_VALUES or "value" in env, f"unknown secret env {env['name']}"
    for config in by_kind(docs, "ConfigMap"):
        for text in config["data"].values():
            assert not URL_WITH_PASSWORD.search(text)
    for key in ("secret_key", "admin_key", "internal_key", "database_url", "database_replica_urls"):
        assert key not in yaml.safe_load(budrt_config(docs))


def pod_env(container: dict[str, Any], config: Path, home: Path) -> dict[str, str]:
    """The environment the kubelet would give `container`, with stand-in secrets, the config and
    home on this machine, and $(VAR) references expanded as the kubelet does."""
    env: dict[str, str] = {}
    for item in container["env"]:
        if "value" in item:
            env[item["name"]] = REFERENCE.sub(lambda m: env.get(m.group(1), m.group(0)), str(item["value"]))
        elif "secretKeyRef" in item["valueFrom"]:
            env[item["name"]] = SECRET_VALUES[item["name"]]
        else:
            env[item["name"]] = "node-1"  # fieldRef: spec.nodeName
    return env | {"BUDRT_CONFIG": str(config), "BUDRT_HOME": str(home)}


def setting(settings: Any, env_name: str) -> Any:
    """The value behind a BUDRT_A__B variable (secrets revealed, lists as JSON)."""
    value = settings
    for part in env_name.removeprefix("BUDRT_").lower().split("__"):
        value = getattr(value, part)
    if isinstance(value, list):
        return json.dumps([v.get_secret_value() for v in value])
    return value.get_secret_value() if isinstance(value, SecretStr) else value


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    for key in [k for k in os.environ if k.startswith("BUDRT_")]:
        monkeypatch.delenv(key)
    yield monkeypatch


@pytest.mark.parametrize("name", VALUES)
def test_budrt_accepts_the_rendered_config(
    rendered: dict[str, list[dict[str, Any]]], name: str, tmp_path: Path, clean_env: pytest.MonkeyPatch
) -> None:
    docs = rendered[name]
    config = tmp_path / "budrt.yaml"
    config.write_text(budrt_config(docs))
    bare = load_settings(config, home=tmp_path / "bare")  # no Secret at all: still a valid tree
    assert bare.gateway.host == "0.0.0.0" and bare.internal_key is None
    services = {s["metadata"]["name"]: s["spec"]["ports"][0]["port"] for s in by_kind(docs, "Service")}
    for deployment in by_kind(docs, "Deployment"):
        main = deployment["spec"]["template"]["spec"]["containers"][0]
        env = pod_env(main, config, tmp_path / "home")
        with clean_env.context() as patch:
            for key, value in env.items():
                patch.setenv(key, value)
            settings = load_settings()
        assert "BUDRT_INTERNAL_KEY" in env  # both roles: gateways send it, model servers require it
        for key in env.keys() & SECRET_VALUES.keys():  # each Secret reaches its budrt setting
            assert setting(settings, key) == SECRET_VALUES[key], key
        if component(deployment) == "model-server":
            (server,) = [s for s in settings.model_servers if s.name == main["args"][2]]
            assert (server.host, server.port) == ("0.0.0.0", main["ports"][0]["containerPort"])
            continue
        served = {m for s in settings.model_servers for m in s.models}
        assert {d.model for d in settings.deployments} == served
        for dep in settings.deployments:
            assert dep.managed and dep.api_key.get_secret_value() == SECRET_VALUES["BUDRT_INTERNAL_KEY"]
            for url in dep.endpoints:
                parts = urlsplit(url)
                host, namespace, _ = parts.hostname.split(".", 2)
                assert namespace == NAMESPACE and services[host] == parts.port and parts.path == "/v1"
                assert parts.scheme == ("https" if settings.tls.enabled else "http")
                if settings.tls.enabled:  # the gateway checks the name against the server's SANs
                    assert parts.hostname in settings.tls.hosts
        zoned = {g["name"]: g["zone"] for g in groups_of(name) if g.get("zone")}
        for dep in settings.deployments:  # a group pinned to a zone names it to the gateways
            for url, zone in zip(dep.endpoints, dep.zones or [""] * len(dep.endpoints), strict=True):
                group = next((g for g in zoned if urlsplit(url).hostname.startswith(f"budrt-ms-{g}")), None)
                assert zone == (zoned[group] if group else "")


def test_tls_ca_comes_from_cert_manager(rendered: dict[str, list[dict[str, Any]]]) -> None:
    docs = rendered["multi-zone-gpu"]
    (certificate,) = [d for d in docs if d["kind"] == "Certificate"]
    (issuer,) = [d for d in docs if d["kind"] == "Issuer"]
    spec = certificate["spec"]
    assert (
        spec["isCA"] is True
        and spec["privateKey"]["algorithm"] == "ECDSA"
        and spec["privateKey"]["size"] == 256
    )
    assert spec["issuerRef"]["name"] == issuer["metadata"]["name"] and "selfSigned" in issuer["spec"]
    tls_dir = yaml.safe_load(budrt_config(docs))["tls"]["dir"]
    for deployment in by_kind(docs, "Deployment"):
        pod = deployment["spec"]["template"]["spec"]
        volume = next(v for v in pod["volumes"] if v["name"] == "tls-ca")
        assert volume["secret"]["secretName"] == spec["secretName"]
        (init,) = pod["initContainers"]
        assert init["env"] == [{"name": "TLS_DIR", "value": tls_dir}]
        assert main_probe_uses_tls(pod["containers"][0], tls_dir, component(deployment))


def main_probe_uses_tls(container: dict[str, Any], tls_dir: str, role: str) -> bool:
    probe = container["readinessProbe"]
    if role == "gateway":
        return probe["httpGet"]["scheme"] == "HTTPS"
    return probe["exec"]["command"][-1] == tls_dir


def test_monitoring_objects(rendered: dict[str, list[dict[str, Any]]]) -> None:
    docs = rendered["multi-zone-gpu"]
    monitors = [d for d in docs if d["kind"] == "ServiceMonitor"]
    assert monitors
    for monitor in monitors:
        assert monitor["spec"]["selector"]["matchLabels"]
        assert all(e["port"] == "http" and e["path"] == "/metrics" for e in monitor["spec"]["endpoints"])
    assert not [d for d in rendered["tiny-cpu"] if d["kind"] == "ServiceMonitor"]


def test_dashboard_queries_name_real_metrics(rendered: dict[str, list[dict[str, Any]]]) -> None:
    (dashboard,) = [
        d for d in by_kind(rendered["defaults"], "ConfigMap") if d["metadata"]["name"].endswith("-dashboard")
    ]
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    panels = json.loads(dashboard["data"]["budrt.json"])["panels"]
    source = "\n".join(p.read_text() for p in (ROOT / "src" / "budrt").rglob("*.py"))
    exprs = [t["expr"] for panel in panels for t in panel["targets"]]
    assert len(exprs) >= 5
    for metric in {m for e in exprs for m in re.findall(r"budrt[_:][a-z_:]+", e)}:
        base = re.sub(r"_(bucket|sum|count)$", "", metric)
        assert f'"{base}"' in source, f"{metric}: no such metric in src/budrt"


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"config": {"secret_key": "x" * 32}}, "secret"),
        ({"config": {"gateway": {"redis_url": "redis://:pw@r:6379"}}}, "secret"),
        ({"gateway": {"replicas": 1}}, "at least 2"),
        ({"secrets": {"databaseUrl": {"name": ""}}}, "shared database"),
        ({"modelServers": [{"name": "Bad_Name", "models": [], "port": 8001}]}, "DNS label"),
        ({"modelServers": [{"name": "x", "models": ["nope"], "port": 8001}]}, "not in `models`"),
        ({"config": {"objects": {"backend": "s3"}}}, "aws-kms"),
        ({"tls": {"enabled": True}}, "tls.existingSecret"),
    ],
)
def test_unsafe_values_are_refused(values: dict[str, Any], message: str) -> None:
    with pytest.raises(helm.HelmError, match=re.escape(message)):
        render(values)


# -- the model servers' exec probe (files/probe.py), against a stand-in server on loopback --


def _load_probe() -> ModuleType:
    spec = importlib.util.spec_from_file_location("budrt_chart_probe", CHART / "files" / "probe.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 (the stdlib's name)
        ok = self.path == "/health/live" or self.headers.get("Authorization") == "Bearer right-key-0123456789"
        self.send_response(200 if ok else 401)
        self.end_headers()
        self.wfile.write(b'{"status": "ok"}' if ok else b"{}")

    def log_message(self, *args: object) -> None:
        pass


def test_probe_sends_the_internal_key(clean_env: pytest.MonkeyPatch) -> None:
    probe = _load_probe()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = str(server.server_address[1])
    try:
        assert probe.main(["probe.py", "/health/live", port]) == 0
        assert probe.main(["probe.py", "/health/ready", port]) == 1
        clean_env.setenv("BUDRT_INTERNAL_KEY", "right-key-0123456789")
        assert probe.main(["probe.py", "/health/ready", port]) == 0
    finally:
        server.shutdown()
        server.server_close()
    assert probe.main(["probe.py", "/health/live", port]) == 1  # nothing listening


@pytest.mark.parametrize("kind", ["hpa", "keda"])
def test_model_server_groups_scale_on_tokens_and_waiting_requests(kind: str) -> None:
    """`modelServers[].autoscaling`: an HPA on the per-pod metrics prometheus-adapter serves
    (deploy/monitoring/prometheus-adapter.yaml), or a KEDA ScaledObject on the same two signals
    that may scale to zero; either way the Deployment leaves its replica count to the scaler."""
    scaling = {"enabled": True, "kind": kind, "minReplicas": 0 if kind == "keda" else 1, "maxReplicas": 5}
    if kind == "keda":
        scaling["prometheusAddress"] = "http://prometheus-operated.monitoring.svc:9090"
    docs = render(
        {"modelServers": [{"name": "text", "models": ["smollm2-135m-instruct"], "autoscaling": scaling}]}
    )
    (deployment,) = [d for d in by_kind(docs, "Deployment") if d["metadata"]["name"] == "budrt-ms-text"]
    assert "replicas" not in deployment["spec"]
    if kind == "hpa":
        (hpa,) = [
            h for h in by_kind(docs, "HorizontalPodAutoscaler") if h["metadata"]["name"] == "budrt-ms-text"
        ]
        kubernetes_validate.validate(hpa, KUBE_VERSION, strict=True)
        assert hpa["spec"]["scaleTargetRef"]["name"] == "budrt-ms-text" and hpa["spec"]["maxReplicas"] == 5
        targets = {
            m["pods"]["metric"]["name"]: m["pods"]["target"]["averageValue"] for m in hpa["spec"]["metrics"]
        }
        assert targets == {"budrt_generation_tokens_per_second": "160", "budrt_num_requests_waiting": "2"}
        adapter = yaml.safe_load((ROOT / "deploy" / "monitoring" / "prometheus-adapter.yaml").read_text())
        served = {
            rule["name"]["as"]: rule["seriesQuery"].split("{")[0] for rule in adapter["rules"]["custom"]
        }
        assert served == {
            "budrt_generation_tokens_per_second": "budrt:generation_tokens_total",
            "budrt_num_requests_waiting": "budrt:num_requests_waiting",
        }
        assert not by_kind(docs, "ScaledObject")
    else:
        (scaled,) = by_kind(docs, "ScaledObject")
        assert scaled["spec"]["scaleTargetRef"]["name"] == "budrt-ms-text"
        assert (scaled["spec"]["minReplicaCount"], scaled["spec"]["maxReplicaCount"]) == (0, 5)
        queries = [t["metadata"]["query"] for t in scaled["spec"]["triggers"]]
        assert "budrt:generation_tokens_total" in queries[0] and "budrt:num_requests_waiting" in queries[1]
        assert all('pod=~"budrt-ms-text-.*"' in q for q in queries[:2])
        # From zero, the gateways' requests for the group's models wake it.
        assert 'budrt_gateway_requests_total{namespace="ai",model=~"smollm2-135m-instruct"}' in queries[2]
        assert scaled["spec"]["triggers"][2]["metadata"]["activationThreshold"] == "0"
        assert not [h for h in by_kind(docs, "HorizontalPodAutoscaler") if "ms-text" in h["metadata"]["name"]]
    # The metric names exist: the model servers export them (server/metrics.py).
    source = (ROOT / "src" / "budrt" / "server" / "metrics.py").read_text()
    assert '"budrt:generation_tokens_total"' in source and '"budrt:num_requests_waiting"' in source
