"""Before any attempt: who is calling (callers), and which model, so which upstreams (models).

Runs only when `callers` or upstream `models` are configured; the plain path never comes here.
Order, each refusal a JSON error that is never forwarded: a missing or unknown caller key (401),
the body's model (400 when it is missing or not a string, 404 when no upstream serves it), a
model outside the caller's list (403), the caller's limits (429 with Retry-After).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import orjson

from gateway.config import GatewaySettings
from gateway.errors import BadRequest, CallerLimited, ModelNotAllowed, ModelNotFound, Unauthorized
from gateway.policy.callers import Caller, Callers, presented_key
from gateway.policy.models import ModelField, ModelRouting, read_model, rewrite_model
from gateway.policy.upstreams import Upstream

_MODELS_PATHS = frozenset({"/v1/models", "/models"})


@dataclass(slots=True)
class ModelRoute:
    """The model a request is being served as: the asked-for one, then its fallbacks in turn."""

    routing: ModelRouting
    asked: str
    chain: tuple[str, ...]
    found: ModelField
    body: bytes
    at: int = 0
    _bodies: dict[str, bytes] = field(default_factory=dict)

    @property
    def model(self) -> str:
        """The model being tried now (its client-facing name)."""
        return self.chain[self.at]

    @property
    def has_fallback(self) -> bool:
        """True while a fallback model is left."""
        return self.at + 1 < len(self.chain)

    def accepts(self, up: Upstream) -> bool:
        """Whether `up` serves the model being tried."""
        return self.routing.serves(up.index, self.model)

    def body_for(self, up: Upstream) -> bytes:
        """The request body for `up`: its name for the model written into `model`."""
        name = self.routing.upstream_name(up.index, self.model)
        body = self._bodies.get(name)
        if body is None:
            body = self._bodies[name] = rewrite_model(self.body, self.found, name)
        return body


@dataclass(slots=True)
class Admitted:
    """What admission found out about one request."""

    caller: Caller | None = None
    route: ModelRoute | None = None


class Admission:
    """The callers and the model map of one gateway."""

    __slots__ = ("callers", "models")

    def __init__(self, settings: GatewaySettings, now: float) -> None:
        routing = ModelRouting(settings)
        self.models = routing if routing.enabled else None
        self.callers = Callers(settings.callers, now) if settings.callers else None

    @property
    def needed(self) -> bool:
        """False on the plain path (no callers, no models)."""
        return self.models is not None or self.callers is not None

    def listing(self, method: bytes, path: str) -> bytes | None:
        """The gateway's own `/v1/models` answer, when models are declared."""
        if self.models is None or method != b"GET" or path not in _MODELS_PATHS:
            return None
        return orjson.dumps(self.models.listing())

    def identify(self, authorization: bytes | None, api_key: bytes | None) -> Caller | None:
        """The caller presenting this key; Unauthorized when callers are set and it is unknown."""
        if self.callers is None:
            return None
        caller = self.callers.identify(presented_key(authorization, api_key))
        if caller is None:
            raise Unauthorized(
                "this gateway needs a caller key: send Authorization: Bearer <key> (or api-key: <key>)"
            )
        return caller

    def route(self, method: bytes, body: bytes | bytearray | None, replayable: bool) -> ModelRoute | None:
        """The model route of a request; None when it does not route by model."""
        models = self.models
        if models is None or method != b"POST" or body is None:
            return None
        if not replayable:
            raise BadRequest("the request body is too large to read its model; send a smaller body")
        found = read_model(body)
        if found is None:
            return None  # not a JSON object: nothing to route by
        asked = found.value
        if not isinstance(asked, str) or not asked:
            raise BadRequest('the request body needs a "model" string to route by')
        model = models.resolve(asked)
        if not models.known(model):
            raise ModelNotFound(f"the model {asked!r} is not served by this gateway")
        return ModelRoute(models, asked, models.chain(model), found, bytes(body))

    @staticmethod
    def check_caller(caller: Caller, route: ModelRoute | None, now: float) -> None:
        """Refuse a model outside the caller's list, or a caller over its limits."""
        if route is not None and not caller.may_use(route.asked, route.model):
            raise ModelNotAllowed(f"caller {caller.name!r} may not use the model {route.asked!r}")
        wait = Callers.over_limit(caller, now)
        if wait is not None:
            if wait == 0.0:
                raise CallerLimited(
                    f"caller {caller.name!r} has {caller.max_inflight} requests in flight already",
                    retry_after_s=1.0,
                )
            raise CallerLimited(
                f"caller {caller.name!r} is over its requests_per_minute", retry_after_s=math.ceil(wait)
            )
