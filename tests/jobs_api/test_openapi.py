"""/openapi.json and /docs: generated from the route table, public, per-app, self-contained.

The real app over loopback (aiohttp test client); the document is checked against what aiohttp
actually routes and what the routes actually answer (jsonschema against its components).
The fuzzing of every route against the document is in test_openapi_fuzz.py.
"""

from __future__ import annotations

import re
from typing import Any

import jsonschema
import pytest
from aiohttp import web

from jobs_api.openapi import at_most
from tests.conftest import AiohttpClient
from tests.jobs_api.conftest import JobsSettingsFactory
from tests.jobs_api.test_routes import CHAT, JobsHarness, StartJobs, inference, jobs_starter

API_KEYS: dict[str, Any] = {"key-a": {"tenant": "org-a"}}
A = {"Authorization": "Bearer key-a"}


@pytest.fixture
def start_jobs(aiohttp_client: AiohttpClient, jobs_settings: JobsSettingsFactory) -> StartJobs:
    """Start a jobs app: `await start_jobs(start_runner=False, **settings)`."""
    return jobs_starter(aiohttp_client, jobs_settings)


async def spec_of(jobs: JobsHarness) -> dict[str, Any]:
    resp = await jobs.client.get("/openapi.json")
    assert resp.status == 200
    assert resp.content_type == "application/json"
    doc: dict[str, Any] = await resp.json()
    return doc


def routed(app: web.Application) -> set[tuple[str, str]]:
    """(method, path template) of every route aiohttp serves, HEAD aside."""
    out = set()
    for route in app.router.routes():
        info = route.resource.get_info() if route.resource is not None else {}
        path = info.get("path") or info.get("formatter")
        if route.method != "HEAD":
            out.add((route.method, str(path)))
    return out


def check(doc: dict[str, Any], schema: dict[str, Any], instance: Any) -> None:
    """Validate `instance` against `schema`, resolving refs into the document's components."""
    validator = jsonschema.Draft202012Validator({**schema, "components": doc["components"]})
    errors = [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(instance)]
    assert not errors, errors


def response_schema(doc: dict[str, Any], method: str, path: str, status: int) -> dict[str, Any]:
    content = doc["paths"][path][method.lower()]["responses"][str(status)]["content"]
    schema: dict[str, Any] = content["application/json"]["schema"]
    return schema


async def test_document_describes_exactly_the_routes_served(start_jobs: StartJobs) -> None:
    jobs = await start_jobs(start_runner=False)
    doc = await spec_of(jobs)
    assert doc["openapi"] == "3.1.0"
    documented = {(m.upper(), p) for p, item in doc["paths"].items() for m in item}
    assert documented == routed(jobs.app)
    for path, item in doc["paths"].items():
        for method, op in item.items():
            assert op["operationId"] and op["summary"], (method, path)
            names = set(re.findall(r"{(\w+)}", path))
            params = {p["name"] for p in op.get("parameters", []) if p["in"] == "path"}
            assert names == params, (method, path)
            for status, answer in op["responses"].items():
                if path.startswith("/v1/") and status.startswith(("4", "5")):
                    schema = answer["content"]["application/json"]["schema"]["$ref"]
                    assert schema.rsplit("/", 1)[1] in {
                        "ErrorBody",
                        "OutcomeUnknownBody",
                        "NotFinished",
                        "ItemNotReady",
                    }, (method, path, status)
            if path.startswith("/v1/"):
                assert "401" in op["responses"] and "400" in op["responses"], (method, path)


async def test_document_and_docs_are_public_while_the_api_needs_a_key(start_jobs: StartJobs) -> None:
    jobs = await start_jobs(start_runner=False, api_keys=API_KEYS)
    assert (await jobs.client.get("/v1/jobs")).status == 401
    doc = await spec_of(jobs)
    assert doc["components"]["securitySchemes"]["bearerAuth"] == {
        "type": "http",
        "scheme": "bearer",
        "description": "an API key of JOBS_API_KEYS, or a JWT",
    }
    assert doc["paths"]["/v1/jobs"]["post"]["security"] == [{"bearerAuth": []}]
    assert doc["paths"]["/healthz"]["get"]["security"] == []
    assert doc["paths"]["/openapi.json"]["get"]["security"] == []
    resp = await jobs.client.get("/docs")
    assert resp.status == 200
    assert resp.content_type == "text/html"
    assert "default-src 'none'" in resp.headers["Content-Security-Policy"]


async def test_open_mode_documents_no_security(start_jobs: StartJobs) -> None:
    doc = await spec_of(await start_jobs(start_runner=False))
    assert "securitySchemes" not in doc["components"]
    assert "security" not in doc["paths"]["/v1/jobs"]["post"]
    assert "open to anyone" in doc["info"]["description"]


async def test_submissions_are_documented_per_job_type_with_the_configured_limits(
    start_jobs: StartJobs,
) -> None:
    jobs = await start_jobs(
        start_runner=False, handlers=("jobs_api.examples.pipeline",), max_priority=7, max_timeout_s=600
    )
    doc = await spec_of(jobs)
    schemas = doc["components"]["schemas"]
    mapping = schemas["JobSubmit"]["discriminator"]["mapping"]
    assert sorted(mapping) == ["batch", "inference", "pipeline"]
    pipeline = schemas["JobSubmit.pipeline"]["properties"]
    assert pipeline["type"]["const"] == "pipeline"
    assert pipeline["priority"]["maximum"] == 7
    assert [b.get("maximum") for b in pipeline["timeout_s"]["anyOf"]] == [600, None]
    assert schemas["BatchSubmit"]["properties"]["priority"]["maximum"] == 7
    submit = {"$ref": "#/components/schemas/JobSubmit"}
    check(doc, submit, {"type": "pipeline", "input": {"question": "q", "documents": ["d"]}})
    check(doc, submit, inference(priority=7))
    for bad in (inference(priority=8), inference(timeout_s=601), {"type": "nope", "input": {}}):
        with pytest.raises(AssertionError):
            check(doc, submit, bad)
    # What the schema refuses, the service refuses too.
    for body in (inference(priority=8), {**inference(), "input": {"path": "//x"}}):
        resp = await jobs.client.post("/v1/jobs", json=body)
        assert resp.status == 422, body
    batch = {"items": [{"path": "/v1/chat/completions", "body": CHAT}], "parallel_limit": "2"}
    with pytest.raises(AssertionError):
        check(doc, {"$ref": "#/components/schemas/BatchSubmit"}, batch)
    resp = await jobs.client.post("/v1/batches", json=batch)
    assert resp.status == 422
    assert "parallel_limit" in (await resp.json())["error"]["message"]


async def test_answers_conform_to_their_documented_schemas(start_jobs: StartJobs) -> None:
    jobs = await start_jobs(start_runner=False)
    doc = await spec_of(jobs)
    resp = await jobs.client.post("/v1/jobs", json=inference(metadata={"k": 1}))
    check(doc, response_schema(doc, "POST", "/v1/jobs", 202), await resp.json())
    resp = await jobs.client.post("/v1/batches", json={"items": [{"path": "/v1/x"}]})
    batch = await resp.json()
    check(doc, response_schema(doc, "POST", "/v1/batches", 202), batch)
    resp = await jobs.client.get(f"/v1/batches/{batch['id']}")
    check(doc, response_schema(doc, "GET", "/v1/batches/{batch_id}", 200), await resp.json())
    resp = await jobs.client.get(f"/v1/batches/{batch['id']}/items/0")
    assert resp.status == 409
    check(doc, response_schema(doc, "GET", "/v1/batches/{batch_id}/items/{index}", 409), await resp.json())
    resp = await jobs.client.get("/v1/jobs")
    check(doc, response_schema(doc, "GET", "/v1/jobs", 200), await resp.json())
    resp = await jobs.client.get(f"/v1/jobs/{batch['id']}/result")
    check(doc, response_schema(doc, "GET", "/v1/jobs/{job_id}/result", 409), await resp.json())
    resp = await jobs.client.get("/v1/jobs/not-a-uuid")
    assert resp.status == 400
    check(doc, response_schema(doc, "GET", "/v1/jobs/{job_id}", 400), await resp.json())


async def test_docs_page_is_self_contained(start_jobs: StartJobs) -> None:
    jobs = await start_jobs(start_runner=False)
    page = await (await jobs.client.get("/docs")).text()
    # No CDN or any other origin: the page must work offline.
    assert not re.search(r"(src|href)=\"(https?:)?//", page)
    assert "https://" not in page and "http://" not in page
    assert 'fetch("openapi.json"' in page


def test_at_most_matches_exactly_the_numbers_up_to_the_limit() -> None:
    for limit in (0, 7, 10, 99, 305, 1000):
        pattern = re.compile(f"^({at_most(limit)})$")
        width = len(str(limit))
        for n in range(0, 1200):
            for text in {str(n), str(n).zfill(width)}:
                assert bool(pattern.match(text)) == (len(text) <= width and n <= limit), (limit, text)
    biggest = re.compile(f"^({at_most(2**63 - 1)})$")
    assert biggest.match("9223372036854775807") and not biggest.match("9223372036854775808")
    assert not biggest.match("10000000000000000000")
