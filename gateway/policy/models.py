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


_KEY = b'"model"'
_SPACE = b" \t\r\n"


def rewrite_model(body: bytes | bytearray, field: ModelField, new: str) -> bytes:
    """`body` with its top-level model set to `new`, every other byte left alone where possible.

    The value is replaced in place when `"model"` occurs once in the body, followed by a colon
    and the old value written as orjson writes it (a nested `"model"` key, or another spelling of
    the value, would make that unsafe); otherwise the body is re-serialised.
    """
    old = field.value
    if old == new:
        return bytes(body)
    data = bytes(body)
    at = data.find(_KEY)
    if at != -1 and data.find(_KEY, at + len(_KEY)) == -1:
        i = at + len(_KEY)
        while i < len(data) and data[i] in _SPACE:
            i += 1
        if i < len(data) and data[i] == 0x3A:  # ':'
            i += 1
            while i < len(data) and data[i] in _SPACE:
                i += 1
            value = orjson.dumps(old)
            if data.startswith(value, i):
                return data[:i] + orjson.dumps(new) + data[i + len(value) :]
    return orjson.dumps({**field.parsed, "model": new})


class ModelRouting:
    """The model map of one gateway."""

    __slots__ = ("_aliases", "_chains", "_fallbacks", "_maps", "_served", "enabled", "labels", "wildcards")

    def __init__(self, settings: GatewaySettings) -> None:
        self._maps: tuple[dict[str, str] | None, ...] = tuple(up.models for up in settings.upstreams)
        self.enabled = any(m is not None for m in self._maps)
        self.wildcards = any(m is None for m in self._maps)  # some upstream serves every model
        self._aliases = dict(settings.model_aliases)
        self._fallbacks = {k: tuple(v) for k, v in settings.model_fallbacks.items()}
        self._served = frozenset(name for m in self._maps if m is not None for name in m)
        self.labels = frozenset(self._served | set(self._aliases))
        # Each model's chain, worked out once: this runs for every routed request.
        self._chains = {m: self._chain(m) for m in self._served}

    def resolve(self, asked: str) -> str:
        """The model an asked-for name means (aliases resolved)."""
        return self._aliases.get(asked, asked)

    def known(self, model: str) -> bool:
        """True when some upstream serves `model` (declared, or an upstream serving everything)."""
        return self.wildcards or model in self._served

    def chain(self, model: str) -> tuple[str, ...]:
        """`model` and its fallbacks, in the order they are tried; unknown fallbacks left out."""
        chain = self._chains.get(model)
        return self._chain(model) if chain is None else chain

    def _chain(self, model: str) -> tuple[str, ...]:
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
