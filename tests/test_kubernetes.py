"""deploy/kubernetes: the Helm chart, rendered offline by Helm's own SDK (scripts/kubernetes_chart.py).

No cluster runs here. What is checked: every case renders and each object is valid against the Kubernetes
API schemas; the pod carries what docker-compose.yml carries (capabilities, seccomp, environment, vLLM
arguments, ports, grace period, GPUs, the cache and shared memory); the probes and the scraped paths are
ones the gate's own route table answers without waking a suspended server, and, asked of the real gate in
front of the stand-in vLLM with the pod's settings, they neither hold off an idle suspend nor wake the server;
the settings the chart writes parse with the gate's and the library's own parsers; bad values stop the
render with a message naming the fix.
"""

from __future__ import annotations

import copy
import math
import re
import sys
import threading

import helm_python
import pytest
import requests
import yaml

from entrypoint.base.config import load_config
from entrypoint.gate.app import METRICS_PATH, STATUS_PATH
from entrypoint.gate.config import load_gate_config
from entrypoint.gate.paths import PathClass
from tests.test_container import compose_config, service
from tests.test_gate import gate, run_dir, server  # noqa: F401 (fixtures: the real gate, a stand-in vLLM)
from tests.testing import REPO, wait_until

sys.path.insert(0, str(REPO / "scripts"))
import kubernetes_chart  # noqa: E402

CASES = kubernetes_chart.cases()
# The gate's own routes: answered by the gate itself, never forwarded, so never waking anything.
GATE_OWN_PATHS = (STATUS_PATH, METRICS_PATH)


@pytest.fixture(scope="module")
def compose(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """docker-compose.yml's service as `docker-compose config` resolves it, with the defaults (no .env)."""
    empty = tmp_path_factory.mktemp("compose") / "empty.env"
    empty.write_text("")
    return service(compose_config(empty))


@pytest.fixture(scope="module")
def defaults() -> list[dict]:
    return kubernetes_chart.render()


def only(objects: list[dict], kind: str) -> dict:
    found = [obj for obj in objects if obj["kind"] == kind]
    assert len(found) == 1, [obj["kind"] for obj in objects]
    return found[0]


def container(objects: list[dict]) -> dict:
    containers = only(objects, "Deployment")["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def pod_environment(objects: list[dict]) -> dict[str, str | None]:
    """The container's variables: its own `env` (None for one from a Secret) and the ConfigMap's."""
    spec = container(objects)
    config_maps = {obj["metadata"]["name"]: obj["data"] for obj in objects if obj["kind"] == "ConfigMap"}
    environment: dict[str, str | None] = {}
    for source in spec.get("envFrom", []):
        environment.update(config_maps[source["configMapRef"]["name"]])
    for variable in spec.get("env", []):
        environment[variable["name"]] = variable.get("value")
    return environment


def render_error(values: dict) -> str:
    """The message of a render that must fail."""
    with pytest.raises(helm_python.HelmError) as failure:
        kubernetes_chart.render(values)
    return str(failure.value)


def seconds(duration: str) -> int:
    hours, minutes, secs = re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?", duration).groups()
    return int(hours or 0) * 3600 + int(minutes or 0) * 60 + int(secs or 0)


def same_argument(text: str) -> str | float:
    """An argument as vLLM reads it: "0.80" and "0.8" are the same number."""
    try:
        return float(text)
    except ValueError:
        return text


def wakes_the_server(path: str, environment: dict[str, str | None]) -> bool:
    """Whether a GET of `path` on the gate wakes a suspended server, by the gate's own code: its own routes
    never do; a forwarded route does unless the route table, with the pod's GATE_* settings, calls it passive."""
    if path in GATE_OWN_PATHS:
        return False
    gate_config = load_gate_config({name: value for name, value in environment.items() if value is not None})
    return gate_config.routes.classify("GET", path).path_class is not PathClass.PASSIVE


# ---------------------------------------------------------------------------------------------------
# Rendering and the API schemas


@pytest.mark.parametrize("case", CASES)
def test_every_case_renders_and_is_valid_against_the_kubernetes_api_schemas(case: str):
    """Defaults, each overlay and the add-ons render, and kubernetes-validate (strict) finds nothing wrong."""
    objects = kubernetes_chart.render(CASES[case])
    assert {"Deployment", "Service", "ConfigMap", "PersistentVolumeClaim"} <= {obj["kind"] for obj in objects}
    assert kubernetes_chart.problems_of(objects) == []


def test_the_validator_finds_an_unknown_field_and_a_wrong_type(defaults: list[dict]):
    """The schema check is strict: a misspelt field or a string for a port is reported, per Kubernetes version."""
    deployment = copy.deepcopy(only(defaults, "Deployment"))
    deployment["spec"]["template"]["spec"]["containers"][0]["securityContex"] = {}
    service_ = copy.deepcopy(only(defaults, "Service"))
    service_["spec"]["ports"][0]["port"] = "8000"
    problems = kubernetes_chart.problems_of([deployment, service_])
    assert len(problems) == 2 * len(kubernetes_chart.KUBERNETES_VERSIONS)
    assert any("securityContex" in problem for problem in problems)
    assert any("'8000' is not of type 'integer'" in problem for problem in problems)


def test_every_overlay_is_a_case_and_the_two_shapes_are_there():
    """make lint renders every file of overlays/: one model on two GPUs, several models on one node."""
    names = {path.name for path in kubernetes_chart.overlays()}
    assert {"one-model-two-gpus.yaml", "several-models-one-node.yaml"} <= names
    assert {f"overlays/{name}" for name in names} <= set(CASES)


def test_values_schema_settings_come_from_the_settings_tables():
    """values.schema.json's `settings` are the GATE_* and CUDA_TOGGLE_* tables (make docs regenerates them)."""
    assert kubernetes_chart.SCHEMA_FILE.read_text() == kubernetes_chart.schema_text(), (
        "values.schema.json is out of date: run make docs"
    )


# ---------------------------------------------------------------------------------------------------
# The pod carries what the compose file carries


def test_pod_has_the_compose_capabilities_and_seccomp_profile(compose: dict, defaults: list[dict]):
    """SYS_PTRACE and seccomp unconfined, as compose's cap_add and security_opt: cuda-checkpoint needs both."""
    security = container(defaults)["securityContext"]
    assert security["capabilities"]["add"] == compose["cap_add"]
    assert security["capabilities"].get("drop", []) == []
    assert "seccomp=unconfined" in compose["security_opt"]
    assert security["seccompProfile"] == {"type": "Unconfined"}
    assert not security.get("privileged", False)


@pytest.mark.parametrize("case", CASES)
def test_pod_environment_carries_every_compose_variable(compose: dict, case: str):
    """Every variable of the compose file is in the pod (env or ConfigMap), with the compose default's value
    for the checkpoint's fixed ones; HF_TOKEN (unset in compose) comes from an optional Secret."""
    objects = kubernetes_chart.render(CASES[case])
    environment = pod_environment(objects)
    missing = set(compose["environment"]) - set(environment)
    assert not missing, f"the pod lacks {sorted(missing)}"
    settings = set(CASES[case].get("settings", {})) | {"GATE_MODELS"}
    for name, value in compose["environment"].items():
        if value is None:
            secret = next(v for v in container(objects)["env"] if v["name"] == name)["valueFrom"]["secretKeyRef"]
            assert secret["optional"] is True, name
        elif name not in settings:
            assert environment[name] == value, name


def test_pod_runs_the_image_compose_builds(compose: dict, defaults: list[dict]):
    """The default image is the one `make build` tags (pushed elsewhere, set image.repository)."""
    assert container(defaults)["image"] == compose["image"]


def test_vllm_arguments_are_the_compose_command(compose: dict, defaults: list[dict]):
    """The defaults pass vLLM the compose file's command, word for word (numbers compared as numbers)."""
    assert [same_argument(a) for a in container(defaults)["args"]] == [same_argument(a) for a in compose["command"]]


@pytest.mark.parametrize("case", CASES)
def test_gpus_are_the_tensor_parallel_size(case: str):
    """nvidia.com/gpu, requested and limited, equals the --tensor-parallel-size vLLM gets."""
    spec = container(kubernetes_chart.render(CASES[case]))
    tp = spec["args"][spec["args"].index("--tensor-parallel-size") + 1]
    assert spec["resources"]["limits"]["nvidia.com/gpu"] == spec["resources"]["requests"]["nvidia.com/gpu"] == tp


def test_service_exposes_the_gate_port_only(compose: dict, defaults: list[dict]):
    """The Service and the container publish the compose file's one port (the gate's), never vLLM's."""
    compose_targets = {int(port["target"]) for port in compose["ports"]}
    service_ports = {port["port"] for port in only(defaults, "Service")["spec"]["ports"]}
    container_ports = {port["containerPort"] for port in container(defaults)["ports"]}
    gate_config = load_gate_config({k: v for k, v in pod_environment(defaults).items() if v is not None})
    assert service_ports == container_ports == compose_targets == {gate_config.port}
    vllm_port = int(container(defaults)["args"][container(defaults)["args"].index("--port") + 1])
    assert vllm_port not in service_ports
    assert gate_config.upstream == f"http://127.0.0.1:{vllm_port}"


@pytest.mark.parametrize("case", CASES)
def test_no_service_link_variables_reach_vllm(case: str):
    """Kubernetes would set VLLM_PORT=tcp://IP:8000 in the pod for a Service named `vllm` (the release `vllm`
    is one), and vLLM reads VLLM_PORT as its port number: the pod turns service links off."""
    objects = kubernetes_chart.render(CASES[case])
    service_name = only(objects, "Service")["metadata"]["name"]
    assert service_name.upper().replace("-", "_") + "_PORT" == "VLLM_PORT"  # the render's release is `vllm`
    assert only(objects, "Deployment")["spec"]["template"]["spec"]["enableServiceLinks"] is False


def test_grace_period_is_the_compose_one_and_covers_supervisord_stops(compose: dict, defaults: list[dict]):
    """terminationGracePeriodSeconds is compose's stop_grace_period, longer than supervisord stopping the gate
    and then vLLM (stopwaitsecs, one after the other)."""
    grace_s = only(defaults, "Deployment")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace_s == seconds(compose["stop_grace_period"])
    stopwaitsecs = re.findall(r"^stopwaitsecs=(\d+)$", (REPO / "supervisord.conf").read_text(), re.M)
    assert len(stopwaitsecs) == 2
    assert grace_s > sum(map(int, stopwaitsecs))


def test_cache_and_shared_memory_replace_the_compose_volume_and_ipc_host(compose: dict, defaults: list[dict]):
    """compose's ./.cache:/root/.cache is the PVC at the same path; its `ipc: host` is a memory-backed /dev/shm."""
    assert compose["ipc"] == "host"
    cache_target = next(volume["target"] for volume in compose["volumes"] if volume["source"].endswith(".cache"))
    pod = only(defaults, "Deployment")["spec"]["template"]["spec"]
    mounts = {mount["mountPath"]: mount["name"] for mount in container(defaults)["volumeMounts"]}
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    claim = volumes[mounts[cache_target]]["persistentVolumeClaim"]["claimName"]
    assert claim == only(defaults, "PersistentVolumeClaim")["metadata"]["name"]
    shm = volumes[mounts["/dev/shm"]]["emptyDir"]
    assert shm["medium"] == "Memory" and shm["sizeLimit"]


# ---------------------------------------------------------------------------------------------------
# Probes and metrics never wake the server


def test_the_wake_check_tells_waking_paths_from_the_others(defaults: list[dict]):
    """The check below is the gate's own: a path that needs the GPUs wakes, /health and the gate's don't."""
    environment = pod_environment(defaults)
    assert wakes_the_server("/version", environment)
    assert wakes_the_server("/v1/chat/completions", environment)
    assert not wakes_the_server("/health", environment)
    assert not wakes_the_server(STATUS_PATH, environment)
    assert wakes_the_server("/health", {**environment, "GATE_PASSIVE_PATHS": "/metrics"})


@pytest.mark.parametrize("case", CASES)
def test_probes_ask_the_gate_on_paths_that_never_wake_the_server(case: str):
    """Startup, readiness and liveness probes go to the gate's port, on paths the gate answers (or forwards)
    without waking a suspended server, with the pod's own GATE_* settings."""
    objects = kubernetes_chart.render(CASES[case])
    spec = container(objects)
    environment = pod_environment(objects)
    gate_config = load_gate_config({k: v for k, v in environment.items() if v is not None})
    named_ports = {port["name"]: port["containerPort"] for port in spec["ports"]}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        get = spec[probe]["httpGet"]
        assert named_ports.get(get["port"], get["port"]) == gate_config.port, probe
        assert not wakes_the_server(get["path"], environment), f"{probe} on {get['path']} wakes the server"


def scraped_and_probed_paths(objects: list[dict]) -> list[str]:
    """Every path Kubernetes and Prometheus ask the pod for: the probes, the annotations, the ServiceMonitor."""
    spec = container(objects)
    paths = [spec[probe]["httpGet"]["path"] for probe in ("startupProbe", "readinessProbe", "livenessProbe")]
    paths.append(only(objects, "Deployment")["spec"]["template"]["metadata"]["annotations"]["prometheus.io/path"])
    paths += [endpoint["path"] for endpoint in only(objects, "ServiceMonitor")["spec"]["endpoints"]]
    return sorted(set(paths))


def test_probes_and_scrapes_let_the_server_idle_suspend_and_never_wake_it(server, gate):  # noqa: F811
    """The real gate with the pod's settings, in front of the stand-in vLLM: asked for every probe and scrape
    path every 0.1 s, the server still suspends when idle, stays suspended, and every path answers 200."""
    objects = kubernetes_chart.render(kubernetes_chart.ADDONS_ON)
    paths = scraped_and_probed_paths(objects)
    pod_settings = {
        name: value
        for name, value in pod_environment(objects).items()
        if name.startswith(("GATE_", "CUDA_TOGGLE_")) and name != "GATE_UPSTREAM" and value is not None
    }
    upstream = server()
    front = gate(upstream, **{**pod_settings, "GATE_IDLE_SUSPEND_S": "1"})
    answers: list[tuple[str, int]] = []
    stop = threading.Event()

    def probe_like_kubelet() -> None:
        while not stop.is_set():
            answers.extend((path, requests.get(front.url + path, timeout=5).status_code) for path in paths)
            stop.wait(0.1)

    prober = threading.Thread(target=probe_like_kubelet)
    prober.start()
    try:
        front.wait_for_state("suspended", timeout=30)
        probed_before = len(answers)
        wait_until(lambda: len(answers) >= probed_before + 5 * len(paths), "five more rounds of probes", 30)
        status = front.status()
    finally:
        stop.set()
        prober.join(10)
    assert status["state"] == "suspended" and status["last_resume_s"] is None
    assert front.metric("vllm_gate_transitions_total", transition="resume", outcome="ok") == 0
    assert front.metric("vllm_gate_requests_total", path_class="waking") == 0
    assert {path for path, code in answers if code != 200} == set(), answers
    assert {path for path, _ in answers[probed_before:]} == set(paths)


def test_startup_allowance_covers_the_first_download(defaults: list[dict]):
    """The startup probe gives the first start (download and load) startupAllowanceSeconds, the compose
    HEALTHCHECK's start period (30 minutes), before liveness takes over."""
    probe = container(defaults)["startupProbe"]
    values = yaml.safe_load((kubernetes_chart.CHART / "values.yaml").read_text())
    assert probe["periodSeconds"] * probe["failureThreshold"] >= values["startupAllowanceSeconds"]
    start_period = re.search(r"--start-period=(\d+)m", (REPO / "Dockerfile").read_text())
    assert values["startupAllowanceSeconds"] >= int(start_period.group(1)) * 60


def test_prometheus_scrapes_paths_that_never_wake_the_server():
    """The pod's prometheus.io annotations and the ServiceMonitor's endpoints: the gate's metrics, vLLM's."""
    objects = kubernetes_chart.render(kubernetes_chart.ADDONS_ON)
    environment = pod_environment(objects)
    annotations = only(objects, "Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/path"] == METRICS_PATH
    assert int(annotations["prometheus.io/port"]) == container(objects)["ports"][0]["containerPort"]
    paths = [endpoint["path"] for endpoint in only(objects, "ServiceMonitor")["spec"]["endpoints"]]
    assert METRICS_PATH in paths
    assert not [path for path in paths if wakes_the_server(path, environment)]


def test_keda_query_uses_series_the_gate_exports():
    """The ScaledObject's query names only series that /gate/metrics renders."""
    from entrypoint.gate.metrics import GateMetrics

    exported = set(re.findall(r"^(\w+)", GateMetrics().render(phase="running", in_flight=0, waiting=0), re.M))
    trigger = only(kubernetes_chart.render(kubernetes_chart.ADDONS_ON), "ScaledObject")["spec"]["triggers"][0]
    used = set(re.findall(r"(vllm_gate_\w+)\{", trigger["metadata"]["query"]))
    assert used and used <= exported


def test_the_scaled_object_in_the_docs_is_the_rendered_one():
    """docs/kubernetes.md shows the ScaledObject the chart renders with KEDA on (no labels), word for word."""
    text = (REPO / "docs" / "kubernetes.md").read_text()
    shown = [yaml.safe_load(block) for block in re.findall(r"```yaml\n(.*?)```", text, re.S)]
    documented = next(doc for doc in shown if doc.get("kind") == "ScaledObject")
    rendered = only(kubernetes_chart.render(kubernetes_chart.ADDONS_ON), "ScaledObject")
    del rendered["metadata"]["labels"]
    assert documented == rendered


# ---------------------------------------------------------------------------------------------------
# The settings parse with the tools' own parsers; bad values stop the render


@pytest.mark.parametrize("case", CASES)
def test_settings_written_by_the_chart_parse_with_the_tools_own_parsers(case: str):
    """The pod's GATE_* and CUDA_TOGGLE_* (GATE_MODELS built from `models` included) load in the gate and the
    library as they would in the container: no exit 2 at start."""
    environment = {k: v for k, v in pod_environment(kubernetes_chart.render(CASES[case])).items() if v is not None}
    gate_config = load_gate_config(environment)
    load_config(environment)
    values = CASES[case]
    assert [(m.name, m.model, m.port, m.share) for m in gate_config.models] == [
        (m["name"], m["model"], m["port"], m["memoryShare"]) for m in values.get("models", [])
    ]
    idle = values.get("settings", {}).get("GATE_IDLE_SUSPEND_S", 0)
    assert math.isclose(gate_config.idle_suspend_s, idle)


def test_a_gpu_count_that_is_not_the_tensor_parallel_size_stops_the_render():
    """gpus=2 with TP 4: the message names both values and the fix."""
    message = render_error({"gpus": 2, "vllm": {"tensorParallelSize": 4}})
    assert "gpus=2 does not match vllm.tensorParallelSize=4" in message
    assert "set gpus to 4" in message


def test_a_tensor_parallel_size_the_tool_does_not_handle_stops_the_render():
    message = render_error({"vllm": {"tensorParallelSize": 3}})
    assert "/vllm/tensorParallelSize" in message and "1, 2, 4, 8" in message


@pytest.mark.parametrize("idle", ["ten minutes", "600", -1, 10**7])
def test_an_idle_time_that_is_not_a_number_in_range_stops_the_render(idle: object):
    """GATE_IDLE_SUSPEND_S must be a number within the gate's own bounds (0 to a week)."""
    message = render_error({"settings": {"GATE_IDLE_SUSPEND_S": idle}})
    assert "/settings/GATE_IDLE_SUSPEND_S" in message
    assert re.search(r"want number|minimum|maximum", message), message


def test_variables_the_pod_fixes_cannot_be_set():
    """GATE_PORT, GATE_UPSTREAM, GATE_HOST and GATE_MODELS come from the chart itself."""
    for name in kubernetes_chart.FIXED_BY_THE_POD:
        assert f"additional properties '{name}' not allowed" in render_error({"settings": {name: "x"}})


def test_models_with_the_same_port_or_name_stop_the_render():
    model = {"name": "a", "model": "org/a", "port": 8001, "memoryShare": 0.55}
    other = {"name": "b", "model": "org/b", "port": 8002, "memoryShare": 0.55}
    long_enough = {"startupAllowanceSeconds": 3600}
    assert "the port 8001 is given to several models" in render_error(
        {"models": [model, {**other, "port": 8001}], **long_enough}
    )
    assert "the served name a is given to several models" in render_error(
        {"models": [model, {**other, "name": "a"}], **long_enough}
    )
    assert "the port 8000, the gate's own" in render_error({"models": [{**model, "port": 8000}]})


def test_a_startup_allowance_shorter_than_the_models_loading_stops_the_render():
    """Two models load one after another: 1800 s is not enough for 2 x GATE_START_TIMEOUT_S (1800 s)."""
    models = [
        {"name": "a", "model": "org/a", "port": 8001, "memoryShare": 0.55},
        {"name": "b", "model": "org/b", "port": 8002, "memoryShare": 0.55},
    ]
    message = render_error({"models": models, "startupAllowanceSeconds": 1800})
    assert "set it to at least 3600" in message


def test_passive_paths_without_health_stop_the_render():
    """The probes ask /health every 10 s: a GATE_PASSIVE_PATHS without it would wake the server each time."""
    message = render_error({"settings": {"GATE_PASSIVE_PATHS": "/metrics,/v1/models"}})
    assert "leaves out /health" in message
    kubernetes_chart.render({"settings": {"GATE_PASSIVE_PATHS": "/health, /metrics"}})


def test_render_script_reports_ok_for_every_case(capsys: pytest.CaptureFixture[str]):
    """`make lint`'s step: exit 0 and one ok line per case."""
    assert kubernetes_chart.main([]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(CASES) and all(line.startswith("ok ") for line in lines)
