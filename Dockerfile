# syntax=docker/dockerfile:1
# One image, two commands: `gateway` (default) and `jobs-api`.
#   docker build -t failover-gateway .
#   docker run -e GATEWAY_UPSTREAMS='[{"name":"a","url":"http://vllm:8000"}]' -p 8080:8080 -p 9901:9901 failover-gateway
#   docker run -e HEALTHCHECK_URL=http://127.0.0.1:8081/healthz -p 8081:8081 -v jobs:/data failover-gateway jobs-api
# tests/deploy/test_dockerfile.py replays the build stage's install steps in a fresh virtualenv.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
# A virtualenv is copied whole into the final stage (and works on Debian-style bases too).
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
# Dependencies first (with the optional OpenTelemetry ones), in their own layer: it is rebuilt
# only when pyproject.toml changes.
COPY pyproject.toml ./
RUN python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; print('\n'.join(p['dependencies'] + p['optional-dependencies']['otel']))" > requirements.txt \
    && pip install -r requirements.txt
# Then the source; --no-deps keeps this layer to the project itself.
COPY README.md ./
COPY gateway ./gateway
COPY jobs_api ./jobs_api
RUN pip install --no-deps . \
    && python -m compileall -q /opt/venv

FROM ${PYTHON_IMAGE} AS final
LABEL org.opencontainers.image.title="failover-gateway" \
      org.opencontainers.image.description="Failover reverse proxy for AI inference endpoints, with a durable jobs API" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 10001 app \
    && useradd --system --uid 10001 --gid app --home-dir /data --no-create-home --shell /usr/sbin/nologin app \
    && mkdir -p /data \
    && chown app:app /data
COPY --from=build /opt/venv /opt/venv
# Listen on all interfaces inside the container; SQLite lives on the /data volume.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    GATEWAY_HOST=0.0.0.0 \
    GATEWAY_ADMIN_HOST=0.0.0.0 \
    JOBS_HOST=0.0.0.0 \
    JOBS_STORE=sqlite:////data/jobs.db \
    HEALTHCHECK_URL=http://127.0.0.1:9901/healthz
WORKDIR /data
USER 10001:10001
EXPOSE 8080 9901 8081
# No curl in the slim image: the check uses the interpreter that is already there.
HEALTHCHECK --interval=15s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen(os.environ['HEALTHCHECK_URL'], timeout=2)"]
# Exec form: the Python process is PID 1 and gets SIGTERM itself; both commands drain on it.
STOPSIGNAL SIGTERM
CMD ["gateway"]
