"""Opt-in OpenTelemetry traces: one span per request, one per attempt, W3C trace context.

Off by default, and then the proxy holds no tracer at all (`None`), so tracing costs one `is
None` test per request. On (`tracing.otlp_endpoint`), spans go to an OTLP/HTTP endpoint in
batches from a background thread, sampled with `tracing.sample_ratio` (parent-based: a client's
sampled `traceparent` is honoured). A client's `traceparent` is accepted and continued; each
attempt's upstream request carries a `traceparent` of its own attempt span. Attributes follow
the OpenTelemetry GenAI and HTTP conventions: `gen_ai.request.model`, `gen_ai.response.model`,
`gen_ai.usage.input_tokens`, `gen_ai.usage.output_tokens`, `server.address`, `server.port`,
`http.request.method`, `http.response.status_code`, `url.path`.
The OpenTelemetry packages are an optional dependency (`pip install failover-gateway[otel]`).
"""

from __future__ import annotations

from typing import Any

from gateway.config import TracingSettings
from gateway.metrics import gateway_version


class Tracing:
    """The tracer of one gateway process, with the W3C propagator."""

    def __init__(self, settings: TracingSettings) -> None:
        # Imported here: the packages are optional, and only needed when tracing is on.
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
        from opentelemetry.trace import SpanKind, set_span_in_context
        from opentelemetry.trace.propagation.tracecontext import (
            TraceContextTextMapPropagator,
        )

        assert settings.otlp_endpoint is not None
        resource = Resource.create(
            {"service.name": settings.service_name, "service.version": gateway_version()}
        )
        self._provider = TracerProvider(
            resource=resource, sampler=ParentBased(TraceIdRatioBased(settings.sample_ratio))
        )
        exporter = OTLPSpanExporter(endpoint=settings.otlp_endpoint, timeout=settings.export_timeout_s)
        self._provider.add_span_processor(BatchSpanProcessor(exporter))
        self._tracer = self._provider.get_tracer("failover-gateway", gateway_version())
        self._propagator = TraceContextTextMapPropagator()
        self._server = SpanKind.SERVER
        self._client = SpanKind.CLIENT
        self._in_context = set_span_in_context

    def request_span(
        self, traceparent: bytes | None, tracestate: bytes | None, attributes: dict[str, Any]
    ) -> Any:
        """Start the span of one request, continuing the client's trace if it sent one."""
        carrier = {}
        if traceparent:
            carrier["traceparent"] = traceparent.decode("latin-1")
            if tracestate:
                carrier["tracestate"] = tracestate.decode("latin-1")
        context = self._propagator.extract(carrier) if carrier else None
        return self._tracer.start_span(
            "gateway request", context=context, kind=self._server, attributes=attributes
        )

    def attempt_span(self, parent: Any, attributes: dict[str, Any]) -> tuple[Any, bytes]:
        """Start an attempt's span under `parent`; returns it and the header lines to send upstream."""
        span = self._tracer.start_span(
            "gateway attempt", context=self._in_context(parent), kind=self._client, attributes=attributes
        )
        carrier: dict[str, str] = {}
        self._propagator.inject(carrier, context=self._in_context(span))
        lines = b"".join(f"{k}: {v}\r\n".encode("latin-1") for k, v in carrier.items())
        return span, lines

    def flush(self) -> None:
        """Send what is buffered now (blocks: call it off the event loop)."""
        self._provider.force_flush()

    def shutdown(self) -> None:
        """Send what is buffered and stop the exporter."""
        self._provider.force_flush()
        self._provider.shutdown()
