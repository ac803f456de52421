"""The deployment files agree with the service they deploy.

No Docker engine is needed (nor used): hadolint lints the Dockerfile, docker-compose 1.29 (both
from `make tools`, in .venv-tools) validates and resolves the compose files, and the resolved
values are compared with what the service really has — its settings (``Settings`` fields and
validation), its routes (the OpenAPI paths) and the port it serves on. The helper scripts under
docker/ run for real against stand-ins: a stub ``sessionrec`` for the bootstrap job, a loopback
HTTP server for the health probe.
"""

from __future__ import annotations

import functools
import http.server
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from service.settings import Settings
from sessionrec.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
TOOLS = ROOT / ".venv-tools" / "bin"
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE = ROOT / "docker-compose.yml"
COMPOSE_GPU = ROOT / "docker-compose.gpu.yml"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
PORT = 8000  # the port the image serves on
APP_SERVICES = ("bootstrap", "api")  # the services that run the sessionrec image


def tool(name: str) -> Path:
    path = TOOLS / name
    if not os.access(path, os.X_OK):
        pytest.fail(f"{path} is missing: run `make tools`", pytrace=False)
    return path


def run(cmd: list, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(c) for c in cmd], capture_output=True, text=True, timeout=60, **kwargs
    )


# ------------------------------------------------------------------------------- Dockerfile


@dataclass
class Stage:
    image: str  # as written, ARG references unresolved
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [rest for kw, rest in self.instructions if kw == keyword]

    def one(self, keyword: str) -> str:
        found = self.all(keyword)
        assert len(found) == 1, f"stage {self.name}: expected one {keyword}, found {found}"
        return found[0]


@dataclass
class Dockerfile:
    args: dict[str, str]  # global ARGs (before the first FROM) and their defaults
    stages: list[Stage]

    def stage(self, name: str) -> Stage:
        found = [s for s in self.stages if s.name == name]
        assert found, f"no stage named {name!r}"
        return found[0]

    def resolve(self, text: str) -> str:
        return re.sub(r"\$\{?(\w+)\}?", lambda m: self.args.get(m.group(1), m.group(0)), text)


def parse_dockerfile(text: str) -> Dockerfile:
    lines, pending = [], ""
    for raw in text.splitlines():
        if raw.lstrip().startswith("#"):  # comments, also inside continuations (as Docker does)
            continue
        if raw.rstrip().endswith("\\"):
            pending += raw.rstrip()[:-1] + " "
            continue
        line = (pending + raw).strip()
        pending = ""
        if line:
            lines.append(line)
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in lines:
        keyword, _, rest = line.partition(" ")
        keyword, rest = keyword.upper(), rest.strip()
        if keyword == "FROM":
            words = [w for w in rest.split() if not w.startswith("--")]
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(words[0], name))
        elif not stages and keyword == "ARG":
            key, _, default = rest.partition("=")
            args[key] = default
        else:
            stages[-1].instructions.append((keyword, rest))
    return Dockerfile(args, stages)


def exec_form(rest: str) -> list[str]:
    assert rest.startswith("["), f"use the exec (JSON) form: {rest}"
    return json.loads(rest)


@pytest.fixture(scope="module")
def dockerfile() -> Dockerfile:
    return parse_dockerfile(DOCKERFILE.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def runtime(dockerfile) -> Stage:
    stage = dockerfile.stages[-1]  # the last stage is what a plain `docker build` produces
    assert stage.name == "runtime"
    return stage


def test_a_missing_tool_fails_with_the_fix():
    with pytest.raises(pytest.fail.Exception, match="run `make tools`"):
        tool("no-such-tool")


def test_hadolint_finds_nothing():
    proc = run([tool("hadolint"), "--no-color", DOCKERFILE], cwd=ROOT)
    assert proc.returncode == 0 and not proc.stdout.strip(), proc.stdout + proc.stderr


def test_dockerfile_is_multistage_and_selects_cpu_or_gpu_by_build_arg(dockerfile):
    assert dockerfile.args.get("VARIANT") == "cpu"
    names = [s.name for s in dockerfile.stages]
    assert {"base-cpu", "base-gpu", "builder", "runtime"} <= set(names)
    (chooser,) = [s for s in dockerfile.stages if "VARIANT" in s.image]
    assert chooser.image in ("base-${VARIANT}", "base-$VARIANT")
    assert dockerfile.resolve(dockerfile.stage("base-cpu").image).startswith("python:")
    assert dockerfile.resolve(dockerfile.stage("base-gpu").image).startswith("nvidia/cuda:")
    # every external base image carries an exact version tag
    for stage in dockerfile.stages:
        image = dockerfile.resolve(stage.image)
        if image.split(":")[0] in names:
            continue
        repo, _, tag = image.partition(":")
        assert re.match(r"\d+\.\d+(\.\d+)?(-|$)", tag), (
            f"stage {stage.name}: unpinned image {image}"
        )
    # the runtime stage gets the builder's venv and builds nothing itself
    runtime = dockerfile.stages[-1]
    assert any(c.split()[:2] == ["--from=builder", "/opt/venv"] for c in runtime.all("COPY"))
    assert not any("pip install" in r for r in runtime.all("RUN"))


def test_dockerfile_installs_pinned_torch_and_faiss_per_variant(dockerfile):
    builder = dockerfile.stage("builder")
    build_args = dict(rest.partition("=")[::2] for rest in builder.all("ARG"))
    assert build_args["TORCH_CPU_INDEX"] == "https://download.pytorch.org/whl/cpu"
    # the GPU FAISS wheel is an exact pin of the same FAISS release as the project's faiss-cpu
    faiss_cpu = next(d for d in PYPROJECT["project"]["dependencies"] if d.startswith("faiss-cpu"))
    name, _, version = build_args["FAISS_GPU"].partition("==")
    assert name.startswith("faiss-gpu") and version == faiss_cpu.partition("==")[2]
    runs = [rest for stage in dockerfile.stages for rest in stage.all("RUN")]
    installs = [part for rest in runs for part in re.split(r"&&|;", rest) if "pip install" in part]
    assert len(installs) >= 4 and all("--no-cache-dir" in i for i in installs), installs


def test_dockerfile_copies_the_packages_pyproject_builds(dockerfile):
    builder = dockerfile.stage("builder")
    copied = {
        src.rstrip("/")
        for rest in builder.all("COPY")
        if not rest.startswith("--from")
        for src in rest.split()[:-1]
    }
    packages = {
        p.rstrip("*") for p in PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]
    }
    assert packages <= copied, f"the builder does not copy {packages - copied}"
    assert {"pyproject.toml", "README.md", "docker/requirements.py"} <= copied
    # nothing the Dockerfile copies is excluded from the build context, and heavy or private
    # things are
    patterns = [
        p.strip()
        for p in (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
        if p.strip() and not p.startswith("#")
    ]
    sources = {
        src
        for stage in dockerfile.stages
        for rest in stage.all("COPY")
        if not rest.startswith("--from")
        for src in rest.split()[:-1]
    }
    for source in sources:
        parts = Path(source.rstrip("/")).parts
        prefixes = {"/".join(parts[: i + 1]) for i in range(len(parts))}
        assert not prefixes & set(patterns), f"{source} is excluded by .dockerignore"
    for needed in (".git", ".venv", ".venv-*", "runs", "data", "artifacts", "datasets", ".env"):
        assert needed in patterns, f".dockerignore should exclude {needed}"
    assert any("__pycache__" in p for p in patterns) and any("pytest_cache" in p for p in patterns)


def test_runtime_stage_serves_as_non_root_with_a_liveness_check(dockerfile, runtime):
    user = runtime.all("USER")[-1].split(":")[0]
    assert user not in ("root", "0"), f"runtime runs as {user}"
    assert runtime.one("EXPOSE").split() == [str(PORT)]
    command = exec_form(runtime.one("ENTRYPOINT")) + exec_form(runtime.one("CMD"))
    assert command == ["sessionrec", "serve", "--host", "0.0.0.0", "--port", str(PORT)]
    options, _, probe = runtime.one("HEALTHCHECK").partition(" CMD ")
    assert "--interval" in options and "--timeout" in options
    probe = exec_form(probe.strip())
    assert probe[0] == "python" and "curl" not in probe  # the image has no curl
    assert probe[1:] == ["/app/docker/healthcheck.py", "/healthz"]
    assert copied_into_app(runtime, "docker/healthcheck.py")


def copied_into_app(stage: Stage, script: str) -> bool:
    """``script`` (docker/NAME) is copied to /app/docker/NAME in ``stage``."""
    return any(
        script in c.split()[:-1] and c.split()[-1] == "/app/docker/" for c in stage.all("COPY")
    )


def test_image_env_defaults_are_settings_and_hold_no_secret(runtime):
    env = dict(
        pair.split("=", 1) for rest in runtime.all("ENV") for pair in rest.split() if "=" in pair
    )
    assert env["SESSIONREC_REGISTRY"] == "/data/artifacts"
    assert env["SESSIONREC_DATA_DIR"] == "/data/state"
    check_settings({k: v for k, v in env.items() if k.startswith("SESSIONREC_")}, "Dockerfile")
    code = [
        line for line in DOCKERFILE.read_text().splitlines() if not line.lstrip().startswith("#")
    ]
    assert not [line for line in code if "ADMIN_TOKEN" in line or "PASSWORD" in line.upper()]


# ------------------------------------------------------------------------------- compose


def yaml_to_data(text: str):
    """YAML → Python via the tools venv's PyYAML (docker-compose's own), not the project's."""
    script = "import json, sys, yaml; json.dump(yaml.safe_load(sys.stdin), sys.stdout)"
    proc = run([tool("python"), "-c", script], input=text)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


@functools.cache
def compose_config(*files: Path, **environ: str) -> dict:
    """`docker-compose -f ... config`, isolated from the caller's environment and .env file.

    A plain cached function, not a fixture: a missing tool then fails each test that needs it
    (FAILED, "run `make tools`"), instead of erroring in a fixture's setup.
    """
    env = {"PATH": os.environ.get("PATH", ""), "LC_ALL": "C.UTF-8", **environ}
    flags = [arg for f in files for arg in ("-f", f)]
    with tempfile.TemporaryDirectory() as tmp:
        empty = Path(tmp) / "empty.env"
        empty.write_text("")
        cmd = [tool("docker-compose"), "--env-file", empty, *flags, "config"]
        proc = run(cmd, cwd=ROOT, env=env)
    assert proc.returncode == 0, f"docker-compose config failed:\n{proc.stderr}"
    return yaml_to_data(proc.stdout)


def cpu_config() -> dict:
    return compose_config(COMPOSE)


def gpu_config() -> dict:
    return compose_config(COMPOSE, COMPOSE_GPU)


@pytest.fixture(scope="module")
def routes() -> set[str]:
    from service.app import create_app

    return set(create_app(Settings()).openapi()["paths"])


def check_settings(env: dict[str, str | None], where: str) -> None:
    """Every SESSIONREC_* name is a Settings field, and the values validate."""
    values = {}
    for name, value in env.items():
        key = name.removeprefix("SESSIONREC_").lower()
        assert key in Settings.model_fields, f"{where}: {name} is not a service setting"
        if value is not None:
            values[key] = value
    Settings(**values)


def option(command: list[str], flag: str) -> str:
    assert flag in command, f"{flag} missing from {command}"
    return command[command.index(flag) + 1]


def test_compose_services():
    cpu, gpu = cpu_config(), gpu_config()
    for config in (cpu, gpu):
        assert set(config["services"]) == {"redis", "bootstrap", "api", "locust"}
        assert set(config["volumes"]) >= {"redis-data", "artifacts"}


@pytest.mark.parametrize("variant", ["cpu", "gpu"])
def test_compose_env_names_are_service_settings(variant):
    cpu, gpu = cpu_config(), gpu_config()
    config = {"cpu": cpu, "gpu": gpu}[variant]
    for name, service in config["services"].items():
        env = service.get("environment") or {}
        ours = {k: v for k, v in env.items() if k.startswith("SESSIONREC_")}
        check_settings(ours, f"{variant} service {name}")


def test_health_checks_hit_real_routes(runtime, routes):
    cpu = cpu_config()
    probe = exec_form(runtime.one("HEALTHCHECK").partition(" CMD ")[2].strip())
    assert probe[-1] == "/healthz" and "/healthz" in routes
    api = cpu["services"]["api"]["healthcheck"]["test"]
    assert api[0] == "CMD" and api[-1] == "/readyz" and "/readyz" in routes
    assert api[1:-1] == probe[:-1]  # the same probe script, which the image copies


def test_api_port_command_and_dependencies(runtime):
    cpu = cpu_config()
    api = cpu["services"]["api"]
    (port,) = api["ports"]
    published, target = (
        (port["published"], port["target"]) if isinstance(port, dict) else port.split(":")[-2:]
    )
    assert int(published) == int(target) == PORT
    assert "PORT" not in api.get("environment", {})  # the probe's default port is PORT
    command = api.get("command") or exec_form(runtime.one("CMD"))
    assert command[0] == "serve" and int(option(command, "--port")) == PORT
    assert option(command, "--host") == "0.0.0.0"
    env = api["environment"]
    assert env["SESSIONREC_REDIS_URL"] == "redis://redis:6379/0"
    if "--redis-url" in command:
        assert option(command, "--redis-url") == env["SESSIONREC_REDIS_URL"]
    assert api["depends_on"] == {
        "redis": {"condition": "service_healthy"},
        "bootstrap": {"condition": "service_completed_successfully"},
    }
    assert "profiles" not in api


def test_api_and_bootstrap_share_image_registry_and_redis():
    cpu = cpu_config()
    api, bootstrap = cpu["services"]["api"], cpu["services"]["bootstrap"]
    assert api["image"] == bootstrap["image"] and api["build"] == bootstrap["build"]
    assert api["build"]["target"] == "runtime"
    for name in APP_SERVICES:
        service = cpu["services"][name]
        env = service["environment"]
        assert env["SESSIONREC_REDIS_URL"] == "redis://redis:6379/0"
        mounts = {v.split(":")[1]: v for v in service["volumes"]}
        registry = env["SESSIONREC_REGISTRY"]
        assert mounts[registry].split(":")[0] == "artifacts", f"{name}: registry not shared"
    assert api["volumes"] == ["artifacts:/data/artifacts:ro"]  # the service never writes models


def test_bootstrap_is_a_one_shot_job_after_redis(runtime):
    cpu = cpu_config()
    job = cpu["services"]["bootstrap"]
    assert job["restart"] == "no"
    assert job["depends_on"] == {"redis": {"condition": "service_healthy"}}
    assert job["entrypoint"] == ["python", "/app/docker/bootstrap.py"]
    assert copied_into_app(runtime, "docker/bootstrap.py")
    assert job["healthcheck"]["test"] == ["NONE"]  # the image's API probe does not apply


def test_redis_service():
    cpu = cpu_config()
    redis = cpu["services"]["redis"]
    repo, _, tag = redis["image"].partition(":")
    assert repo == "redis" and re.match(r"\d+\.\d+\.\d+", tag)
    command = redis["command"]
    assert command[0] == "redis-server"
    assert option(command, "--appendonly") == "yes"
    assert option(command, "--appendfsync") == "everysec"
    assert redis["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]
    assert any(v.split(":")[:2] == ["redis-data", "/data"] for v in redis["volumes"])
    assert "ports" not in redis  # reachable from the compose network only


def test_gpu_override_reserves_an_nvidia_gpu():
    cpu, gpu = cpu_config(), gpu_config()
    for name in APP_SERVICES:
        service, base = gpu["services"][name], cpu["services"][name]
        assert service["build"]["args"]["VARIANT"] == "gpu"
        assert base["build"]["args"]["VARIANT"] == "cpu"
        assert service["image"] != base["image"]  # never one tag for two images
        assert service["environment"]["SESSIONREC_DEVICE"] == "cuda"
        (device,) = service["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
        assert device.get("count") == "all" or int(device.get("count", 0)) >= 1
    api, base = gpu["services"]["api"], cpu["services"]["api"]
    for key in ("command", "ports", "healthcheck", "depends_on", "volumes"):
        assert api[key] == base[key], f"the GPU override changes api.{key}"
    assert gpu["services"]["locust"] == cpu["services"]["locust"]
    assert "deploy" not in cpu["services"]["api"]


def test_loadtest_profile_runs_locust_headless_against_api(dockerfile):
    cpu = cpu_config()
    profiled = {n for n, s in cpu["services"].items() if s.get("profiles")}
    assert profiled == {"locust"}
    locust = cpu["services"]["locust"]
    assert locust["profiles"] == ["loadtest"]
    assert locust["build"]["target"] == "loadtest" and dockerfile.stage("loadtest")
    command = locust["command"]
    flags = dict(arg.split("=", 1) if "=" in arg else (arg, "") for arg in command)
    assert "--headless" in flags and flags["--host"] == f"http://api:{PORT}"
    locustfile = flags["--locustfile"]
    (mount,) = locust["volumes"]
    source, target, mode = mount.split(":")
    assert Path(source) == ROOT / "loadtests" and mode == "ro"
    assert Path(locustfile).parent == Path(target) and Path(locustfile).name == "locustfile.py"
    assert (ROOT / "loadtests" / "locustfile.py").is_file()
    assert locust["depends_on"] == {"api": {"condition": "service_healthy"}}
    assert exec_form(dockerfile.stage("loadtest").one("ENTRYPOINT")) == ["locust"]


def test_admin_token_only_from_the_environment():
    cpu, gpu = cpu_config(), gpu_config()
    for config in (cpu, gpu):
        for name, service in config["services"].items():
            token = (service.get("environment") or {}).get("SESSIONREC_ADMIN_TOKEN")
            assert token in (None, ""), f"{name} has a literal admin token"
    given = compose_config(COMPOSE, SESSIONREC_ADMIN_TOKEN="from-the-env")
    assert given["services"]["api"]["environment"]["SESSIONREC_ADMIN_TOKEN"] == "from-the-env"
    for path in (COMPOSE, COMPOSE_GPU):
        for line in path.read_text().splitlines():
            if "ADMIN_TOKEN" in line and not line.lstrip().startswith("#"):
                value = line.split(":", 1)[1].strip()
                assert value in ("", "${SESSIONREC_ADMIN_TOKEN}", "${SESSIONREC_ADMIN_TOKEN:-}")


# ------------------------------------------------------------------------------- docker/


def test_requirement_sets_follow_pyproject(tmp_path):
    script = ROOT / "docker" / "requirements.py"
    deps = PYPROJECT["project"]["dependencies"]
    torch = next(d for d in deps if d.startswith("torch=="))
    others = [d for d in deps if not d.startswith(("torch==", "faiss-cpu=="))]
    faiss_cpu = next(d for d in deps if d.startswith("faiss-cpu=="))
    for variant, faiss in (("cpu", faiss_cpu), ("gpu", "faiss-gpu==1.15.1")):
        out = tmp_path / variant
        cmd = [sys.executable, script, "--pyproject", ROOT / "pyproject.toml"]
        proc = run([*cmd, "--variant", variant, "--faiss-gpu", "faiss-gpu==1.15.1", "--out", out])
        assert proc.returncode == 0, proc.stderr
        assert (out / "torch.txt").read_text().split() == [torch]
        assert sorted((out / "runtime.txt").read_text().split()) == sorted([*others, faiss])
    proc = run([*cmd, "--extra", "dev", "--only", "locust"])
    locust = next(d for d in PYPROJECT["project"]["optional-dependencies"]["dev"] if "locust" in d)
    assert proc.returncode == 0 and proc.stdout.strip() == locust
    proc = run([*cmd, "--variant", "gpu", "--faiss-gpu", "faiss-gpu", "--out", tmp_path / "x"])
    assert proc.returncode != 0 and "exact pin" in proc.stderr


class _Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (http.server's name)
        status = 200 if self.path == "/healthz" else 503
        body = b'{"ready": false}'
        self.send_response(status)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_healthcheck_script_passes_on_2xx_only():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Health)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    script = ROOT / "docker" / "healthcheck.py"
    try:
        env = {**os.environ, "PORT": str(server.server_address[1])}
        assert run([sys.executable, script, "/healthz"], env=env).returncode == 0
        assert run([sys.executable, script, "/readyz"], env=env).returncode == 1
    finally:
        server.shutdown()
        server.server_close()
    env = {**os.environ, "PORT": str(server.server_address[1])}  # closed now: refused
    assert run([sys.executable, script, "/healthz"], env=env).returncode == 1


STUB = """\
#!{python}
# A stand-in for the sessionrec CLI: logs its argv and makes what the real command would make.
import json, os, sys, tempfile
from pathlib import Path
from model_store.artifacts import add_files
from model_store.registry import Registry

argv = sys.argv[1:]
with open(os.environ["STUB_LOG"], "a") as f:
    f.write(json.dumps(argv) + "\\n")
opt = lambda name: argv[argv.index(name) + 1]
if argv[:2] == ["data", "prepare"]:
    Path(opt("--out")).mkdir(parents=True)
    (Path(opt("--out")) / "meta.json").write_text("{{}}")
elif argv[0] == "train":
    registry = Registry(Path(opt("--registry")))
    version = registry.new_version("sessionrec")
    with registry.writer(version, kind="sessionrec") as w:
        w.write_json("config.json", {{"stub": True}})
    if "--promote" in argv:
        registry.promote(version)
elif argv[:2] == ["index", "build"]:
    registry = Registry(Path(opt("--registry")))
    index = Path(tempfile.mkdtemp()) / "item_index.faiss"
    index.write_bytes(b"stub")
    add_files(registry.path(registry.resolve(opt("--model"))), {{"item_index.faiss": index}})
"""


def test_bootstrap_job_is_idempotent(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stub = bin_dir / "sessionrec"
    stub.write_text(STUB.format(python=sys.executable))
    stub.chmod(0o755)
    log = tmp_path / "calls.jsonl"
    env = {
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
        "PYTHONPATH": str(ROOT),
        "STUB_LOG": str(log),
        "SESSIONREC_REGISTRY": str(tmp_path / "artifacts"),
        "SESSIONREC_REDIS_URL": "redis://redis:6379/0",
        "BOOTSTRAP_DATA": str(tmp_path / "data"),
        "BOOTSTRAP_USERS": "50",
        "BOOTSTRAP_ITEMS": "40",
        "BOOTSTRAP_EPOCHS": "1",
    }
    bootstrap = [sys.executable, ROOT / "docker" / "bootstrap.py"]

    parser = build_parser()

    def calls() -> list[list[str]]:
        made = [json.loads(line) for line in log.read_text().splitlines()]
        log.write_text("")
        for argv in made:  # the job's command lines are valid for the real CLI
            assert hasattr(parser.parse_args(argv), "handler"), argv
        return made

    first = run(bootstrap, env=env)
    assert first.returncode == 0, first.stdout + first.stderr
    prepare, train, index, backfill = calls()
    assert prepare[:2] == ["data", "prepare"] and option(prepare, "--source") == "synthetic"
    assert (option(prepare, "--users"), option(prepare, "--items")) == ("50", "40")
    assert train[0] == "train" and "--promote" in train and option(train, "--epochs") == "1"
    assert option(train, "--device") == "auto"
    assert index[:2] == ["index", "build"]
    assert backfill[0] == "backfill"
    assert "--redis-url" not in backfill  # the URL comes from SESSIONREC_REDIS_URL
    assert option(backfill, "--registry") == env["SESSIONREC_REGISTRY"]

    again = run(bootstrap, env=env)  # everything exists: only the (idempotent) backfill runs
    assert again.returncode == 0, again.stdout + again.stderr
    assert [c[0] for c in calls()] == ["backfill"]
    assert "training skipped" in again.stdout

    # a CURRENT model that fails verification is never silently replaced
    (current,) = [p for p in (tmp_path / "artifacts").iterdir() if p.is_dir()]
    (current / "config.json").write_text('{"tampered": true}')
    damaged = run(bootstrap, env=env)
    assert damaged.returncode != 0 and "CURRENT model is unusable" in damaged.stderr
    assert calls() == []

    bad = run(bootstrap, env={**env, "BOOTSTRAP_USERS": "many"})
    assert bad.returncode != 0 and "BOOTSTRAP_USERS must be an integer" in bad.stderr
