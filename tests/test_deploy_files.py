"""Static validation of the deployment files; needs neither Docker nor a cluster.

- Dockerfile / .dockerignore: structure (multi-stage, non-root, entrypoint, healthcheck).
- docker-compose.cluster.yml: the Compose Specification JSON schema (vendored under
  tests/schemas/) plus the cluster's invariants; deploy/nginx.conf parsed and checked.
- k8s/*.yaml: every document deserialized into the `kubernetes` client models, strictly
  (a key the model does not know, or a value of the wrong type, fails) plus invariants.
- helm/ara-notify: values.yaml against values.schema.json, template references against
  values.yaml, and the chart rendered with several value sets and checked like k8s/.
  Rendering needs a `helm` binary (HELM_BIN or PATH) or the `helm_python` module
  (PyPI: helm-python-sdk); without either those tests skip, the static ones still run.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import re
import shutil
import subprocess
import tomllib
from collections.abc import Iterator
from fnmatch import fnmatch
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import jsonschema
import pytest
import yaml
from kubernetes import client as k8s_client

ROOT = Path(__file__).resolve().parent.parent
SCHEMAS = Path(__file__).resolve().parent / "schemas"
COMPOSE_FILE = ROOT / "docker-compose.cluster.yml"
NGINX_CONF = ROOT / "deploy" / "nginx.conf"
K8S_DIR = ROOT / "k8s"
CHART_DIR = ROOT / "helm" / "ara-notify"
NAMESPACE = "ara"
RELEASE = "ara-notify"

# Environment variables of PROTOCOL section 8, plus the operational ones the
# deployment files set. A ConfigMap / compose key outside this set is a typo.
PROTOCOL_ENV = {
    "SERVER_HOST",
    "SERVER_PORT",
    "RUN_MODE",
    "JWT_SECRET",
    "JWT_ALGORITHM",
    "JWT_PUBLIC_KEY",
    "JWT_ISSUER",
    "JWT_AUDIENCE",
    "API_KEY",
    "REDIS_URL",
    "DATABASE_URL",
    "NODE_ID",
    "ROUTER_PARTITIONS",
    "SQLITE_PATH",
    "QUEUE_ENABLED",
    "QUEUE_MAX_SIZE_PER_USER",
    "QUEUE_MESSAGE_TTL_SECONDS",
    "ACK_ENABLED",
    "ACK_TIMEOUT_SECONDS",
    "DELIVERY_GUARANTEE",
    "WEBSOCKET_HEARTBEAT_INTERVAL",
    "WEBSOCKET_CONNECTION_TIMEOUT",
    "WEBSOCKET_MAX_CONNECTIONS",
    "WEBSOCKET_MAX_CONNECTIONS_PER_USER",
    "WEBSOCKET_MAX_SUBSCRIPTIONS_PER_CONNECTION",
    "RATELIMIT_ENABLED",
    "RATELIMIT_HTTP_REQUESTS_PER_SECOND",
    "RATELIMIT_HTTP_BURST_SIZE",
    "RATELIMIT_WS_CONNECTIONS_PER_MINUTE",
    "TENANT_ENABLED",
    "TENANT_API_KEYS",
    "OTEL_ENABLED",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "LOG_FORMAT",
    "CORS_ORIGINS",
}
KNOWN_ENV = PROTOCOL_ENV | {
    "DRAIN_TIMEOUT_SECONDS", "WEBSOCKET_COMPRESSION", "ROUTER_BATCH_LINGER_MS",
    "ROUTER_BATCH_LINGER_BUSY_MS", "RECEIPT_RETENTION_SECONDS"}
SECRET_KEYS = {"API_KEY", "JWT_SECRET", "DATABASE_URL", "REDIS_URL"}
DEFAULT_DRAIN_SECONDS = 20


# --------------------------------------------------------------------------- helpers


def _load_yaml_docs(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as fh:
        return [doc for doc in yaml.safe_load_all(fh) if doc]


def _deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _schema_errors(validator: jsonschema.protocols.Validator, instance: Any) -> list[str]:
    return [
        f"{'/'.join(str(p) for p in err.absolute_path) or '<root>'}: {err.message}"
        for err in sorted(validator.iter_errors(instance), key=lambda e: list(e.absolute_path))
    ]


# ------------------------------------------------------------------ Kubernetes models

_API = k8s_client.ApiClient()


def _model_name(api_version: str, kind: str) -> str:
    version = api_version.rsplit("/", 1)[-1]
    return version[:1].upper() + version[1:] + kind


def _strict_diff(given: Any, parsed: Any, path: str) -> Iterator[str]:
    """Yield every place where the model round trip lost or changed the input."""
    if isinstance(given, dict):
        if not isinstance(parsed, dict):
            yield f"{path}: expected an object, the model has {type(parsed).__name__}"
            return
        for key, value in given.items():
            if key not in parsed:
                if value is not None:  # an explicit null is dropped by the model
                    yield f"{path}.{key}: unknown field"
            else:
                yield from _strict_diff(value, parsed[key], f"{path}.{key}")
    elif isinstance(given, list):
        if not isinstance(parsed, list) or len(parsed) != len(given):
            yield f"{path}: list changed in the model round trip"
            return
        for index, (g, p) in enumerate(zip(given, parsed, strict=True)):
            yield from _strict_diff(g, p, f"{path}[{index}]")
    elif given != parsed or type(given) is not type(parsed):
        yield f"{path}: {given!r} ({type(given).__name__}) became {parsed!r}"


# The one CRD we ship: checked against the subset of its schema we use.
SERVICEMONITOR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "metadata": {"type": "object", "required": ["name"]},
        "spec": {
            "type": "object",
            "required": ["selector", "endpoints"],
            "additionalProperties": False,
            "properties": {
                "selector": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {"matchLabels": {"type": "object"}},
                },
                "namespaceSelector": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "matchNames": {"type": "array", "items": {"type": "string"}},
                        "any": {"type": "boolean"},
                    },
                },
                "endpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["port"],
                        "properties": {
                            "port": {"type": "string"},
                            "path": {"type": "string"},
                            "interval": {"type": "string"},
                            "scrapeTimeout": {"type": "string"},
                        },
                    },
                },
            },
        },
    },
}


def validate_k8s_object(doc: dict[str, Any]) -> None:
    """Fail unless ``doc`` is a well-formed object of its kind (strict on unknown keys)."""
    assert isinstance(doc, dict), f"not a mapping: {doc!r}"
    api_version, kind = doc.get("apiVersion"), doc.get("kind")
    assert api_version and kind, f"apiVersion/kind missing in {doc!r:.200}"
    where = f"{kind}/{doc.get('metadata', {}).get('name')}"
    if api_version.startswith("monitoring.coreos.com/"):
        errors = _schema_errors(jsonschema.Draft202012Validator(SERVICEMONITOR_SCHEMA), doc)
        assert not errors, f"{where}: {errors}"
        return
    model = _model_name(api_version, kind)
    assert hasattr(k8s_client, model), f"{where}: no model {model} for {api_version} {kind}"
    try:
        parsed_obj = _API._ApiClient__deserialize(doc, model)  # type: ignore[attr-defined]
    except Exception as exc:  # ValueError/TypeError, or pydantic's from client >= 37
        raise AssertionError(f"{where} does not match the {model} model: {exc}") from exc
    parsed = _API.sanitize_for_serialization(parsed_obj)
    problems = list(_strict_diff(doc, parsed, kind))
    assert not problems, f"{where} does not match the {model} model:\n" + "\n".join(problems)


# ------------------------------------------------------------- cluster invariants


def _component(doc: dict[str, Any]) -> str | None:
    return doc.get("metadata", {}).get("labels", {}).get("app.kubernetes.io/component")


def _find(docs: list[dict[str, Any]], kind: str, component: str | None = None) -> list[dict]:
    return [
        d for d in docs if d["kind"] == kind and (component is None or _component(d) == component)
    ]


def _one(docs: list[dict[str, Any]], kind: str, component: str | None = None) -> dict:
    found = _find(docs, kind, component)
    assert len(found) == 1, f"expected one {kind} {component or ''}, found {len(found)}"
    return found[0]


def _selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def _container_env(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container.get("env", [])}


def _check_pod_security(pod_spec: dict[str, Any], where: str) -> None:
    psc = pod_spec.get("securityContext", {})
    assert psc.get("runAsNonRoot") is True, f"{where}: pod runAsNonRoot"
    assert psc.get("runAsUser", 1) != 0, f"{where}: runAsUser 0"
    assert pod_spec.get("automountServiceAccountToken") is False, where
    for c in pod_spec["containers"]:
        sc = c.get("securityContext", {})
        assert sc.get("readOnlyRootFilesystem") is True, f"{where}/{c['name']}: read-only root"
        assert sc.get("allowPrivilegeEscalation") is False, f"{where}/{c['name']}"
        assert sc.get("capabilities", {}).get("drop") == ["ALL"], f"{where}/{c['name']}: caps"
        assert sc.get("runAsUser", 1) != 0, f"{where}/{c['name']}: runAsUser 0"
        res = c.get("resources", {})
        for part in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(res.get(part, {})), f"{where}: resources.{part}"
        mounts = {m["mountPath"] for m in c.get("volumeMounts", [])}
        assert "/tmp" in mounts, f"{where}/{c['name']}: writable /tmp with read-only root"


def _check_server_pod(deploy: dict[str, Any], component: str, spread: bool) -> dict[str, Any]:
    pod = deploy["spec"]["template"]
    assert _selects(deploy["spec"]["selector"]["matchLabels"], pod["metadata"]["labels"])
    spec = pod["spec"]
    _check_pod_security(spec, component)
    if spread:
        assert spec.get("topologySpreadConstraints"), f"{component}: topologySpreadConstraints"
    for tsc in spec.get("topologySpreadConstraints", []):
        assert _selects(tsc["labelSelector"]["matchLabels"], pod["metadata"]["labels"])
    (container,) = spec["containers"]
    assert container["args"] == [component]
    assert {"name": "http", "containerPort": 8081, "protocol": "TCP"} in container["ports"]
    assert container["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "http"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    assert container["startupProbe"]["httpGet"]["port"] == "http"
    env = _container_env(container)
    assert env["NODE_ID"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert env["SERVER_PORT"]["value"] == "8081"
    return container


def check_cluster(docs: list[dict[str, Any]], *, hpa: bool = True, spread: bool = True) -> None:
    """Invariants shared by k8s/ and every helm rendering."""
    for doc in docs:
        validate_k8s_object(doc)

    configmaps = {d["metadata"]["name"]: d for d in _find(docs, "ConfigMap")}
    secrets = {d["metadata"]["name"]: d for d in _find(docs, "Secret")}

    # gateways
    gw = _one(docs, "Deployment", "gateway")
    gw_container = _check_server_pod(gw, "gateway", spread)
    gw_spec = gw["spec"]["template"]["spec"]
    pre_stop = gw_container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    pre_stop_seconds = int(pre_stop[1])
    assert 3 <= pre_stop_seconds <= 15
    env = _container_env(gw_container)
    drain = DEFAULT_DRAIN_SECONDS
    if "DRAIN_TIMEOUT_SECONDS" in env:
        drain = int(env["DRAIN_TIMEOUT_SECONDS"]["value"])
    else:
        for ref in gw_container.get("envFrom", []):
            cm = configmaps.get(ref.get("configMapRef", {}).get("name"))
            if cm and "DRAIN_TIMEOUT_SECONDS" in cm["data"]:
                drain = int(cm["data"]["DRAIN_TIMEOUT_SECONDS"])
    grace = gw_spec["terminationGracePeriodSeconds"]
    assert grace >= pre_stop_seconds + drain + 5, (grace, pre_stop_seconds, drain)
    if hpa:
        h = _one(docs, "HorizontalPodAutoscaler", "gateway")
        assert h["apiVersion"] == "autoscaling/v2"
        assert h["spec"]["scaleTargetRef"] == {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "name": gw["metadata"]["name"],
        }
        assert h["spec"]["minReplicas"] <= h["spec"]["maxReplicas"]
        (metric,) = h["spec"]["metrics"]
        assert metric["resource"]["name"] == "cpu"
    else:
        assert not _find(docs, "HorizontalPodAutoscaler")
        assert gw["spec"]["replicas"] >= 1

    svc = _one(docs, "Service", "gateway")
    assert svc["spec"].get("sessionAffinity", "None") == "None"
    assert _selects(svc["spec"]["selector"], gw["spec"]["template"]["metadata"]["labels"])
    assert svc["spec"]["ports"][0]["targetPort"] == "http"

    # routers
    router = _one(docs, "Deployment", "router")
    _check_server_pod(router, "router", spread)
    assert router["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] >= 20
    assert not _selects(
        svc["spec"]["selector"], router["spec"]["template"]["metadata"]["labels"]
    ), "the gateway Service must not select routers"

    for pdb in _find(docs, "PodDisruptionBudget"):
        assert pdb["spec"]["maxUnavailable"] == 1
        targets = [
            d
            for d in _find(docs, "Deployment")
            if _selects(
                pdb["spec"]["selector"]["matchLabels"], d["spec"]["template"]["metadata"]["labels"]
            )
        ]
        assert len(targets) == 1, f"PDB {pdb['metadata']['name']} selects {len(targets)}"

    # every env source referenced exists (unless it is an external Secret)
    pods = [d["spec"]["template"]["spec"] for d in _find(docs, "Deployment") + _find(docs, "Job")]
    for pod in pods:
        for c in pod["containers"]:
            for ref in c.get("envFrom", []):
                if "configMapRef" in ref:
                    assert ref["configMapRef"]["name"] in configmaps
            names = {r["secretRef"]["name"] for r in c.get("envFrom", []) if "secretRef" in r}
            assert len(names) == 1, f"{c['name']}: one secretRef expected"

    for cm in configmaps.values():
        unknown = set(cm["data"]) - KNOWN_ENV
        assert not unknown, f"ConfigMap {cm['metadata']['name']}: unknown env names {unknown}"
        assert not set(cm["data"]) & SECRET_KEYS, "secret values in a ConfigMap"
        assert cm["data"]["RUN_MODE"] == "production"
        assert cm["data"]["ROUTER_PARTITIONS"] == "64"
        assert cm["data"]["DELIVERY_GUARANTEE"] == "at-least-once"
        assert cm["data"]["LOG_FORMAT"] == "json"
    for secret in secrets.values():
        assert set(secret["stringData"]) == SECRET_KEYS

    for job in _find(docs, "Job"):
        spec = job["spec"]
        assert spec["template"]["spec"]["restartPolicy"] in ("Never", "OnFailure")
        assert spec["template"]["spec"]["containers"][0]["args"] == ["migrate"]
        assert spec["backoffLimit"] >= 1
        assert "ttlSecondsAfterFinished" in spec
        _check_pod_security(spec["template"]["spec"], "migrate")

    images = {c["image"] for pod in pods for c in pod["containers"]}
    assert len(images) == 1, f"one image for every role, found {images}"


# ------------------------------------------------------------------------ Dockerfile


def _dockerfile_instructions() -> list[tuple[str, str]]:
    text = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    logical: list[str] = []
    buf = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        logical.append(buf + line)
        buf = ""
    out = []
    for line in logical:
        op, _, rest = line.partition(" ")
        out.append((op.upper(), rest.strip()))
    return out


def test_dockerfile_structure() -> None:
    instructions = _dockerfile_instructions()
    args = {}
    for op, rest in instructions:
        if op == "ARG" and "=" in rest:
            key, _, value = rest.partition("=")
            args[key] = value
        if op == "FROM":
            break
    froms = [rest for op, rest in instructions if op == "FROM"]
    assert len(froms) >= 2, "multi-stage build expected"
    for rest in froms:
        image = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], rest.split()[0])
        assert image == "python:3.11-slim", image
    last_from = max(i for i, (op, _) in enumerate(instructions) if op == "FROM")
    final = instructions[last_from:]
    ops = dict(final)
    assert any(op == "COPY" and rest.startswith("--from=") for op, rest in final)
    user = ops["USER"].split(":")[0]
    assert user not in ("root", "0"), "the final stage must run as non-root"
    assert json.loads(ops["ENTRYPOINT"]) == ["ara-notify"]
    assert json.loads(ops["CMD"]) == ["gateway"]
    assert ops["EXPOSE"].split() == ["8081"]

    healthcheck = ops["HEALTHCHECK"]
    cmd = json.loads(healthcheck[healthcheck.index("CMD") + 3 :].strip())
    assert cmd[:2] == ["python", "-c"], "healthcheck must use the stdlib, no curl in slim"
    assert "urllib" in cmd[2] and "http://127.0.0.1:8081/health" in cmd[2]
    compile(cmd[2], "<healthcheck>", "exec")
    assert "curl" not in (ROOT / "Dockerfile").read_text(encoding="utf-8").split("HEALTHCHECK")[1]


def test_dockerignore_keeps_build_inputs_and_drops_secrets() -> None:
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert ".git" in patterns and ".env" in patterns

    def ignored(name: str) -> bool:
        return any(fnmatch(name, p.rstrip("/")) for p in patterns if not p.startswith("!"))

    for needed in ("pyproject.toml", "README.md", "common", "gateway", "router"):
        assert not ignored(needed), f".dockerignore drops {needed}, which the build needs"
    for dropped in (".git", ".env", "tests", ".venv"):
        assert ignored(dropped), dropped


# --------------------------------------------------------------------------- Compose


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    with COMPOSE_FILE.open(encoding="utf-8") as fh:
        data: dict[str, Any] = yaml.safe_load(fh)
    return data


def test_compose_matches_compose_spec_schema(compose: dict[str, Any]) -> None:
    schema = json.loads((SCHEMAS / "compose-spec.json").read_text(encoding="utf-8"))
    jsonschema.Draft202012Validator.check_schema(schema)
    errors = _schema_errors(jsonschema.Draft202012Validator(schema), compose)
    assert not errors, "\n".join(errors)


def test_compose_schema_catches_mistakes(compose: dict[str, Any]) -> None:
    """The vendored schema is strict enough to be worth running."""
    validator = jsonschema.Draft202012Validator(
        json.loads((SCHEMAS / "compose-spec.json").read_text(encoding="utf-8"))
    )
    broken = copy.deepcopy(compose)
    broken["services"]["gateway-1"]["depends_on"]["migrate"]["condition"] = "finished"
    broken["services"]["router-1"]["enviroment"] = {}
    assert len(_schema_errors(validator, broken)) >= 2


def test_compose_cluster_topology(compose: dict[str, Any]) -> None:
    services = compose["services"]
    gateways = sorted(s for s in services if s.startswith("gateway-"))
    routers = sorted(s for s in services if s.startswith("router-"))
    assert gateways == ["gateway-1", "gateway-2", "gateway-3"]
    assert routers == ["router-1", "router-2"]
    assert services["redis"]["image"].startswith("redis:7")
    assert services["postgres"]["image"].startswith("postgres:16")
    assert services["postgres"]["healthcheck"]["test"]
    assert services["redis"]["healthcheck"]["test"]

    migrate = services["migrate"]
    assert migrate["command"] == ["migrate"]
    assert migrate["restart"] == "no"
    assert migrate["depends_on"]["postgres"]["condition"] == "service_healthy"

    for name in gateways + routers:
        svc = services[name]
        role = name.split("-")[0]
        assert svc["command"] == [role]
        deps = svc["depends_on"]
        assert deps["migrate"]["condition"] == "service_completed_successfully"
        assert "redis" in deps
        grace = int(str(svc.get("stop_grace_period", "10s")).rstrip("s"))
        assert grace > DEFAULT_DRAIN_SECONDS, f"{name}: stop_grace_period below the drain"

    app_services = ["migrate", *gateways, *routers]
    images = {services[s]["image"] for s in app_services}
    assert len(images) == 1

    lb = services["lb"]
    assert lb["image"].startswith(("nginx:1.27", "haproxy:"))
    assert "8081:8081" in lb["ports"]
    assert set(gateways) <= set(lb["depends_on"])
    mounted = [v.split(":")[0] for v in lb["volumes"]]
    assert "./deploy/nginx.conf" in mounted
    assert not any("8081" in str(p) for s in app_services for p in services[s].get("ports", []))


def test_compose_environment(compose: dict[str, Any]) -> None:
    services = compose["services"]
    pg_env = services["postgres"]["environment"]
    node_ids = set()
    for name, svc in services.items():
        if not svc.get("image", "").startswith("${ARA_IMAGE"):
            continue
        env = svc["environment"]
        assert isinstance(env, dict), f"{name}: environment as a mapping"
        unknown = set(env) - KNOWN_ENV
        assert not unknown, f"{name}: unknown env names {unknown}"
        assert env["REDIS_URL"] == "redis://redis:6379/0"
        assert env["DATABASE_URL"] == "postgresql://ara:ara@postgres:5432/ara"
        assert env["RUN_MODE"] == "production"
        assert str(env["ROUTER_PARTITIONS"]) == "64"
        for key in ("API_KEY", "JWT_SECRET"):
            assert re.fullmatch(rf"\$\{{{key}:\?[^}}]+\}}", env[key]), f"{name}: {key} required"
        assert env["NODE_ID"] == name
        node_ids.add(env["NODE_ID"])
        for value in env.values():
            assert isinstance(value, str), f"{name}: quote env values ({value!r})"

    url = urlparse("postgresql://ara:ara@postgres:5432/ara")
    assert (url.username, url.password, url.path.lstrip("/")) == (
        pg_env["POSTGRES_USER"],
        pg_env["POSTGRES_PASSWORD"],
        pg_env["POSTGRES_DB"],
    )
    assert len(node_ids) == 6


# ----------------------------------------------------------------------------- nginx


def _parse_nginx(text: str) -> list[tuple[list[str], Any]]:
    text = re.sub(r"(?m)^\s*#.*$", "", text)
    tokens = re.findall(r'"(?:[^"\\]|\\.)*"|\'[^\']*\'|[{};]|[^\s{};]+', text)

    def block(i: int) -> tuple[list[tuple[list[str], Any]], int]:
        items: list[tuple[list[str], Any]] = []
        cur: list[str] = []
        while i < len(tokens):
            tok = tokens[i]
            if tok == ";":
                items.append((cur, None))
                cur = []
            elif tok == "{":
                children, i = block(i + 1)
                items.append((cur, children))
                cur = []
            elif tok == "}":
                assert not cur, f"missing ';' before '}}' after {cur}"
                return items, i
            else:
                cur.append(tok)
            i += 1
        assert not cur, f"unterminated directive {cur}"
        return items, i

    tree, end = block(0)
    assert end >= len(tokens), "unbalanced braces in nginx.conf"
    return tree


def _directives(block: list[tuple[list[str], Any]], name: str) -> list[tuple[list[str], Any]]:
    return [(args, children) for args, children in block if args and args[0] == name]


def _seconds(value: str) -> int:
    match = re.fullmatch(r"(\d+)(s|m|h)?", value)
    assert match, value
    return int(match.group(1)) * {"s": 1, None: 1, "m": 60, "h": 3600}[match.group(2)]


def test_nginx_load_balancer(compose: dict[str, Any]) -> None:
    tree = _parse_nginx(NGINX_CONF.read_text(encoding="utf-8"))
    ((_, http),) = _directives(tree, "http")
    ((up_args, upstream),) = _directives(http, "upstream")
    servers = [args[1] for args, _ in _directives(upstream, "server")]
    gateways = sorted(s for s in compose["services"] if s.startswith("gateway-"))
    assert servers == [f"{g}:8081" for g in gateways]
    if any("resolve" in args for args, _ in _directives(upstream, "server")):
        assert _directives(http, "resolver") and _directives(upstream, "zone")
    ((_, server),) = _directives(http, "server")
    assert ["listen", "8081"] in [args for args, _ in server]
    locations = {args[-1]: children for args, children in _directives(server, "location")}

    def setting(loc: str, name: str) -> list[str]:
        found = [a[1:] for a, _ in _directives(locations[loc], name)]
        found += [a[1:] for a, _ in _directives(server, name)]  # inherited
        return found[0] if found else []

    for loc in ("/ws", "/sse"):
        assert setting(loc, "proxy_pass") == [f"http://{up_args[1]}"]
        assert setting(loc, "proxy_buffering") == ["off"]
        assert _seconds(setting(loc, "proxy_read_timeout")[0]) >= 600
        assert setting(loc, "proxy_http_version") == ["1.1"]
    headers = [a[1:] for a, _ in _directives(locations["/ws"], "proxy_set_header")]
    assert ["Upgrade", "$http_upgrade"] in headers
    assert ["Connection", "$connection_upgrade"] in headers
    assert _directives(http, "map"), "map $http_upgrade $connection_upgrade missing"
    assert setting("/", "proxy_pass") == [f"http://{up_args[1]}"]


# -------------------------------------------------------------------------------- k8s


def _k8s_files() -> list[Path]:
    return sorted(p for p in K8S_DIR.glob("*.yaml") if p.name != "kustomization.yaml")


@pytest.fixture(scope="module")
def k8s_docs() -> list[dict[str, Any]]:
    return [doc for path in _k8s_files() for doc in _load_yaml_docs(path)]


def test_kustomization_lists_every_manifest() -> None:
    (kust,) = _load_yaml_docs(K8S_DIR / "kustomization.yaml")
    assert kust["kind"] == "Kustomization"
    assert kust["namespace"] == NAMESPACE
    assert sorted(kust["resources"]) == sorted(p.name for p in _k8s_files())
    assert not any(r.startswith("optional") for r in kust["resources"])


@pytest.mark.parametrize(
    "path",
    [*_k8s_files(), *sorted((K8S_DIR / "optional").glob("*.yaml"))],
    ids=lambda p: str(p.relative_to(K8S_DIR)),
)
def test_k8s_documents_deserialize_strictly(path: Path) -> None:
    docs = _load_yaml_docs(path)
    assert docs, f"{path} is empty"
    for doc in docs:
        validate_k8s_object(doc)
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") == NAMESPACE, f"{path}: namespace"


def test_strict_validation_catches_typos(k8s_docs: list[dict[str, Any]]) -> None:
    gw = copy.deepcopy(_one(k8s_docs, "Deployment", "gateway"))
    gw["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(AssertionError, match="readinesProbe: unknown field"):
        validate_k8s_object(gw)
    gw = copy.deepcopy(_one(k8s_docs, "Deployment", "gateway"))
    gw["spec"]["template"]["spec"]["containers"][0]["env"][1]["value"] = 8081
    with pytest.raises(AssertionError, match="V1Deployment model"):
        validate_k8s_object(gw)


def test_k8s_cluster_invariants(k8s_docs: list[dict[str, Any]]) -> None:
    check_cluster(k8s_docs, hpa=True)
    assert _one(k8s_docs, "Namespace")["metadata"]["name"] == NAMESPACE
    gw = _one(k8s_docs, "Deployment", "gateway")
    assert gw["spec"]["replicas"] == 3
    assert _one(k8s_docs, "Deployment", "router")["spec"]["replicas"] == 2
    assert _one(k8s_docs, "Service", "gateway")["spec"]["ports"][0]["port"] == 80
    (secret,) = _find(k8s_docs, "Secret")
    assert secret["metadata"]["name"] == "ara-secrets"
    for key in ("API_KEY", "JWT_SECRET", "DATABASE_URL"):
        assert "REPLACE_ME" in secret["stringData"][key], f"{key}: mark the placeholder"
    (cm,) = _find(k8s_docs, "ConfigMap")
    assert cm["metadata"]["name"] == "ara-config"
    assert cm["data"]["WEBSOCKET_COMPRESSION"] == "false"


def test_k8s_optional_ingress_is_streaming_friendly(k8s_docs: list[dict[str, Any]]) -> None:
    (ingress,) = _load_yaml_docs(K8S_DIR / "optional" / "ingress.yaml")
    notes = ingress["metadata"]["annotations"]
    assert int(notes["nginx.ingress.kubernetes.io/proxy-read-timeout"]) >= 600
    assert int(notes["nginx.ingress.kubernetes.io/proxy-send-timeout"]) >= 600
    assert notes["nginx.ingress.kubernetes.io/proxy-buffering"] == "off"
    svc = _one(k8s_docs, "Service", "gateway")
    for rule in ingress["spec"]["rules"]:
        for p in rule["http"]["paths"]:
            assert p["backend"]["service"]["name"] == svc["metadata"]["name"]
    (sm,) = _load_yaml_docs(K8S_DIR / "optional" / "servicemonitor.yaml")
    for service in _find(k8s_docs, "Service"):
        assert _selects(sm["spec"]["selector"]["matchLabels"], service["metadata"]["labels"])


# ------------------------------------------------------------------------------ helm


@pytest.fixture(scope="module")
def chart_values() -> dict[str, Any]:
    with (CHART_DIR / "values.yaml").open(encoding="utf-8") as fh:
        values: dict[str, Any] = yaml.safe_load(fh)
    return values


@pytest.fixture(scope="module")
def values_validator() -> jsonschema.Draft7Validator:
    schema = json.loads((CHART_DIR / "values.schema.json").read_text(encoding="utf-8"))
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


OVERRIDES: dict[str, dict[str, Any]] = {
    "defaults": {},
    "no-hpa+servicemonitor+ingress+existing-secret": {
        "gateway": {"hpa": {"enabled": False}, "replicas": 5},
        "serviceMonitor": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}},
        "ingress": {
            "enabled": True,
            "tls": [{"hosts": ["notify.example.com"], "secretName": "notify-tls"}],
        },
        "secrets": {"existingSecret": "ara-external"},
        "serviceAccount": {"create": False},
    },
    "plain-migrate-job+long-drain": {
        "migrate": {"useHelmHook": False},
        "gateway": {"drainSeconds": 45},
        "secrets": {
            "apiKey": "k" * 20,
            "jwtSecret": "s" * 40,
            "databaseUrl": "postgresql://u:p@db.internal:5432/ara",
            "redisUrl": "rediss://cache.internal:6380/0",
        },
        "image": {"repository": "registry.example.com/ara-notify", "tag": "1.2.3"},
    },
    "no-migrate+no-pdb+no-spread": {
        "migrate": {"enabled": False},
        "gateway": {"pdb": {"enabled": False}, "topologySpread": {"enabled": False}},
        "router": {"pdb": {"enabled": False}, "replicas": 3},
    },
}

BAD_VALUES: dict[str, dict[str, Any]] = {
    "typo-in-key": {"gateway": {"hpa": {"enabeld": True}}},
    "short-api-key": {"secrets": {"apiKey": "short"}},
    "node-id-in-config": {"config": {"NODE_ID": "x"}},
    "bad-guarantee": {"config": {"DELIVERY_GUARANTEE": "exactly-once"}},
    "root-pod": {"podSecurityContext": {"runAsNonRoot": False}},
}


def test_chart_metadata() -> None:
    (chart,) = _load_yaml_docs(CHART_DIR / "Chart.yaml")
    assert chart["apiVersion"] == "v2"
    assert chart["name"] == CHART_DIR.name
    assert re.fullmatch(r"\d+\.\d+\.\d+", chart["version"])
    with (ROOT / "pyproject.toml").open("rb") as fh:
        project_version = tomllib.load(fh)["project"]["version"]
    assert chart["appVersion"] == project_version, "appVersion is the default image tag"
    for name in ("_helpers.tpl", "NOTES.txt"):
        assert (CHART_DIR / "templates" / name).is_file()


def test_chart_values_match_schema(
    chart_values: dict[str, Any], values_validator: jsonschema.Draft7Validator
) -> None:
    assert not _schema_errors(values_validator, chart_values)
    for override in OVERRIDES.values():
        merged = _deep_merge(chart_values, override)
        assert not _schema_errors(values_validator, merged), override


@pytest.mark.parametrize("name", sorted(BAD_VALUES))
def test_chart_schema_rejects_bad_values(
    name: str, chart_values: dict[str, Any], values_validator: jsonschema.Draft7Validator
) -> None:
    assert _schema_errors(values_validator, _deep_merge(chart_values, BAD_VALUES[name]))


def test_chart_defaults_mirror_k8s_manifests(
    chart_values: dict[str, Any], k8s_docs: list[dict[str, Any]]
) -> None:
    (cm,) = _find(k8s_docs, "ConfigMap")
    drain = int(cm["data"].pop("DRAIN_TIMEOUT_SECONDS"))
    assert chart_values["config"] == cm["data"]
    assert chart_values["gateway"]["drainSeconds"] == drain
    gw = _one(k8s_docs, "Deployment", "gateway")
    gw_spec = gw["spec"]["template"]["spec"]
    g = chart_values["gateway"]
    assert (
        g["preStopSleepSeconds"] + g["drainSeconds"] + g["terminationMarginSeconds"]
        == gw_spec["terminationGracePeriodSeconds"]
    )
    assert g["replicas"] == gw["spec"]["replicas"]
    assert g["resources"] == gw_spec["containers"][0]["resources"]
    router = _one(k8s_docs, "Deployment", "router")
    assert chart_values["router"]["replicas"] == router["spec"]["replicas"]
    assert (
        chart_values["router"]["resources"]
        == (router["spec"]["template"]["spec"]["containers"][0]["resources"])
    )


def test_chart_templates_reference_existing_values(chart_values: dict[str, Any]) -> None:
    missing = []
    for tpl in sorted((CHART_DIR / "templates").iterdir()):
        text = tpl.read_text(encoding="utf-8")
        for ref in sorted(set(re.findall(r"\.Values((?:\.[A-Za-z_][A-Za-z0-9_]*)+)", text))):
            node: Any = chart_values
            for part in ref.strip(".").split("."):
                if not isinstance(node, dict) or part not in node:
                    missing.append(f"{tpl.name}: .Values{ref}")
                    break
                node = node[part]
    assert not missing, missing


# -- rendering


def _helm_binary() -> str | None:
    return os.environ.get("HELM_BIN") or shutil.which("helm")


HAVE_HELM_PYTHON = importlib.util.find_spec("helm_python") is not None
NO_RENDERER = (
    "no helm renderer: install a `helm` binary (or point HELM_BIN at one), or the PyPI "
    "package helm-python-sdk; Debian 12 does not package helm"
)
needs_renderer = pytest.mark.skipif(
    _helm_binary() is None and not HAVE_HELM_PYTHON, reason=NO_RENDERER
)


class RenderError(Exception):
    pass


def render_chart(values: dict[str, Any], tmp_path: Path) -> tuple[list[dict], str | None]:
    """Render the chart; returns the documents and NOTES.txt (None with the binary)."""
    helm = _helm_binary()
    if helm:
        values_file = tmp_path / "values.yaml"
        values_file.write_text(yaml.safe_dump(values), encoding="utf-8")
        proc = subprocess.run(
            [
                helm,
                "template",
                RELEASE,
                str(CHART_DIR),
                "--namespace",
                NAMESPACE,
                "--values",
                str(values_file),
                "--kube-version",
                "1.30.0",
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if proc.returncode:
            raise RenderError(proc.stderr)
        return [d for d in yaml.safe_load_all(proc.stdout) if d], None

    import helm_python

    with helm_python.Chart.load(str(CHART_DIR)) as chart:
        try:
            chart.validate_schema(values)
            rendered = chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
        except helm_python.HelmError as exc:
            raise RenderError(str(exc)) from exc
    notes = None
    docs: list[dict] = []
    for path, text in sorted(rendered.items()):
        if path.endswith("NOTES.txt"):
            notes = text
        elif path.endswith((".yaml", ".yml")):
            docs.extend(d for d in yaml.safe_load_all(text) if d)
    return docs, notes


@needs_renderer
def test_helm_lint() -> None:
    helm = _helm_binary()
    if helm:
        proc = subprocess.run(
            [helm, "lint", str(CHART_DIR)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
    else:
        import helm_python

        result = helm_python.lint(str(CHART_DIR))
        assert not result["errors"], result
        assert all(m["severity"] <= 1 for m in result["messages"]), result["messages"]


def _hooks(doc: dict[str, Any]) -> set[str]:
    hook = doc["metadata"].get("annotations", {}).get("helm.sh/hook", "")
    return {h for h in hook.split(",") if h}


@needs_renderer
@pytest.mark.parametrize("case", sorted(OVERRIDES))
def test_helm_render(case: str, tmp_path: Path) -> None:
    override = OVERRIDES[case]
    docs, notes = render_chart(override, tmp_path)
    hpa = override.get("gateway", {}).get("hpa", {}).get("enabled", True)
    spread = override.get("gateway", {}).get("topologySpread", {}).get("enabled", True)
    check_cluster(docs, hpa=hpa, spread=spread)

    names = [(d["kind"], d["metadata"]["name"]) for d in docs]
    assert len(names) == len(set(names)), f"duplicate objects: {names}"
    for doc in docs:
        assert len(doc["metadata"]["name"]) <= 63
        assert "namespace" not in doc["metadata"], "let helm place objects (--namespace)"

    gw = _one(docs, "Deployment", "gateway")
    gw_pod = gw["spec"]["template"]["spec"]
    (gw_container,) = gw_pod["containers"]
    env = _container_env(gw_container)
    drain = override.get("gateway", {}).get("drainSeconds", 20)
    assert env["DRAIN_TIMEOUT_SECONDS"]["value"] == str(drain)
    assert gw_pod["terminationGracePeriodSeconds"] == 5 + drain + 15
    if hpa:
        assert "replicas" not in gw["spec"], "the HPA owns the replica count"
    else:
        assert gw["spec"]["replicas"] == override["gateway"]["replicas"]

    existing = override.get("secrets", {}).get("existingSecret")
    secrets = _find(docs, "Secret")
    jobs = _find(docs, "Job")
    secret_refs = {
        r["secretRef"]["name"]
        for d in _find(docs, "Deployment") + jobs
        for r in d["spec"]["template"]["spec"]["containers"][0]["envFrom"]
        if "secretRef" in r
    }
    if existing:
        assert not secrets
        assert secret_refs == {existing}
    else:
        assert secret_refs <= {s["metadata"]["name"] for s in secrets}

    migrate = override.get("migrate", {})
    if migrate.get("enabled", True):
        (job,) = jobs
        hooked = migrate.get("useHelmHook", True)
        assert _hooks(job) == ({"pre-install", "pre-upgrade"} if hooked else set())
        job_env = _container_env(job["spec"]["template"]["spec"]["containers"][0])
        assert job_env["RUN_MODE"]["value"] == "production"
        if hooked and not existing:
            (job_secret,) = [s for s in secrets if _hooks(s)]
            weight = int(job_secret["metadata"]["annotations"]["helm.sh/hook-weight"])
            assert weight < int(job["metadata"]["annotations"]["helm.sh/hook-weight"])
        if not hooked:
            assert job["metadata"]["name"].endswith("-migrate-1")
    else:
        assert not jobs

    monitors = _find(docs, "ServiceMonitor")
    ingresses = _find(docs, "Ingress")
    if override.get("serviceMonitor", {}).get("enabled"):
        (sm,) = monitors
        assert sm["metadata"]["labels"]["release"] == "kube-prometheus-stack"
        assert sm["spec"]["namespaceSelector"]["matchNames"] == [NAMESPACE]
        for svc in _find(docs, "Service"):
            assert _selects(sm["spec"]["selector"]["matchLabels"], svc["metadata"]["labels"])
    else:
        assert not monitors
    if override.get("ingress", {}).get("enabled"):
        (ing,) = ingresses
        notes_ = ing["metadata"]["annotations"]
        assert notes_["nginx.ingress.kubernetes.io/proxy-buffering"] == "off"
        backend = ing["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
        assert backend["name"] == _one(docs, "Service", "gateway")["metadata"]["name"]
        assert ing["spec"]["tls"][0]["secretName"] == "notify-tls"
    else:
        assert not ingresses

    pdbs = {_component(d) for d in _find(docs, "PodDisruptionBudget")}
    assert pdbs == {
        role
        for role in ("gateway", "router")
        if override.get(role, {}).get("pdb", {}).get("enabled", True)
    }
    if "image" in override:
        assert gw_container["image"] == "registry.example.com/ara-notify:1.2.3"
    if notes is not None:
        assert "port-forward" in notes and "{{" not in notes


@needs_renderer
@pytest.mark.parametrize("name", ["typo-in-key", "short-api-key"])
def test_helm_render_rejects_bad_values(name: str, tmp_path: Path) -> None:
    with pytest.raises(RenderError):
        render_chart(BAD_VALUES[name], tmp_path)


# ------------------------------------------------------------------------------ docs


def test_operations_doc_covers_every_setting() -> None:
    text = (ROOT / "docs" / "operations.md").read_text(encoding="utf-8")
    missing = sorted(name for name in KNOWN_ENV if f"`{name}`" not in text)
    assert not missing, f"docs/operations.md does not document {missing}"
