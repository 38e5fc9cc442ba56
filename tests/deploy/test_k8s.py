"""The Kubernetes overlays render, validate against the Kubernetes schema, and agree with the code.

Rendering uses `kubectl kustomize` (kustomize v5 built in); without kubectl these tests skip
and say so. Validation is offline and strict (unknown fields fail) with kubernetes-validate,
for the oldest Kubernetes the manifests target and for the newest it knows.
"""

from __future__ import annotations

import base64
import copy
from pathlib import PurePosixPath
from typing import Any

import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml  # type: ignore[import-untyped]
from kubernetes_validate.utils import latest_version  # type: ignore[import-untyped]

from gateway.kiln_gateway.auth import parse_api_keys
from gateway.kiln_gateway.container import CONFIG_PATH, TLS_CONFIG_PATH, UPSTREAMS, container_settings, tls_fields
from gateway.kiln_gateway.render import HEALTH_PATH
from kiln.img2img.v1 import img2img_service_pb2
from kiln.mesh.v1 import mesh_service_pb2
from kiln_img2img import SERVICE_NAME as IMG2IMG_SERVICE
from kiln_mesh import SERVICE_NAME as MESH_SERVICE
from kiln_runtime import healthcheck
from kiln_runtime.settings import ServerSettings, StorageSettings
from kiln_runtime.telemetry.metrics import ServiceMetrics
from tests.deploy.support import (
    K8S,
    K8S_MIN_VERSION,
    MODEL_SERVERS,
    OVERLAYS,
    S3_OVERLAYS,
    TLS_OVERLAYS,
    VARIANTS,
    container,
    env_value,
    find,
    is_setting,
    render_overlay,
    server_image,
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


@pytest.mark.parametrize("overlay", OVERLAYS + TLS_OVERLAYS)
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
            "NetworkPolicy",
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


@pytest.mark.parametrize("overlay", OVERLAYS + TLS_OVERLAYS)
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


@pytest.mark.parametrize("overlay", OVERLAYS + TLS_OVERLAYS)
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
        assert pod_device(deployment, name) == "cuda"
        assert container(deployment, name)["image"] == f"kiln/{name}:gpu"
    for name in MODEL_SERVERS:
        deployment = find(render_overlay("cpu"), "Deployment", name)
        assert "nvidia.com/gpu" not in str(deployment), name
        assert pod_device(deployment, name) == "cpu"


def pod_device(deployment: dict[str, Any], name: str) -> str:
    """The device a server's pod asks for: the manifest's setting, else its image's (by the tag)."""
    spec = container(deployment, name)
    setting = f"KILN_{name.upper()}__RUNTIME__DEVICE"
    value = env_value(spec, setting)
    if value is not None:
        return value
    repository, _, variant = spec["image"].partition(":")
    assert repository == f"kiln/{name}" and variant in VARIANTS, spec["image"]
    return server_image(name, variant).env[setting]


@pytest.mark.parametrize("overlay", OVERLAYS + TLS_OVERLAYS)
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


@pytest.mark.parametrize("overlay", OVERLAYS + TLS_OVERLAYS)
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


@pytest.mark.parametrize("overlay", OVERLAYS + TLS_OVERLAYS)
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
    # The health check's own options (the TLS component's probes) are the one other reader of KILN_ names.
    kiln_names -= set(healthcheck.ENVIRONMENT.values())
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


@pytest.mark.parametrize("overlay", OVERLAYS + TLS_OVERLAYS)
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


# --- Edge security: NetworkPolicies, Secrets, TLS -------------------------------------------------

NAMESPACE = "kiln"
#: Labels of a metrics scraper as the policies expect it (deploy/k8s/base/network-policies.yaml).
PROMETHEUS = {"app.kubernetes.io/name": "prometheus"}


def _matches(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """A Kubernetes label selector (matchLabels, matchExpressions In/NotIn/Exists) against labels."""
    if not selector.get("matchLabels", {}).items() <= labels.items():
        return False
    for expression in selector.get("matchExpressions", []):
        key, operator, values = expression["key"], expression["operator"], expression.get("values", [])
        present = key in labels
        if operator == "In" and not (present and labels[key] in values):
            return False
        if operator == "NotIn" and present and labels[key] in values:
            return False
        if operator == "Exists" and not present:
            return False
        if operator == "DoesNotExist" and present:
            return False
    return True


def _peer_allows(peer: dict[str, Any], source: dict[str, str], source_namespace: dict[str, str]) -> bool:
    if "ipBlock" in peer:
        return False  # the policies use no ipBlocks; one would need its own check
    if "namespaceSelector" in peer:
        namespace_ok = _matches(peer["namespaceSelector"], source_namespace)
    else:  # a podSelector alone means pods of the policy's own namespace
        namespace_ok = source_namespace.get("kubernetes.io/metadata.name") == NAMESPACE
    return namespace_ok and _matches(peer.get("podSelector", {}), source)


def allowed(
    manifests: list[dict[str, Any]],
    target: str,
    port_name: str,
    source: dict[str, str],
    source_namespace: str = NAMESPACE,
) -> bool:
    """Whether the rendered NetworkPolicies let a pod labelled `source` reach `target`'s named port.

    The semantics of the API: a pod selected by no Ingress policy takes everything; a selected one
    takes what the union of its policies' rules allows.
    """
    labels = find(manifests, "Deployment", target)["spec"]["template"]["metadata"]["labels"]
    namespace_labels = {"kubernetes.io/metadata.name": source_namespace}
    policies = [
        m["spec"]
        for m in manifests
        if m["kind"] == "NetworkPolicy"
        and "Ingress" in m["spec"]["policyTypes"]
        and _matches(m["spec"]["podSelector"], labels)
    ]
    if not policies:
        return True
    for policy in policies:
        for rule in policy.get("ingress", []):
            ports = rule.get("ports")
            if ports is not None and not any(p.get("port") == port_name for p in ports):
                continue
            peers = rule.get("from")
            if peers is None or any(_peer_allows(peer, source, namespace_labels) for peer in peers):
                return True
    return False


def pod_labels(manifests: list[dict[str, Any]], name: str) -> dict[str, str]:
    labels: dict[str, str] = find(manifests, "Deployment", name)["spec"]["template"]["metadata"]["labels"]
    return labels


@pytest.mark.parametrize("overlay", OVERLAYS + TLS_OVERLAYS)
def test_network_policies_let_only_the_gateway_reach_the_servers(overlay: str) -> None:
    manifests = render_overlay(overlay)
    policies = [m for m in manifests if m["kind"] == "NetworkPolicy"]
    deny = find(manifests, "NetworkPolicy", "default-deny-ingress")["spec"]
    assert deny["podSelector"] == {} and deny["policyTypes"] == ["Ingress"] and "ingress" not in deny
    assert all(p["metadata"]["namespace"] == NAMESPACE for p in policies)
    gateway = pod_labels(manifests, "gateway")
    stranger = {"app.kubernetes.io/name": "debug-shell"}
    job = find(manifests, "Job", "models-fetch")["spec"]["template"]["metadata"].get("labels", {})
    for name in MODEL_SERVERS:
        # The policies name ports; each name must exist on the container, or the rule matches nothing.
        assert {p["name"] for p in container(find(manifests, "Deployment", name), name)["ports"]} == {"grpc", "metrics"}
        assert allowed(manifests, name, "grpc", gateway)
        assert not allowed(manifests, name, "grpc", stranger)
        assert not allowed(manifests, name, "grpc", job)
        assert not allowed(manifests, name, "grpc", pod_labels(manifests, "mesh" if name == "img2img" else "img2img"))
        assert not allowed(manifests, name, "grpc", gateway, source_namespace="elsewhere")
        assert not allowed(manifests, name, "grpc", PROMETHEUS, source_namespace="monitoring")
        assert allowed(manifests, name, "metrics", PROMETHEUS, source_namespace="monitoring")
        assert allowed(manifests, name, "metrics", PROMETHEUS)
        assert not allowed(manifests, name, "metrics", gateway)
        assert not allowed(manifests, name, "metrics", stranger, source_namespace="monitoring")
    # The public port is open to anyone (authentication is the gateway's job); nothing else is.
    assert allowed(manifests, "gateway", "http", stranger, source_namespace="ingress-nginx")
    assert not allowed(manifests, "gateway", "admin", stranger)


def test_the_policy_check_can_fail() -> None:
    # Without the default deny, a pod no other policy selects (the gateway's admin port aside)
    # would be open: the evaluator must see that.
    manifests = [m for m in render_overlay("gpu") if m["kind"] != "NetworkPolicy" or m["metadata"]["name"] != "gateway"]
    manifests = [m for m in manifests if m["metadata"]["name"] != "default-deny-ingress"]
    assert allowed(manifests, "gateway", "admin", {"app.kubernetes.io/name": "debug-shell"})


def _mounted(deployment: dict[str, Any], container_name: str, path: str) -> dict[str, Any]:
    """The volume whose mount in `container_name` holds `path` (a file inside a mounted folder)."""
    spec = container(deployment, container_name)
    (mount,) = [m for m in spec["volumeMounts"] if path.startswith(m["mountPath"].rstrip("/") + "/")]
    assert mount.get("readOnly") is True, mount
    (volume,) = [v for v in deployment["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"]]
    result: dict[str, Any] = volume
    return result


@pytest.mark.parametrize("overlay", OVERLAYS + TLS_OVERLAYS)
def test_the_gateway_reads_api_keys_from_a_secret(overlay: str) -> None:
    manifests = render_overlay(overlay)
    settings = container_settings()
    assert settings.auth.mode == "api_key"  # the containers listen on every interface
    keys_file = str(settings.auth.api_keys_file)
    volume = _mounted(find(manifests, "Deployment", "gateway"), "envoy", keys_file)
    secret = find(manifests, "Secret", "gateway-api-keys")
    assert volume["secret"]["secretName"] == secret["metadata"]["name"]
    assert PurePosixPath(keys_file).name in secret["data"]
    # Only the group may read it; the pod's fsGroup is that group, so Envoy's user can.
    assert volume["secret"]["defaultMode"] == 0o440
    pod = find(manifests, "Deployment", "gateway")["spec"]["template"]["spec"]
    assert pod["securityContext"]["fsGroup"] == pod["securityContext"]["runAsGroup"]
    # The committed example holds no key: a real one is filled in locally, never committed.
    committed = base64.b64decode(secret["data"][PurePosixPath(keys_file).name]).decode()
    assert parse_api_keys(committed) == []


@pytest.mark.parametrize("overlay", OVERLAYS + TLS_OVERLAYS)
def test_both_servers_share_the_url_signing_key_from_a_secret(overlay: str) -> None:
    manifests = render_overlay(overlay)
    secret = find(manifests, "Secret", "url-signing-key")
    references = []
    for name in MODEL_SERVERS:
        (item,) = [
            e
            for e in container(find(manifests, "Deployment", name), name)["env"]
            if e["name"] == "KILN_STORAGE__URL_SIGNING_KEY"
        ]
        reference = item["valueFrom"]["secretKeyRef"]
        assert reference["name"] == secret["metadata"]["name"] and reference["key"] in secret["data"]
        references.append(reference)
    assert references[0] == references[1]
    assert is_setting("KILN_STORAGE__URL_SIGNING_KEY")
    assert base64.b64decode(secret["data"]["url-signing-key"]) == b""  # committed empty; filled locally


@pytest.mark.parametrize("overlay", TLS_OVERLAYS)
def test_the_tls_component_mounts_certificates_where_the_configs_expect_them(overlay: str) -> None:
    manifests = render_overlay(overlay)
    # The gateway runs the TLS render, and every file it names is in a mounted Secret.
    config_map = find(manifests, "ConfigMap", "gateway-envoy")
    assert config_map["data"] == {"envoy.yaml": TLS_CONFIG_PATH.read_text()}
    gateway = find(manifests, "Deployment", "gateway")
    secrets = {}
    for field, path in tls_fields().items():
        volume = _mounted(gateway, "envoy", str(path))
        secrets[field] = volume["secret"]["secretName"]
        assert PurePosixPath(str(path)).name in ("tls.crt", "tls.key", "ca.crt")
    assert secrets["cert_file"] == secrets["key_file"] == "gateway-tls"
    assert secrets["upstream_ca_file"] == secrets["upstream_client_cert_file"] == "gateway-upstream-tls"
    assert container(gateway, "envoy")["readinessProbe"]["httpGet"]["scheme"] == "HTTPS"
    listener = yaml.safe_load(TLS_CONFIG_PATH.read_text())["static_resources"]["listeners"][0]
    assert listener["filter_chains"][0]["transport_socket"]["name"] == "envoy.transport_sockets.tls"
    for name in MODEL_SERVERS:
        deployment = find(manifests, "Deployment", name)
        server = container(deployment, name)
        prefix = f"KILN_{name.upper()}__SERVER__"
        files = {
            key: env_value(server, f"{prefix}{key}") for key in ("TLS_CERT_FILE", "TLS_KEY_FILE", "TLS_CLIENT_CA_FILE")
        }
        for path in files.values():
            assert path is not None
            assert _mounted(deployment, name, path)["secret"]["secretName"] == "model-server-tls"
        # The settings accept what the manifest sets (the names are real, the pairing is right).
        assert ServerSettings(**{k.lower(): v for k, v in files.items()}).tls_enabled
        # Native gRPC probes cannot speak TLS: the image's health check runs instead, with a client certificate.
        port = next(p["containerPort"] for p in server["ports"] if p["name"] == "grpc")
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            command = server[probe]["exec"]["command"]
            assert "grpc" not in server[probe]
            assert command[:3] == ["python", "-m", "kiln_runtime.healthcheck"]
            assert command[command.index("--port") + 1] == str(port)
            service = command[command.index("--service") + 1] if "--service" in command else ""
            assert service == (HEALTH_NAMES[name] if probe != "livenessProbe" else "")
        for variable in ("KILN_HEALTHCHECK_CA_FILE", "KILN_HEALTHCHECK_CERT_FILE", "KILN_HEALTHCHECK_KEY_FILE"):
            path = env_value(server, variable)
            assert path is not None
            assert _mounted(deployment, name, path)["secret"]["secretName"] == "gateway-upstream-tls"
        # The gateway verifies the name it dials: the servers' certificate must carry it.
        assert env_value(server, "KILN_HEALTHCHECK_SERVER_NAME") == UPSTREAMS[name].partition(":")[0]
