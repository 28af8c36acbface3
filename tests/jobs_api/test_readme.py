"""The README's jobs examples run as written, so the README cannot drift from the code.

Blocks of the "## Jobs API" section preceded by `<!-- readme-test: file NAME -->` are written
to NAME in a fresh directory; those preceded by `<!-- readme-test: run sh|python
[expect="TEXT"] -->` are run there in order (sh with bash -euo pipefail, python with this
interpreter), against real processes on free loopback ports: `mock-inference`, a `gateway` in
front of it and `jobs-api` with the README's custom job module on PYTHONPATH. The only change to
a block is the service address (`http://127.0.0.1:8081` becomes the test's).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.deploy.procs import GATEWAY_READY, JOBS_READY, MOCK_READY, Proc, running

README = Path(__file__).parents[2] / "README.md"
DOCUMENTED_URL = "http://127.0.0.1:8081"
MARKED_BLOCK = re.compile(
    r"^<!-- readme-test: (?P<directive>[^\n]*?) -->\n```(?P<lang>\w+)\n(?P<body>.*?)\n```\n",
    re.DOTALL | re.MULTILINE,
)
DIRECTIVE = re.compile(
    r'^(?:file (?P<file>[\w.-]+)|run (?P<run>sh|python)(?: expect="(?P<expect>(?:[^"\\]|\\.)*)")?)$'
)
# The upstream answers slowly enough that the README's cancel finds its job still running.
UPSTREAM_LATENCY_S = "2"
BLOCK_TIMEOUT_S = 60


@dataclass(frozen=True)
class Example:
    """One marked block: a file to write, or a script to run (and text its output must hold)."""

    lang: str
    body: str
    file: str | None
    run: str | None
    expect: str | None


def jobs_section(text: str) -> str:
    """The README's "## Jobs API" section, up to the next top-level section."""
    start = text.index("\n## Jobs API\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else len(text)]


def examples(text: str) -> list[Example]:
    """Every marked block of the jobs section, in order; a malformed marker fails loudly."""
    found = []
    for match in MARKED_BLOCK.finditer(jobs_section(text)):
        directive = DIRECTIVE.match(match["directive"].strip())
        assert directive is not None, f"bad readme-test marker: {match['directive']!r}"
        expect = directive["expect"]
        found.append(
            Example(
                lang=match["lang"],
                body=match["body"] + "\n",
                file=directive["file"],
                run=directive["run"],
                expect=None if expect is None else re.sub(r"\\(.)", r"\1", expect),
            )
        )
    return found


def test_markers_cover_the_jobs_examples() -> None:
    found = examples(README.read_text(encoding="utf-8"))
    assert {e.file for e in found if e.file} >= {"job.json", "my_jobs.py", "summarize.json"}
    runs = [e for e in found if e.run]
    assert {e.run for e in runs} == {"sh", "python"}
    assert all(e.lang == ("python" if e.run == "python" else "sh") for e in runs)
    # Every example that talks to the service uses the documented address (or the CLI's default).
    assert sum(DOCUMENTED_URL in e.body for e in runs) >= 2
    assert "PYTHONPATH=" in jobs_section(README.read_text(encoding="utf-8"))


def run_example(example: Example, workdir: Path, base_url: str, env: dict[str, str]) -> None:
    body = example.body.replace(DOCUMENTED_URL, base_url)
    if example.run == "sh":
        argv = ["bash", "-euo", "pipefail", "-c", body]
    else:
        script = workdir / "example.py"
        script.write_text(body, encoding="utf-8")
        argv = [sys.executable, str(script)]
    done = subprocess.run(
        argv, cwd=workdir, env=env, capture_output=True, text=True, timeout=BLOCK_TIMEOUT_S, check=False
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"README example failed (exit {done.returncode}):\n{body}\n---\n{output}"
    if example.expect is not None:
        assert example.expect in output, (
            f"README example printed no {example.expect!r}:\n{body}\n---\n{output}"
        )


@pytest.mark.timeout(180)
def test_readme_jobs_examples_run_verbatim(tmp_path: Path) -> None:
    assert shutil.which("curl"), "the README's examples use curl; install it"
    found = examples(README.read_text(encoding="utf-8"))
    workdir = tmp_path / "example"
    workdir.mkdir()
    for example in found:
        if example.file:
            (workdir / example.file).write_text(example.body, encoding="utf-8")

    with running([]) as procs:
        mock = Proc(
            [
                sys.executable,
                "-m",
                "gateway.testing.mock_inference",
                "--port",
                "0",
                "--latency",
                UPSTREAM_LATENCY_S,
            ],
            tmp_path / "mock.log",
        )
        procs.append(mock)
        mock_url = f"http://127.0.0.1:{mock.wait_for(MOCK_READY).group(1)}"
        gateway = Proc(
            [
                sys.executable,
                "-m",
                "gateway",
                "--upstream",
                f"a={mock_url}",
                "--port",
                "0",
                "--admin-port",
                "0",
            ],
            tmp_path / "gateway.log",
        )
        procs.append(gateway)
        gateway_url = f"http://127.0.0.1:{gateway.wait_for(GATEWAY_READY).group(1)}"
        # As the README says: the module's directory on PYTHONPATH, the module in JOBS_HANDLERS.
        handlers = {"PYTHONPATH": str(workdir), "JOBS_HANDLERS": "my_jobs"}
        store = f"sqlite:///{tmp_path / 'jobs.db'}"
        api = Proc(
            [sys.executable, "-m", "jobs_api", "--port", "0", "--gateway-url", gateway_url, "--store", store],
            tmp_path / "api.log",
            handlers,
        )
        procs.append(api)
        base_url = f"http://127.0.0.1:{api.wait_for(JOBS_READY).group(1)}"

        scripts = sysconfig.get_path("scripts")
        env = {k: v for k, v in os.environ.items() if not k.startswith(("GATEWAY_", "JOBS_"))}
        env.update({"PATH": f"{scripts}{os.pathsep}{env.get('PATH', '')}", "JOBS_URL": base_url})
        ran = 0
        for example in found:
            if example.run:
                run_example(example, workdir, base_url, env)
                ran += 1
        assert ran >= 4
        assert "Traceback" not in api.output(), api.output()[-5000:]
