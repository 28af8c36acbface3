"""The route table of the jobs API and the OpenAPI 3.1 document generated from it.

Each route is an `Operation`: method, path, handler, parameters, request body and every answer
(status, model, headers). `routes.add_routes` registers the same table with aiohttp, so a route
cannot exist without its documentation. Bodies come from the pydantic models in
`jobs_api.schemas` (`models_json_schema`, OpenAPI 3.1 is JSON Schema 2020-12). Submissions are
documented per app: `type` is one of the registered job types, each with its own input model,
and `priority`/`timeout_s` carry the configured maxima, so a body the schema accepts is one the
service accepts (nesting limits and idempotency-key reuse aside). Pure: builds dicts only.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from jobs_api.schemas import JOB_FIELDS, ErrorBody, JobSubmit

REF = "#/components/schemas/{model}"
SECURITY_SCHEME = "bearerAuth"
ERROR_DESCRIPTIONS: Mapping[int, str] = {
    400: "malformed request: bad JSON, a bad id, parameter or header",
    401: "missing or bad credentials",
    403: "the caller lacks the role this needs (admin)",
    404: "no such job or batch, or one of another tenant",
    408: "the client was too slow to send its request (JOBS_CLIENT_BODY_TIMEOUT_S)",
    409: "the job has already ended",
    413: "the body is larger than JOBS_MAX_INPUT_BYTES",
    415: "a write whose body is not Content-Type: application/json",
    422: (
        "the body is JSON but not a valid submission: wrong types, an unknown field, nesting deeper "
        "than JOBS_MAX_INPUT_DEPTH, or an Idempotency-Key used before with another body"
    ),
    503: (
        "the store is unavailable (for a submission: nothing was stored), or the JWKS endpoint a "
        "token needs cannot be reached"
    ),
}


@dataclass(frozen=True, slots=True)
class Param:
    """One path, query or header parameter."""

    name: str
    location: Literal["path", "query", "header"]
    schema: Mapping[str, Any]
    description: str
    required: bool = False


@dataclass(frozen=True, slots=True)
class Header:
    """A response header."""

    name: str
    description: str
    required: bool = True
    schema: Mapping[str, Any] = field(default_factory=lambda: {"type": "string"})


@dataclass(frozen=True, slots=True)
class Answer:
    """One documented response: a JSON `model`, or another media type with a plain `schema`."""

    status: int
    description: str
    model: type[BaseModel] | None = ErrorBody
    media_type: str = "application/json"
    schema: Mapping[str, Any] | None = None
    headers: tuple[Header, ...] = ()
    uses: tuple[type[BaseModel], ...] = ()  # models a plain `schema` refers to (by class name)


@dataclass(frozen=True, slots=True)
class Operation:
    """A route: what aiohttp serves and what /openapi.json says about it."""

    method: str
    path: str
    handler: Callable[..., Any]
    operation_id: str
    summary: str
    tag: str
    answers: tuple[Answer, ...]
    params: tuple[Param, ...] = ()
    body: str | None = None  # name of the request body's component schema
    description: str = ""
    authenticated: bool = True


def at_most(limit: int) -> str:
    """A regular expression of the decimal numbers 0..`limit` as a client may write them: leading
    zeros allowed, at most as many digits as `limit` has (how `routes.parse_event_id` reads them)."""
    digits = str(limit)
    width = len(digits)
    # Shorter than `limit`: anything. As long: below it at the first digit that differs, or equal.
    alternatives = [f"[0-9]{{1,{width - 1}}}"] if width > 1 else []
    for i, d in enumerate(digits):
        if d != "0":
            rest = width - i - 1
            below = f"[0-{int(d) - 1}]" if d != "1" else "0"
            alternatives.append(digits[:i] + below + (f"[0-9]{{{rest}}}" if rest else ""))
    alternatives.append(digits)
    return "|".join(alternatives)


def errors(*statuses: int) -> tuple[Answer, ...]:
    """The standard error answers `{"error": {"type", "message"}}` for `statuses`."""
    return tuple(Answer(status, ERROR_DESCRIPTIONS[status]) for status in statuses)


@dataclass(frozen=True, slots=True)
class SubmissionLimits:
    """What the configured service accepts beyond the models' own bounds."""

    job_types: Mapping[str, type[BaseModel] | None]  # type name -> input model (None: any object)
    max_priority: int
    max_timeout_s: float
    max_input_depth: int
    batch_input: type[BaseModel]


def _component_name(model: type[BaseModel], mode: str, names: Mapping[tuple[Any, Any], Any]) -> str:
    ref: str = names[(model, mode)]["$ref"]
    return ref.rsplit("/", 1)[1]


def _limit_job_fields(properties: dict[str, Any], limits: SubmissionLimits) -> None:
    properties["priority"]["maximum"] = limits.max_priority
    for branch in properties["timeout_s"]["anyOf"]:
        if branch.get("type") == "number":
            branch["maximum"] = limits.max_timeout_s


def submission_schemas(
    limits: SubmissionLimits, schemas: dict[str, Any], names: Mapping[tuple[Any, Any], Any]
) -> None:
    """Replace `JobSubmit` in `schemas` by one variant per job type; add `BatchSubmit`."""
    base = schemas.pop(_component_name(JobSubmit, "validation", names))
    _limit_job_fields(base["properties"], limits)
    variants: dict[str, str] = {}
    for type_name, model in sorted(limits.job_types.items()):
        variant = copy.deepcopy(base)
        variant["title"] = f"JobSubmit ({type_name})"
        variant["properties"]["type"] = {"const": type_name, "type": "string"}
        if model is not None:
            ref = {"$ref": REF.format(model=_component_name(model, "validation", names))}
            variant["properties"]["input"] = {**ref, "description": f"the input of a job of type {type_name}"}
        name = f"JobSubmit.{type_name}"
        schemas[name] = variant
        variants[type_name] = REF.format(model=name)
    schemas["JobSubmit"] = {
        "title": "JobSubmit",
        "description": (
            "A job: one variant per registered type. `input`, `metadata` and batch items may nest "
            f"at most {limits.max_input_depth} levels of lists and objects (JOBS_MAX_INPUT_DEPTH)."
        ),
        "oneOf": [{"$ref": ref} for ref in variants.values()],
        "discriminator": {"propertyName": "type", "mapping": variants},
    }
    batch = copy.deepcopy(schemas[_component_name(limits.batch_input, "validation", names)])
    batch["title"] = "BatchSubmit"
    batch["description"] = (
        "A batch job's input plus the job fields (priority, max_attempts, timeout_s, metadata)."
    )
    batch["properties"].update({name: copy.deepcopy(base["properties"][name]) for name in JOB_FIELDS})
    schemas["BatchSubmit"] = batch


def _parameter(param: Param) -> dict[str, Any]:
    out: dict[str, Any] = {
        "name": param.name,
        "in": param.location,
        "description": param.description,
        "required": param.required or param.location == "path",
        "schema": dict(param.schema),
    }
    return out


def _response(answer: Answer, names: Mapping[tuple[Any, Any], Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"description": answer.description}
    if answer.schema is not None:
        out["content"] = {answer.media_type: {"schema": dict(answer.schema)}}
    elif answer.model is not None:
        ref = REF.format(model=_component_name(answer.model, "serialization", names))
        out["content"] = {answer.media_type: {"schema": {"$ref": ref}}}
    if answer.headers:
        out["headers"] = {
            h.name: {"description": h.description, "required": h.required, "schema": dict(h.schema)}
            for h in answer.headers
        }
    return out


def _operation(op: Operation, names: Mapping[tuple[Any, Any], Any], secured: bool) -> dict[str, Any]:
    out: dict[str, Any] = {"operationId": op.operation_id, "summary": op.summary, "tags": [op.tag]}
    if op.description:
        out["description"] = op.description
    if op.params:
        out["parameters"] = [_parameter(p) for p in op.params]
    if op.body is not None:
        out["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": REF.format(model=op.body)}}},
        }
    out["responses"] = {str(a.status): _response(a, names) for a in op.answers}
    if not op.authenticated:
        out["security"] = []
    elif secured:
        out["security"] = [{SECURITY_SCHEME: []}]
    return out


def build_document(
    operations: Iterable[Operation],
    limits: SubmissionLimits,
    *,
    title: str,
    version: str,
    description: str,
    secured: bool,
    links: Mapping[tuple[str, str, int], Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    """The OpenAPI 3.1 document of `operations`.

    `secured` (credentials are configured) puts bearer auth on every authenticated operation;
    `links` adds OpenAPI links to answers, keyed by (method, path, status).
    """
    ops = list(operations)
    answer_models = {a.model for op in ops for a in op.answers if a.model is not None and a.schema is None}
    answer_models |= {m for op in ops for a in op.answers for m in a.uses}
    inputs = {m for m in limits.job_types.values() if m is not None} | {limits.batch_input}
    keyed: list[tuple[type[BaseModel], Literal["validation", "serialization"]]] = [
        (JobSubmit, "validation"),
        *((m, "validation") for m in sorted(inputs, key=lambda m: m.__qualname__)),
        *((m, "serialization") for m in sorted(answer_models, key=lambda m: m.__qualname__)),
    ]
    names, defs = models_json_schema(keyed, ref_template=REF)
    for model in {m for op in ops for a in op.answers for m in a.uses}:
        # A plain schema names its models by class name: that must be their component's name.
        assert _component_name(model, "serialization", names) == model.__name__, model
    schemas: dict[str, Any] = dict(defs.get("$defs", {}))
    submission_schemas(limits, schemas, names)
    paths: dict[str, dict[str, Any]] = {}
    for op in ops:
        item = _operation(op, names, secured)
        for answer in op.answers:
            link = (links or {}).get((op.method, op.path, answer.status))
            if link:
                item["responses"][str(answer.status)]["links"] = dict(link)
        paths.setdefault(op.path, {})[op.method.lower()] = item
    doc: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {"title": title, "version": version, "description": description},
        "paths": paths,
        "components": {"schemas": dict(sorted(schemas.items()))},
    }
    if secured:
        doc["components"]["securitySchemes"] = {
            SECURITY_SCHEME: {
                "type": "http",
                "scheme": "bearer",
                "description": "an API key of JOBS_API_KEYS, or a JWT",
            }
        }
    return doc
