"""deploy/kubernetes: every manifest lints (yamllint) and validates against the Kubernetes
schemas shipped by kubernetes-validate (offline), and the pieces fit together: selectors match
the pod labels, the HPA targets the Deployment, the adapter exposes a metric the service exports,
the settings in the pods are valid RESMEMNET_* values, and the grace period covers a drain."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from conftest import REPO

K8S = REPO / "deploy" / "kubernetes"
MANIFESTS = sorted(p for p in K8S.rglob("*.yaml") if not p.name.startswith("."))
VARIANTS = ("gpu", "cpu")
# oldest and newest Kubernetes versions whose schemas kubernetes-validate ships and we check
K8S_VERSIONS = ("1.29.0", "1.37.0")
CRDS = {("monitoring.coreos.com/v1", "ServiceMonitor")}
NOT_RESOURCES = {"kustomization.yaml", "values.yaml", ".yamllint.yaml"}


def docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def build(variant: str) -> dict[str, dict]:
    """What `kubectl apply -k deploy/kubernetes/<variant>` applies, by kind (kustomize without
    transformers: resources only, which is all these kustomizations use)."""
    out: dict[str, dict] = {}

    def walk(folder: Path):
        kust = yaml.safe_load((folder / "kustomization.yaml").read_text())
        assert set(kust) <= {"apiVersion", "kind", "resources"}, "kustomization uses more than resources"
        for res in kust["resources"]:
            target = (folder / res).resolve()
            assert target.exists(), f"{folder}/{res} missing"
            if target.is_dir():
                walk(target)
            else:
                for d in docs(target):
                    assert d["kind"] not in out, f"{d['kind']} twice in {variant}"
                    out[d["kind"]] = d

    walk(K8S / variant)
    return out


def test_manifests_exist():
    names = {str(p.relative_to(K8S)) for p in MANIFESTS}
    assert {"gpu/deployment.yaml", "cpu/deployment.yaml", "base/service.yaml", "base/pdb.yaml",
            "base/servicemonitor.yaml", "gpu/hpa.yaml", "cpu/hpa.yaml",
            "prometheus-adapter/values.yaml", "prometheus-adapter/adapter-config.yaml"} <= names


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: str(p.relative_to(K8S)))
def test_yamllint_clean(path):
    from yamllint import linter
    from yamllint.config import YamlLintConfig

    config = YamlLintConfig(file=str(K8S / ".yamllint.yaml"))
    problems = [f"{path.name}:{p.line}:{p.column} {p.rule}: {p.desc}" for p in linter.run(path.read_text(), config)]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("path", [p for p in MANIFESTS if p.name not in NOT_RESOURCES],
                         ids=lambda p: str(p.relative_to(K8S)))
def test_validates_against_kubernetes_schema(path, version):
    import kubernetes_validate

    for d in docs(path):
        if (d["apiVersion"], d["kind"]) in CRDS:
            continue  # no schema shipped: checked structurally below
        kubernetes_validate.validate(d, version, strict=True)  # raises ValidationError with the path


def test_a_wrong_manifest_fails_validation():
    """The schema check has teeth: a misspelt field or a wrong type is reported."""
    import kubernetes_validate

    dep = docs(K8S / "gpu" / "deployment.yaml")[0]
    dep["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["periodSecond"] = 5  # misspelt
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(dep, "1.37.0", strict=True)
    dep = docs(K8S / "cpu" / "deployment.yaml")[0]
    dep["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(dep, "1.37.0", strict=True)


def _container(dep: dict) -> dict:
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    return c


def _env(dep: dict) -> dict[str, str]:
    return {e["name"]: e["value"] for e in _container(dep)["env"]}


def _matches(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


@pytest.mark.parametrize("variant", VARIANTS)
def test_variant_pieces_fit_together(variant):
    res = build(variant)
    assert set(res) == {"Deployment", "Service", "PodDisruptionBudget", "ServiceMonitor", "HorizontalPodAutoscaler"}
    dep, svc, pdb, mon, hpa = (res[k] for k in ("Deployment", "Service", "PodDisruptionBudget", "ServiceMonitor",
                                                "HorizontalPodAutoscaler"))
    pod_labels = dep["spec"]["template"]["metadata"]["labels"]
    assert _matches(dep["spec"]["selector"]["matchLabels"], pod_labels)
    assert _matches(svc["spec"]["selector"], pod_labels)
    assert _matches(pdb["spec"]["selector"]["matchLabels"], pod_labels)
    assert _matches(mon["spec"]["selector"]["matchLabels"], svc["metadata"]["labels"])
    port_names = {p["name"] for p in _container(dep)["ports"]}
    assert svc["spec"]["ports"][0]["targetPort"] in port_names
    assert {e["port"] for e in mon["spec"]["endpoints"]} <= {p["name"] for p in svc["spec"]["ports"]}
    assert mon["spec"]["endpoints"][0]["path"] == "/metrics"
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", dep["metadata"]["name"])
    assert hpa["spec"]["minReplicas"] > pdb["spec"]["minAvailable"]  # a drain never stops the last replica
    assert dep["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


@pytest.mark.parametrize("variant", VARIANTS)
def test_pod_is_non_root_and_probed_on_the_service_endpoints(variant):
    dep = build(variant)["Deployment"]
    pod = dep["spec"]["template"]["spec"]
    c = _container(dep)
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == 10001
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    # /healthz is 200 while the model loads, so the start-up probe must wait on /readyz, at least
    # as long as the Dockerfile's start period (180 s) for loading the ResNet-152 checkpoint
    start = c["startupProbe"]
    assert start["httpGet"]["path"] == "/readyz"
    assert start["periodSeconds"] * start["failureThreshold"] >= 180
    limits, requests = c["resources"]["limits"], c["resources"]["requests"]
    assert {"cpu", "memory"} <= set(limits) and {"cpu", "memory"} <= set(requests)
    if variant == "gpu":
        assert limits["nvidia.com/gpu"] == "1" == requests["nvidia.com/gpu"]
    else:
        assert "nvidia.com/gpu" not in limits
        assert int(_env(dep)["RESMEMNET_TORCH_THREADS"]) == int(limits["cpu"])


@pytest.mark.parametrize("variant", VARIANTS)
def test_pod_settings_are_valid_and_the_grace_period_covers_a_drain(variant):
    from app.settings import ENV_PREFIX, ServiceSettings

    dep = build(variant)["Deployment"]
    env = _env(dep)
    settings = ServiceSettings.from_env(env)  # raises SettingsError on a bad value
    unknown = {k for k in env if k.startswith(ENV_PREFIX)} - {
        f"{ENV_PREFIX}{n.upper()}" for n in ServiceSettings.__dataclass_fields__}
    assert not unknown, f"not service settings: {unknown}"
    assert settings.device == variant.replace("gpu", "cuda") and settings.host == "0.0.0.0"
    pod = dep["spec"]["template"]["spec"]
    pre_stop = _container(dep)["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    drain = int(pre_stop[1]) + settings.graceful_shutdown_s + settings.request_timeout_s
    assert pod["terminationGracePeriodSeconds"] >= drain
    assert _container(dep)["ports"][0]["containerPort"] == settings.port


def test_servicemonitor_structure():
    (mon,) = docs(K8S / "base" / "servicemonitor.yaml")
    assert mon["apiVersion"] == "monitoring.coreos.com/v1" and mon["kind"] == "ServiceMonitor"
    assert set(mon["spec"]) == {"selector", "endpoints"}
    for ep in mon["spec"]["endpoints"]:
        assert set(ep) <= {"port", "path", "interval", "scrapeTimeout"}
        assert ep["interval"].endswith("s") and ep["scrapeTimeout"].endswith("s")


def test_adapter_rule_exposes_the_metric_the_hpa_reads_and_the_service_exports():
    from prometheus_client.exposition import generate_latest

    from app.metrics import ServiceMetrics

    helm = yaml.safe_load((K8S / "prometheus-adapter" / "values.yaml").read_text())["rules"]["custom"]
    (cm,) = docs(K8S / "prometheus-adapter" / "adapter-config.yaml")
    plain = yaml.safe_load(cm["data"]["config.yaml"])["rules"]
    assert helm == plain  # one rule, two installation styles
    (rule,) = plain
    assert set(rule) == {"seriesQuery", "resources", "name", "metricsQuery"}
    assert rule["resources"]["overrides"] == {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}
    for marker in ("<<.Series>>", "<<.LabelMatchers>>", "<<.GroupBy>>"):
        assert marker in rule["metricsQuery"]
    series = rule["seriesQuery"].split("{")[0]
    exported = generate_latest(ServiceMetrics(process_metrics=False).registry).decode()
    assert f"\n{series} " in exported or exported.startswith(f"{series} ")
    hpa = docs(K8S / "gpu" / "hpa.yaml")[0]
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods" and metric["pods"]["metric"]["name"] == rule["name"]["as"]
    cpu_hpa = docs(K8S / "cpu" / "hpa.yaml")[0]
    assert cpu_hpa["spec"]["metrics"][0]["resource"]["name"] == "cpu"


@pytest.mark.parametrize("variant", VARIANTS)
def test_pods_get_their_api_keys_from_a_mounted_secret(variant):
    """The pod binds 0.0.0.0, so without a key `resmemnet serve` refuses to start: the key file
    comes from a Secret (docs/deploy.md), read-only, and no key is written in the manifests."""
    from pathlib import PurePosixPath

    dep = build(variant)["Deployment"]
    key_file = PurePosixPath(_env(dep)["RESMEMNET_API_KEYS_FILE"])
    mounts = {m["name"]: m for m in _container(dep)["volumeMounts"]}
    volumes = {v["name"]: v for v in dep["spec"]["template"]["spec"]["volumes"]}
    (name,) = [n for n, m in mounts.items() if key_file.parent == PurePosixPath(m["mountPath"])]
    assert mounts[name]["readOnly"] is True
    secret = volumes[name]["secret"]
    assert secret["secretName"] == "resmemnet-api-keys" and not secret.get("optional", False)
    assert secret["defaultMode"] == 0o440
    assert "RESMEMNET_API_KEYS" not in _env(dep), "keys are never written into a manifest"
    text = (K8S / variant / "deployment.yaml").read_text()
    assert f"kubectl create secret generic resmemnet-api-keys --from-file={key_file.name}=" in text
