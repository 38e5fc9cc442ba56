"""The Kubernetes overlays render, validate against the Kubernetes schema, and agree with the code.

Rendering uses `kubectl kustomize` (kustomize v5 built in); without kubectl these tests skip
and say so. Validation is offline and strict (unknown fields fail) with kubernetes-validate,
for the oldest Kubernetes the manifests target and for the newest it knows.
"""

from __future__ import annotations

import copy
from typing import Any

import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml  # type: ignore[import-untyped]
from kubernetes_validate.utils import latest_version  # type: ignore[import-untyped]

from gateway.kiln_gateway.container import CONFIG_PATH, UPSTREAMS
from gateway.kiln_gateway.render import HEALTH_PATH
from kiln.img2img.v1 import img2img_service_pb2
from kiln.mesh.v1 import mesh_service_pb2
from kiln_img2img import SERVICE_NAME as IMG2IMG_SERVICE
from kiln_mesh import SERVICE_NAME as MESH_SERVICE
from kiln_runtime.settings import ServerSettings, StorageSettings
from kiln_runtime.telemetry.metrics import ServiceMetrics
from tests.deploy.support import (
    K8S,
    K8S_MIN_VERSION,
    MODEL_SERVERS,
    OVERLAYS,
    S3_OVERLAYS,
    container,
    env_value,
    find,
    is_setting,
    render_overlay,
)

#: The health service names, from the generated descriptors (what the servers register).
HEALTH_NAMES = {
    "img2img": img2img_service_pb2.DESCRIPTOR.services_by_name["Img2ImgProvider"].full_name,
    "mesh": mesh_service_pb2.DESCRIPTOR.services_by_name["MeshProvider"].full_name,
}
#: Seconds between SIGTERM's drain ending and the kubelet's SIGKILL: stop, unload, flush logs.
STOP_MARGIN_S = 5
STARTUP_WINDOW_MIN_S = 600  # a first start downloads several GB


def test_health_names_are_the_servers_own() -> None:
    assert HEALTH_NAMES == {"img2img": IMG2IMG_SERVICE, "mesh": MESH_SERVICE}


@pytest.mark.parametrize("overlay", OVERLAYS)
@pytest.mark.parametrize("version", [K8S_MIN_VERSION, latest_version()])
def test_every_manifest_validates(overlay: str, version: str) -> None:
    manifests = render_overlay(overlay)
    kinds = sorted({m["kind"] for m in manifests})
    assert kinds == sorted(
        {
            "ConfigMap",
            "Deployment",
            "HorizontalPodAutoscaler",
            "Job",
            "Namespace",
            "PersistentVolumeClaim",
            "PodDisruptionBudget",
            "Secret",
            "Service",
        }
    )
    for manifest in manifests:
        kubernetes_validate.validate(manifest, version, strict=True)


def test_validation_is_strict() -> None:
    # The check above must be able to fail: a misspelt field is an error, not ignored.
    deployment = copy.deepcopy(find(render_overlay("gpu"), "Deployment", "img2img"))
    container(deployment, "img2img")["readinessProbe"]["grpcc"] = {"port": 50051}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_MIN_VERSION, strict=True)


@pytest.mark.parametrize("overlay", OVERLAYS)
@pytest.mark.parametrize("name", MODEL_SERVERS)
def test_probes_ask_the_real_health_service(overlay: str, name: str) -> None:
    deployment = find(render_overlay(overlay), "Deployment", name)
    server = container(deployment, name)
    port = next(p["containerPort"] for p in server["ports"] if p["name"] == "grpc")
    for probe in ("startupProbe", "readinessProbe"):
        assert server[probe]["grpc"] == {"port": port, "service": HEALTH_NAMES[name]}, probe
    # Liveness asks about the whole server (""), which the model manager publishes too.
    assert server["livenessProbe"]["grpc"].get("service", "") == ""
    assert server["livenessProbe"]["grpc"]["port"] == port
    startup = server["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= STARTUP_WINDOW_MIN_S
    assert env_value(server, f"KILN_{name.upper()}__SERVER__PORT") == str(port)


@pytest.mark.parametrize("overlay", OVERLAYS)
@pytest.mark.parametrize("name", MODEL_SERVERS)
def test_termination_covers_prestop_and_the_drain(overlay: str, name: str) -> None:
    deployment = find(render_overlay(overlay), "Deployment", name)
    pod = deployment["spec"]["template"]["spec"]
    server = container(deployment, name)
    grace = env_value(server, f"KILN_{name.upper()}__SERVER__SHUTDOWN_GRACE_S")
    drain_s = float(grace) if grace is not None else ServerSettings().shutdown_grace_s
    pre_stop_s = server["lifecycle"]["preStop"]["sleep"]["seconds"]
    termination_s = pod["terminationGracePeriodSeconds"]
    # The countdown starts with preStop; SIGKILL must come after the drain could finish.
    assert termination_s >= pre_stop_s + drain_s + STOP_MARGIN_S
    liveness = server["livenessProbe"]
    # A draining server refuses health checks; liveness must not restart it meanwhile.
    assert liveness["periodSeconds"] * liveness["failureThreshold"] >= termination_s


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_gateway_drain_fits_its_grace_period(overlay: str) -> None:
    deployment = find(render_overlay(overlay), "Deployment", "gateway")
    envoy = container(deployment, "envoy")
    command = envoy["lifecycle"]["preStop"]["exec"]["command"]
    assert command[:2] == ["kiln-gateway", "drain"]
    assert deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > int(command[2])
    assert envoy["readinessProbe"]["httpGet"]["path"] == HEALTH_PATH
    assert "tcpSocket" in envoy["livenessProbe"]  # not /healthz: that is 503 while draining


def queue_depth_metric_name() -> str:
    """The exported name of `ServiceMetrics.queue_depth`, found by its value, not by its spelling."""
    metrics = ServiceMetrics("probe")
    metrics.queue_depth.set(7)
    names = [
        sample.name
        for family in metrics.registry.collect()
        for sample in family.samples
        if sample.value == 7 and sample.labels == {"service": "probe"}
    ]
    assert len(names) == 1, names
    return names[0]


@pytest.mark.parametrize("overlay", OVERLAYS)
@pytest.mark.parametrize("name", MODEL_SERVERS)
def test_autoscaling_on_the_real_queue_metric(overlay: str, name: str) -> None:
    manifests = render_overlay(overlay)
    hpa = find(manifests, "HorizontalPodAutoscaler", name)
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": name}
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods"
    assert metric["pods"]["metric"]["name"] == queue_depth_metric_name()
    # The HPA owns the replica count; a fixed one in the Deployment would fight it on every apply.
    assert "replicas" not in find(manifests, "Deployment", name)["spec"]
    # Prometheus must scrape the port that serves the metric.
    template = find(manifests, "Deployment", name)["spec"]["template"]
    metrics_port = next(
        p["containerPort"]
        for p in container(find(manifests, "Deployment", name), name)["ports"]
        if p["name"] == "metrics"
    )
    assert template["metadata"]["annotations"]["prometheus.io/port"] == str(metrics_port)


def test_the_adapter_rule_serves_the_metric_the_hpas_use() -> None:
    values = yaml.safe_load((K8S / "autoscaling" / "prometheus-adapter-values.yaml").read_text())
    (rule,) = values["rules"]["custom"]
    name = queue_depth_metric_name()
    assert rule["seriesQuery"].startswith(f"{name}{{")
    assert rule["name"]["as"] == name
    assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}


def test_gpu_pools_request_a_gpu_on_gpu_nodes() -> None:
    manifests = render_overlay("gpu")
    for name in MODEL_SERVERS:
        deployment = find(manifests, "Deployment", name)
        pod = deployment["spec"]["template"]["spec"]
        resources = container(deployment, name)["resources"]
        assert resources["limits"]["nvidia.com/gpu"] == resources["requests"]["nvidia.com/gpu"] == 1
        assert pod["nodeSelector"], name
        assert any(t["key"] == "nvidia.com/gpu" and t["effect"] == "NoSchedule" for t in pod["tolerations"])
        assert env_value(container(deployment, name), f"KILN_{name.upper()}__RUNTIME__DEVICE") == "cuda"
        assert container(deployment, name)["image"] == f"kiln/{name}:gpu"
    for name in MODEL_SERVERS:
        deployment = find(render_overlay("cpu"), "Deployment", name)
        assert "nvidia.com/gpu" not in str(deployment), name
        assert env_value(container(deployment, name), f"KILN_{name.upper()}__RUNTIME__DEVICE") == "cpu"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_pod_is_sized_and_unprivileged(overlay: str) -> None:
    for manifest in render_overlay(overlay):
        if manifest["kind"] not in ("Deployment", "Job"):
            continue
        pod = manifest["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True, manifest["metadata"]["name"]
        for spec in pod["containers"]:
            resources = spec["resources"]
            assert {"cpu", "memory"} <= set(resources["requests"]), spec["name"]
            assert "memory" in resources["limits"], spec["name"]
            assert spec["securityContext"]["allowPrivilegeEscalation"] is False
            assert spec["securityContext"]["capabilities"]["drop"] == ["ALL"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_pool_has_a_disruption_budget(overlay: str) -> None:
    manifests = render_overlay(overlay)
    for name in (*MODEL_SERVERS, "gateway"):
        budget = find(manifests, "PodDisruptionBudget", name)
        labels = find(manifests, "Deployment", name)["spec"]["template"]["metadata"]["labels"]
        assert budget["spec"]["selector"]["matchLabels"].items() <= labels.items()
        assert budget["spec"]["maxUnavailable"] == 1  # minAvailable on one replica would block drains


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_envoy_finds_every_replica_through_headless_services(overlay: str) -> None:
    manifests = render_overlay(overlay)
    for name in MODEL_SERVERS:
        host, _, port = UPSTREAMS[name].partition(":")
        service = find(manifests, "Service", host)
        assert service["spec"]["clusterIP"] == "None"  # DNS lists every ready pod (STRICT_DNS)
        assert any(p["port"] == int(port) for p in service["spec"]["ports"])
        labels = find(manifests, "Deployment", name)["spec"]["template"]["metadata"]["labels"]
        assert service["spec"]["selector"].items() <= labels.items()
    config = yaml.safe_load(CONFIG_PATH.read_text())
    for cluster in config["static_resources"]["clusters"]:
        assert cluster["type"] == "STRICT_DNS" and cluster["lb_policy"] == "LEAST_REQUEST"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_gateway_mounts_the_committed_config(overlay: str) -> None:
    manifests = render_overlay(overlay)
    config_map = find(manifests, "ConfigMap", "gateway-envoy")
    assert config_map["data"] == {"envoy.yaml": CONFIG_PATH.read_text()}
    deployment = find(manifests, "Deployment", "gateway")
    envoy = container(deployment, "envoy")
    args = envoy["args"]
    config_file = args[args.index("-c") + 1]
    (mount,) = [m for m in envoy["volumeMounts"] if config_file.startswith(m["mountPath"] + "/")]
    (volume,) = [v for v in deployment["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"]]
    assert volume["configMap"]["name"] == config_map["metadata"]["name"]
    assert config_file.removeprefix(mount["mountPath"] + "/") == "envoy.yaml"
    listener = yaml.safe_load(CONFIG_PATH.read_text())["static_resources"]["listeners"][0]
    port = listener["address"]["socket_address"]["port_value"]
    assert [p["containerPort"] for p in envoy["ports"]] == [port]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_environment_names_are_real_settings(overlay: str) -> None:
    manifests = render_overlay(overlay)
    names: set[str] = set()
    for manifest in manifests:
        if manifest["kind"] == "Secret":
            names |= set(manifest.get("data", {})) | set(manifest.get("stringData", {}))
        if manifest["kind"] in ("Deployment", "Job"):
            for spec in manifest["spec"]["template"]["spec"]["containers"]:
                names |= {item["name"] for item in spec.get("env", [])}
    kiln_names = {name for name in names if name.startswith("KILN_")}
    assert {"KILN_IMG2IMG__GEMINI__API_KEY", "KILN_MESH__STABLE_FAST_3D__API_KEY"} <= kiln_names
    assert [name for name in sorted(kiln_names) if not is_setting(name)] == []


def test_is_setting_rejects_invented_names() -> None:
    assert is_setting("KILN_IMG2IMG__SERVER__SHUTDOWN_GRACE_S")
    assert not is_setting("KILN_IMG2IMG__SERVER__DRAIN_S")
    assert not is_setting("KILN_MESH__GEMINI__API_KEY")


def pods_using(manifests: list[dict[str, Any]], claim: str) -> list[str]:
    return [
        m["metadata"]["name"]
        for m in manifests
        if m["kind"] in ("Deployment", "Job")
        for v in m["spec"]["template"]["spec"].get("volumes", [])
        if v.get("persistentVolumeClaim", {}).get("claimName") == claim
    ]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_model_cache_is_shared_and_filled_by_the_job(overlay: str) -> None:
    manifests = render_overlay(overlay)
    assert sorted(pods_using(manifests, "models")) == ["img2img", "mesh", "models-fetch"]
    # The gateway sends every artifact download to img2img: both servers share the store,
    # a volume, or (the S3 overlays) a bucket, and then no artifacts volume exists at all.
    shared = [] if overlay in S3_OVERLAYS else ["img2img", "mesh"]
    assert sorted(pods_using(manifests, "artifacts")) == shared
    claims = {m["metadata"]["name"] for m in manifests if m["kind"] == "PersistentVolumeClaim"}
    assert claims == ({"models"} if overlay in S3_OVERLAYS else {"models", "artifacts"})
    job = find(manifests, "Job", "models-fetch")
    assert container(job, "fetch")["command"] == ["kiln-fetch-models"]
    assert container(job, "fetch")["image"] == "kiln/img2img:cpu"


@pytest.mark.parametrize("overlay", S3_OVERLAYS)
@pytest.mark.parametrize("name", MODEL_SERVERS)
def test_s3_overlays_configure_the_bucket_from_a_config_map_and_a_secret(overlay: str, name: str) -> None:
    manifests = render_overlay(overlay)
    config = find(manifests, "ConfigMap", "object-store")
    secret = find(manifests, "Secret", "object-store-credentials")
    server = container(find(manifests, "Deployment", name), name)
    # Generated names carry a content hash; the references must name the generated objects.
    references = [(kind, ref[kind]["name"]) for ref in server["envFrom"] for kind in ref]
    assert ("configMapRef", config["metadata"]["name"]) in references
    assert ("secretRef", secret["metadata"]["name"]) in references
    assert any(n.startswith("vendor-keys-") for kind, n in references if kind == "secretRef"), references
    # Every key is a real setting, the backend is s3, and the settings load as the server would.
    data = config["data"]
    assert [key for key in sorted(data) if not is_setting(key)] == []
    assert data["KILN_STORAGE__BACKEND"] == "s3"
    settings = StorageSettings.model_validate(
        {key.removeprefix("KILN_STORAGE__").lower(): value for key, value in data.items() if "__S3__" not in key}
        | {"s3": {key.split("__S3__")[1].lower(): value for key, value in data.items() if "__S3__" in key}}
    )
    assert settings.backend == "s3" and settings.s3.bucket
    # Credentials only through the standard AWS variables, from the Secret, never the ConfigMap.
    assert set(secret.get("data", {})) == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
    assert not [key for key in data if key.startswith("AWS_")]
    # /data is scratch space now: nothing there needs to be shared or to outlive the pod.
    volumes = find(manifests, "Deployment", name)["spec"]["template"]["spec"]["volumes"]
    (artifacts,) = [v for v in volumes if v["name"] == "artifacts"]
    assert "emptyDir" in artifacts and "persistentVolumeClaim" not in artifacts
