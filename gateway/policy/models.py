"""Model routing: which upstreams serve a model, under which name, and what to fall back to.

Upstreams may declare `models`, a map from the name clients ask for to the name the upstream
wants (a list is the identity map); one without `models` serves every model. A request's model
is resolved through `model_aliases` first, then served by the upstreams that declare it (and
those that serve everything), then by its `model_fallbacks` in order. Only the top-level `model`
field of a JSON body is read, and a rewrite touches only that value when it can be found once,
verbatim; otherwise the body is re-serialised. Metrics label models by configured names only.
Pure: settings and bytes in, decisions and bytes out.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import orjson

from gateway.config import GatewaySettings

OTHER = "other"  # the metric label of any model name not in the configuration


@dataclass(frozen=True, slots=True)
class ModelField:
    """The top-level `model` of a JSON object body."""

    parsed: dict[str, Any]
    value: Any  # None when absent


def read_model(body: bytes | bytearray) -> ModelField | None:
    """The body's `model` field, or None when the body is not a JSON object."""
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(parsed, dict):
        return None
    return ModelField(parsed, parsed.get("model"))


def rewrite_model(body: bytes | bytearray, field: ModelField, new: str) -> bytes:
    """`body` with its top-level model set to `new`, every other byte left alone where possible."""
    old = field.value
    if old == new:
        return bytes(body)
    pattern = re.compile(rb'"model"\s*:\s*' + re.escape(orjson.dumps(old)))
    found = pattern.findall(body)
    if len(found) == 1:  # only the top-level key: a nested one would match as well
        return pattern.sub(lambda _: b'"model":' + orjson.dumps(new), bytes(body), count=1)
    return orjson.dumps({**field.parsed, "model": new})


class ModelRouting:
    """The model map of one gateway."""

    __slots__ = ("_aliases", "_fallbacks", "_maps", "enabled", "labels", "wildcards")

    def __init__(self, settings: GatewaySettings) -> None:
        self._maps: tuple[dict[str, str] | None, ...] = tuple(up.models for up in settings.upstreams)
        self.enabled = any(m is not None for m in self._maps)
        self.wildcards = any(m is None for m in self._maps)  # some upstream serves every model
        self._aliases = dict(settings.model_aliases)
        self._fallbacks = {k: tuple(v) for k, v in settings.model_fallbacks.items()}
        served = {name for m in self._maps if m is not None for name in m}
        self.labels = frozenset(served | set(self._aliases))

    def resolve(self, asked: str) -> str:
        """The model an asked-for name means (aliases resolved)."""
        return self._aliases.get(asked, asked)

    def known(self, model: str) -> bool:
        """True when some upstream serves `model` (declared, or an upstream serving everything)."""
        return self.wildcards or any(m is not None and model in m for m in self._maps)

    def chain(self, model: str) -> tuple[str, ...]:
        """`model` and its fallbacks, in the order they are tried; unknown fallbacks left out."""
        fallbacks = [self.resolve(f) for f in self._fallbacks.get(model, ())]
        return tuple(dict.fromkeys([model, *(f for f in fallbacks if self.known(f))]))

    def serves(self, index: int, model: str) -> bool:
        """Whether upstream `index` serves `model`."""
        models = self._maps[index]
        return models is None or model in models

    def upstream_name(self, index: int, model: str) -> str:
        """The name upstream `index` wants for `model`."""
        models = self._maps[index]
        return model if models is None else models.get(model, model)

    def label(self, name: str | None) -> str:
        """A bounded metric label for a model name."""
        if name is None:
            return ""
        return name if name in self.labels else OTHER

    def listing(self) -> dict[str, Any]:
        """The `/v1/models` answer: every configured model and alias, in OpenAI's list shape."""
        names = sorted(self.labels)
        data = [{"id": n, "object": "model", "created": 0, "owned_by": "failover-gateway"} for n in names]
        return {"object": "list", "data": data}
