"""schemathesis against a real `jobs-api` process, on SQLite and on Redis.

The service runs as its own process on a free loopback port, with API keys, in front of a real
`mock-inference` process (jobs really run). schemathesis reads /openapi.json and runs every
phase (examples, coverage, fuzzing, stateful through the documented links) with every check:
no 5xx, every status documented, every body, header and SSE event conforming to its schema,
invalid data refused, auth not ignored (all but use_after_free, see below). Bounded by the
examples per operation and a deadline. `schemathesis.toml` beside this file lists the few
refusals that are by design.
"""

from __future__ import annotations

import re
import subprocess
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from tests.deploy.procs import JOBS_READY, MOCK_READY, Proc, running

CONFIG = Path(__file__).with_name("schemathesis.toml")
API_KEYS = {"fuzz-key": {"tenant": "fuzz"}}
MAX_EXAMPLES = 25
# "1114 generated, 1114 passed, 20 skipped": any failure or error adds "N failed" / "N errored".
SUMMARY_RE = re.compile(r"(\d+) generated, (\d+) passed(?:, \d+ skipped)?\s*$", re.MULTILINE)
RUN_TIMEOUT_S = 90.0  # a safety net: the run takes about 20 s per store


def schemathesis_cmd() -> list[str]:
    """The `schemathesis` console script of this interpreter's environment."""
    return [str(Path(sysconfig.get_path("scripts")) / "schemathesis")]


@pytest.fixture
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, dict[str, str]]]:
    """(store URL, extra environment) of the backend under test."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'fuzz.db'}", {}
    else:
        url: str = request.getfixturevalue("redis_url")
        prefix: str = request.getfixturevalue("redis_prefix")
        yield url, {"JOBS_REDIS_PREFIX": prefix}


@pytest.mark.timeout(150)
@pytest.mark.parametrize("store_url", ["sqlite", "redis"], indirect=True)
def test_schemathesis_finds_no_failures(store_url: tuple[str, dict[str, str]], tmp_path: Path) -> None:
    store, store_env = store_url
    with running([]) as procs:
        mock_cmd = [sys.executable, "-m", "gateway.testing.mock_inference", "--port", "0", "--name", "fuzz"]
        mock = Proc(mock_cmd, tmp_path / "mock.log")
        procs.append(mock)
        mock_port = mock.wait_for(MOCK_READY).group(1)
        env = {
            "JOBS_API_KEYS": orjson.dumps(API_KEYS).decode(),
            "JOBS_BACKOFF_BASE_S": "0.01",
            "JOBS_BACKOFF_MAX_S": "0.05",
            **store_env,
        }
        args = ["--port", "0", "--store", store, "--gateway-url", f"http://127.0.0.1:{mock_port}"]
        api = Proc([sys.executable, "-m", "jobs_api", *args], tmp_path / "api.log", env)
        procs.append(api)
        base = f"http://127.0.0.1:{api.wait_for(JOBS_READY).group(1)}"

        run = subprocess.run(
            [
                *schemathesis_cmd(),
                "--config-file",
                str(CONFIG),
                "run",
                f"{base}/openapi.json",
                "--checks",
                "all",
                # DELETE /v1/jobs/{id} cancels a job and keeps it (documented), so the job is still
                # there afterwards; use_after_free assumes a DELETE removes its resource. (On the
                # command line: `--checks all` overrides `enabled = false` in the config file.)
                "--exclude-checks",
                "use_after_free",
                "--max-examples",
                str(MAX_EXAMPLES),
                "--seed",
                "20261203",
                "--workers",
                "1",
                "--request-timeout",
                "10",
                "--header",
                "Authorization: Bearer fuzz-key",
                "--no-color",
            ],
            capture_output=True,
            text=True,
            timeout=RUN_TIMEOUT_S,
            cwd=tmp_path,
            check=False,
        )
        log = api.output()
    assert run.returncode == 0, f"{run.stdout[-12000:]}\n{run.stderr[-3000:]}"
    counted = SUMMARY_RE.search(run.stdout)
    assert counted is not None, run.stdout[-3000:]
    generated, passed = int(counted.group(1)), int(counted.group(2))
    assert generated == passed and generated >= 200, run.stdout[-3000:]
    for phase in ("Coverage", "Fuzzing", "Stateful"):
        assert f"✅  {phase}" in run.stdout, run.stdout[-3000:]
    # 0 server errors also on the service's side: nothing unhandled was logged.
    assert "unhandled error" not in log and "Traceback" not in log, log[-5000:]
