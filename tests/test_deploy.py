"""The deployment assets in deploy/ are checked here, since no cluster runs in the tests.

Kubernetes manifests: parsed, checked against schemas of the fields they use (a misspelt
field fails instead of being ignored), and cross-checked: selectors, ports, probes,
volumes, ConfigMap/Secret references, and every container's arguments parsed by the real
``layervault`` argument parser after Kubernetes' ``$(VAR)`` expansion. systemd units: parsed as
INI, and their ``ExecStart`` lines parsed by the same parser after systemd's ``${VAR}`` /
``$VAR`` expansion from the example environment file. The Containerfile: its structure, and
that it copies every source folder the package is built from.
"""

from __future__ import annotations

import configparser
import pathlib
import re
import shlex
import tomllib

import jsonschema
import pytest
import yaml

from layervault.cli import build_parser
from layervault.proto import agent_pb2, coordinator_pb2

ROOT = pathlib.Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "kubernetes"
SYSTEMD = ROOT / "deploy" / "systemd"
CONTAINERFILE = ROOT / "deploy" / "container" / "Containerfile"
HEALTH_SERVICES = {"agent": agent_pb2.DESCRIPTOR.services_by_name["Agent"].full_name,
                   "coordinator": coordinator_pb2.DESCRIPTOR.services_by_name["Coordinator"].full_name}

# -- schemas of the fields the manifests use ---------------------------------------------------


def _obj(required: list[str] | None = None, closed: bool = True, **props: dict) -> dict:
    schema: dict = {"type": "object", "properties": props, "required": required or []}
    if closed:
        schema["additionalProperties"] = False
    return schema


STR, INT, BOOL = {"type": "string"}, {"type": "integer"}, {"type": "boolean"}
PORT = {"type": "integer", "minimum": 1, "maximum": 65535}
LABELS = {"type": "object", "additionalProperties": {"type": "string"}}
QUANTITY = {"type": "string", "pattern": r"^[0-9.]+(m|Ki|Mi|Gi|Ti)?$"}
METADATA = _obj(["name"], name=STR, labels=LABELS, annotations=LABELS)
PROBE = _obj(["grpc"], grpc=_obj(["port", "service"], port=PORT, service=STR), periodSeconds=INT,
             failureThreshold=INT, initialDelaySeconds=INT, timeoutSeconds=INT)
ENV_FROM = {"type": "array", "items": _obj(configMapRef=_obj(["name"], name=STR), secretRef=_obj(["name"], name=STR))}
ENV = {"type": "array", "items": _obj(["name"], name=STR, value=STR, valueFrom=_obj(
    configMapKeyRef=_obj(["name", "key"], name=STR, key=STR), secretKeyRef=_obj(["name", "key"], name=STR, key=STR)))}
SECURITY_CONTEXT = _obj(runAsNonRoot=BOOL, runAsUser=INT, runAsGroup=INT, allowPrivilegeEscalation=BOOL,
                        readOnlyRootFilesystem=BOOL, capabilities=_obj(drop={"type": "array"}, add={"type": "array"}),
                        supplementalGroups={"type": "array", "items": INT},
                        seccompProfile=_obj(["type"], type={"enum": ["RuntimeDefault", "Localhost"]}))
CONTAINER = _obj(
    ["name", "image"], name=STR, image=STR, imagePullPolicy={"enum": ["Always", "IfNotPresent", "Never"]},
    command={"type": "array", "items": STR}, args={"type": "array", "items": STR}, env=ENV, envFrom=ENV_FROM,
    ports={"type": "array", "items": _obj(["containerPort"], name=STR, containerPort=PORT)},
    startupProbe=PROBE, readinessProbe=PROBE, livenessProbe=PROBE, securityContext=SECURITY_CONTEXT,
    resources=_obj(requests=_obj(cpu=QUANTITY, memory=QUANTITY), limits=_obj(cpu=QUANTITY, memory=QUANTITY)),
    volumeMounts={"type": "array", "items": _obj(["name", "mountPath"], name=STR, mountPath=STR, readOnly=BOOL)})
VOLUME = _obj(["name"], name=STR,
              hostPath=_obj(["path"], path=STR, type={"enum": ["Directory", "DirectoryOrCreate", "Socket", "File"]}),
              emptyDir=_obj(medium={"enum": ["", "Memory"]}, sizeLimit=QUANTITY),
              configMap=_obj(["name"], name=STR), secret=_obj(["secretName"], secretName=STR))
POD_SPEC = _obj(["containers"], containers={"type": "array", "minItems": 1, "items": CONTAINER},
                initContainers={"type": "array", "items": CONTAINER}, volumes={"type": "array", "items": VOLUME},
                securityContext=SECURITY_CONTEXT, terminationGracePeriodSeconds=INT, nodeSelector=LABELS)
TEMPLATE = _obj(["metadata", "spec"], metadata=_obj(labels=LABELS, annotations=LABELS), spec=POD_SPEC)
SELECTOR = _obj(["matchLabels"], matchLabels=LABELS)
NETWORK_PEER = _obj(podSelector=SELECTOR)
SCHEMAS = {
    ("v1", "ConfigMap"): _obj(["apiVersion", "kind", "metadata", "data"], apiVersion=STR, kind=STR, metadata=METADATA,
                              data={"type": "object", "additionalProperties": STR}),
    ("v1", "Secret"): _obj(["apiVersion", "kind", "metadata", "stringData"], apiVersion=STR, kind=STR, metadata=METADATA,
                           type={"const": "Opaque"}, stringData={"type": "object", "additionalProperties": STR}),
    ("v1", "Service"): _obj(["apiVersion", "kind", "metadata", "spec"], apiVersion=STR, kind=STR, metadata=METADATA,
                            spec=_obj(["selector", "ports"], selector=LABELS, ports={"type": "array", "items": _obj(
                                ["name", "port", "targetPort"], name=STR, port=PORT, targetPort=STR)})),
    ("v1", "Pod"): _obj(["apiVersion", "kind", "metadata", "spec"], apiVersion=STR, kind=STR, metadata=METADATA, spec=POD_SPEC),
    ("apps/v1", "Deployment"): _obj(["apiVersion", "kind", "metadata", "spec"], apiVersion=STR, kind=STR, metadata=METADATA,
                                    spec=_obj(["selector", "template"], replicas={"const": 1}, selector=SELECTOR,
                                              template=TEMPLATE, strategy=_obj(type={"const": "Recreate"}))),
    ("apps/v1", "DaemonSet"): _obj(["apiVersion", "kind", "metadata", "spec"], apiVersion=STR, kind=STR, metadata=METADATA,
                                   spec=_obj(["selector", "template"], selector=SELECTOR, template=TEMPLATE,
                                             updateStrategy=_obj(type={"const": "RollingUpdate"}, rollingUpdate=_obj(
                                                 maxUnavailable=INT)))),
    ("networking.k8s.io/v1", "NetworkPolicy"): _obj(
        ["apiVersion", "kind", "metadata", "spec"], apiVersion=STR, kind=STR, metadata=METADATA,
        spec=_obj(["podSelector"], podSelector=SELECTOR, policyTypes={"type": "array"}, ingress={"type": "array", "items": _obj(
            **{"from": {"type": "array", "items": NETWORK_PEER}},
            ports={"type": "array", "items": _obj(["port"], port=PORT, protocol={"enum": ["TCP"]})})})),
    ("kustomize.config.k8s.io/v1beta1", "Kustomization"): _obj(
        ["apiVersion", "kind", "resources"], apiVersion=STR, kind=STR, resources={"type": "array", "items": STR},
        labels={"type": "array"}, images={"type": "array", "items": _obj(["name"], name=STR, newTag=STR)}),
}

# -- loading ------------------------------------------------------------------------------------


def _manifests() -> list[tuple[str, dict]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        docs += [(path.name, doc) for doc in yaml.safe_load_all(path.read_text()) if doc is not None]
    return docs


def _of_kind(kind: str) -> list[dict]:
    return [doc for _, doc in _manifests() if doc["kind"] == kind]


def _workloads() -> list[dict]:
    return _of_kind("Deployment") + _of_kind("DaemonSet")


def _pod_specs() -> list[tuple[str, dict, dict]]:
    """(name, pod labels, pod spec) of every workload and example pod."""
    specs = [(w["metadata"]["name"], w["spec"]["template"]["metadata"]["labels"], w["spec"]["template"]["spec"])
             for w in _workloads()]
    return specs + [(p["metadata"]["name"], p["metadata"].get("labels", {}), p["spec"]) for p in _of_kind("Pod")]


def _env(container: dict) -> dict[str, str]:
    """The container's environment as Kubernetes builds it: envFrom first, then env."""
    config_maps = {c["metadata"]["name"]: c["data"] for c in _of_kind("ConfigMap")}
    secrets = {s["metadata"]["name"]: s["stringData"] for s in _of_kind("Secret")}
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            env |= config_maps[source["configMapRef"]["name"]]
        else:
            env |= secrets[source["secretRef"]["name"]]
    for var in container.get("env", []):
        ref = var.get("valueFrom", {})
        if "configMapKeyRef" in ref:
            env[var["name"]] = config_maps[ref["configMapKeyRef"]["name"]][ref["configMapKeyRef"]["key"]]
        elif "secretKeyRef" in ref:
            env[var["name"]] = secrets[ref["secretKeyRef"]["name"]][ref["secretKeyRef"]["key"]]
        else:
            env[var["name"]] = var["value"]
    return env


def _expanded_args(container: dict) -> list[str]:
    env = _env(container)

    def value(match: re.Match) -> str:
        assert match[1] in env, f"container {container['name']}: $({match[1]}) is defined nowhere"
        return env[match[1]]

    return [re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", value, arg) for arg in container.get("args", [])]


def _layervault_containers() -> list[tuple[dict, object]]:
    """(container, its parsed layervault arguments) for each container that runs layervault."""
    out = []
    for _, _, spec in _pod_specs():
        for container in spec["containers"]:
            if container["image"].split(":")[0] == "layervault":
                out.append((container, build_parser().parse_args(_expanded_args(container))))
    return out


def _mebibytes(quantity: str) -> float:
    number, unit = re.fullmatch(r"([0-9.]+)(Ki|Mi|Gi|Ti)?", quantity).groups()
    return float(number) * {"Ki": 1 / 1024, "Mi": 1, "Gi": 1024, "Ti": 1024 ** 2, None: 1 / 2 ** 20}[unit]


# -- Kubernetes -------------------------------------------------------------------------------------


def test_every_manifest_matches_the_schema_of_its_kind():
    docs = _manifests()
    assert {doc["kind"] for _, doc in docs} >= {"ConfigMap", "Secret", "Service", "Deployment", "DaemonSet", "Pod"}
    for name, doc in docs:
        schema = SCHEMAS.get((doc.get("apiVersion"), doc.get("kind")))
        assert schema is not None, f"{name}: unexpected apiVersion/kind {doc.get('apiVersion')}/{doc.get('kind')}"
        jsonschema.validate(doc, schema)
        assert "namespace" not in doc.get("metadata", {}), f"{name}: manifests stay namespace-agnostic"


def test_the_kustomization_applies_every_manifest_but_the_examples():
    (kustomization,) = _of_kind("Kustomization")
    applied = set(kustomization["resources"])
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert applied == {n for n in on_disk if not n.endswith(".example.yaml")}
    images = {i["name"] for i in kustomization["images"]}
    assert {c["image"].split(":")[0] for c, _ in _layervault_containers()} <= images


def test_selectors_match_the_pods_they_select():
    for workload in _workloads():
        labels = workload["spec"]["template"]["metadata"]["labels"]
        assert workload["spec"]["selector"]["matchLabels"].items() <= labels.items(), workload["metadata"]["name"]
    pods = [labels for _, labels, _ in _pod_specs()]
    for service in _of_kind("Service"):
        assert any(service["spec"]["selector"].items() <= labels.items() for labels in pods), service["metadata"]["name"]
    for policy in _of_kind("NetworkPolicy"):
        assert any(policy["spec"]["podSelector"]["matchLabels"].items() <= labels.items() for labels in pods)


def test_probes_services_and_policies_use_ports_the_containers_open():
    specs = _pod_specs()
    for container, args in _layervault_containers():
        role = args.command
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports["grpc"] == args.port and ports["metrics"] == args.metrics_port, container["name"]
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            grpc = container[probe]["grpc"]
            assert (grpc["port"], grpc["service"]) == (args.port, HEALTH_SERVICES[role]), f"{container['name']} {probe}"
    for service in _of_kind("Service"):
        (selected,) = [spec for _, labels, spec in specs if service["spec"]["selector"].items() <= labels.items()]
        names = {p["name"] for c in selected["containers"] for p in c.get("ports", [])}
        assert {p["targetPort"] for p in service["spec"]["ports"]} <= names
    for policy in _of_kind("NetworkPolicy"):
        (selected,) = [spec for _, labels, spec in specs if policy["spec"]["podSelector"]["matchLabels"].items() <= labels.items()]
        opened = {p["containerPort"] for c in selected["containers"] for p in c.get("ports", [])}
        assert {p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]} <= opened


def test_container_arguments_are_accepted_by_the_layervault_cli():
    parsed = {args.command: (container, args) for container, args in _layervault_containers()}
    assert set(parsed) == {"agent", "coordinator"}
    (service,) = [s for s in _of_kind("Service") if s["metadata"]["name"] == "layervault-coordinator"]
    agent_container, agent = parsed["agent"]
    host, port = agent.coordinator.rsplit(":", 1)
    assert (host, int(port)) == (service["metadata"]["name"], service["spec"]["ports"][0]["port"])
    assert parsed["coordinator"][1].port == service["spec"]["ports"][0]["port"]
    mounts = {m["mountPath"] for m in agent_container["volumeMounts"]}
    assert str(pathlib.PurePath(agent.socket).parent) in mounts and "/dev/shm" in mounts
    assert any(agent.state_dir.startswith(m + "/") for m in mounts)
    limit = _mebibytes(agent_container["resources"]["limits"]["memory"])
    assert limit >= agent.staging_mib + agent.cache_mib + 512, "the memory limit must hold staging pool + cache"
    assert agent_container["securityContext"]["readOnlyRootFilesystem"] and "/tmp" in mounts


def test_volumes_and_config_references_exist():
    config_maps = {c["metadata"]["name"]: c["data"] for c in _of_kind("ConfigMap")}
    secrets = {s["metadata"]["name"]: s["stringData"] for s in _of_kind("Secret")}
    for name, _, spec in _pod_specs():
        volumes = {v["name"] for v in spec.get("volumes", [])}
        for container in spec["containers"] + spec.get("initContainers", []):
            for mount in container.get("volumeMounts", []):
                assert mount["name"] in volumes, f"{name}/{container['name']}: no volume {mount['name']!r}"
            for source in container.get("envFrom", []):
                if "configMapRef" in source:
                    assert source["configMapRef"]["name"] in config_maps
                else:
                    assert source["secretRef"]["name"] in secrets
            _env(container)  # every configMapKeyRef/secretKeyRef resolves
    assert set(secrets["layervault-s3"]) == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
    assert not any(k.startswith("AWS_SECRET") for data in config_maps.values() for k in data), "credentials go in the Secret"


def test_the_example_training_pod_reaches_the_agent_of_its_node():
    (_, agent), = [(c, a) for c, a in _layervault_containers() if a.command == "agent"]
    (daemonset,) = _of_kind("DaemonSet")
    (pod,) = _of_kind("Pod")
    host_paths = lambda spec: {m["mountPath"]: v["hostPath"]["path"]  # noqa: E731
                               for c in spec["containers"] for m in c["volumeMounts"]
                               for v in spec["volumes"] if v["name"] == m["name"] and "hostPath" in v}
    agent_paths, rank_paths = host_paths(daemonset["spec"]["template"]["spec"]), host_paths(pod["spec"])
    socket_dir = str(pathlib.PurePath(agent.socket).parent)
    rank_env = _env(pod["spec"]["containers"][0])
    rank_socket = rank_env["LAYERVAULT_AGENT"].removeprefix("unix://")
    assert rank_paths[str(pathlib.PurePath(rank_socket).parent)] == agent_paths[socket_dir]
    assert pathlib.PurePath(rank_socket).name == pathlib.PurePath(agent.socket).name
    assert rank_paths["/dev/shm"] == agent_paths["/dev/shm"]   # the staging pool is a file there
    assert int(agent.socket_group) in pod["spec"]["securityContext"]["supplementalGroups"]
    assert not any(k.startswith("AWS_") for k in rank_env), "ranks never hold storage credentials"


# -- systemd ------------------------------------------------------------------------------------------


def _env_file() -> dict[str, str]:
    env = {}
    for line in (SYSTEMD / "layervault.env.example").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, value = line.split("=", 1)
            env[name.strip()] = value
    return env


def _systemd_argv(command: str, env: dict[str, str]) -> list[str]:
    """systemd's expansion: ``${VAR}`` stays one word, a lone ``$VAR`` splits at whitespace."""
    argv: list[str] = []
    for word in shlex.split(command):
        lone = re.fullmatch(r"\$([A-Za-z_][A-Za-z0-9_]*)", word)
        if lone:
            assert lone[1] in env, f"${lone[1]} is not in layervault.env.example"
            argv += env[lone[1]].split()
            continue
        for name in re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", word):
            assert name in env, f"${{{name}}} is not in layervault.env.example"
        argv.append(re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", lambda m: env[m[1]], word))
    return argv


@pytest.mark.parametrize("role", ["agent", "coordinator"])
def test_systemd_unit_parses_and_its_command_is_accepted(role):
    unit = configparser.ConfigParser(interpolation=None, strict=True)
    unit.optionxform = str  # systemd keys are case-sensitive
    unit.read_string((SYSTEMD / f"layervault-{role}.service").read_text())
    assert set(unit.sections()) == {"Unit", "Service", "Install"}
    service = unit["Service"]
    assert service["EnvironmentFile"] == "/etc/layervault/layervault.env"
    assert service["User"] != "root" and service["NoNewPrivileges"] == "yes" and service["ProtectSystem"] == "strict"
    argv = _systemd_argv(service["ExecStart"], _env_file())
    assert argv[0].endswith("/layervault")
    args = build_parser().parse_args(argv[1:])
    assert args.command == role
    assert float(service["TimeoutStopSec"]) > args.grace, "systemd must not SIGKILL before --grace ends"
    assert unit["Install"]["WantedBy"] == "multi-user.target"
    if role == "agent":
        assert args.socket == f"/run/{service['RuntimeDirectory']}/agent.sock"
        assert args.state_dir.startswith(f"/var/lib/{service['StateDirectory']}/")
        assert "/dev/shm" in service["ReadWritePaths"].split()
        assert not {"PrivateDevices", "PrivateIPC", "RemoveIPC"} & set(service), "ranks must see the pool in /dev/shm"
        assert args.socket_group == service["Group"]
    else:
        assert args.port == int(_env_file()["LAYERVAULT_COORDINATOR_PORT"])
    assert args.tls_cert and args.tls_key, "the example environment turns TLS on"


def test_every_variable_of_the_environment_file_is_used():
    env = _env_file()
    commands = " ".join((SYSTEMD / f"layervault-{r}.service").read_text() for r in ("agent", "coordinator"))
    sources = " ".join(p.read_text() for d in ("sdk", "agent") for p in (ROOT / d).rglob("*.py"))
    for name in env:
        in_units = re.search(rf"\$\{{{name}\}}|\${name}\b", commands)
        used = in_units or name.startswith("AWS_") or name in sources  # AWS_*: read by boto3
        assert used, f"{name} is set in layervault.env.example but nothing reads it"


# -- container ------------------------------------------------------------------------------------------


def test_containerfile_builds_the_package_and_runs_it_unprivileged():
    lines = [line.strip() for line in CONTAINERFILE.read_text().replace("\\\n", " ").splitlines()
             if line.strip() and not line.lstrip().startswith("#")]
    instructions = [line.split(None, 1) for line in lines]
    assert [i for i, _ in instructions].count("FROM") == 2 and instructions[1][0] == "FROM"
    assert all(rest.startswith("python:") for op, rest in instructions if op == "FROM")
    assert instructions[-1] == ["CMD", '["--help"]'] and ["ENTRYPOINT", '["layervault"]'] in instructions
    user = [rest for op, rest in instructions if op == "USER"]
    assert user and not user[-1].startswith(("root", "0")), "the image must not run as root"
    copied = {rest.split()[0] for op, rest in instructions if op == "COPY" and "--from" not in rest}
    for source in copied:
        assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
    package_dirs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"].values()
    assert set(package_dirs) <= copied, "every package folder must reach the build stage"
    assert any(op == "RUN" and "pip wheel" in rest for op, rest in instructions)
    assert any(op == "RUN" and "pip install" in rest and "layervault-*.whl" in rest for op, rest in instructions)
