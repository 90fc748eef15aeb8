# syntax=docker/dockerfile:1
#
# Ara Notification Service image.
#
#   docker build -t ara-notify:0.1.0 .
#   docker run --rm -p 8081:8081 ara-notify:0.1.0 serve      # embedded single node
#   docker run --rm ara-notify:0.1.0 gateway|router|migrate  # cluster roles (need REDIS_URL, DATABASE_URL)
#
# Stage 1 builds the project wheel and installs it with its dependencies into a
# virtualenv; stage 2 copies only that virtualenv onto a clean slim image and runs
# it as an unprivileged user. Both stages use the same base image, so the venv's
# interpreter path (/usr/local/bin/python3) is identical in both.

ARG PYTHON_IMAGE=python:3.11-slim

# --------------------------------------------------------------------------- build
FROM ${PYTHON_IMAGE} AS build

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1

WORKDIR /src

# Build tooling in its own venv so it never ends up in the runtime image.
RUN python -m venv /opt/buildenv \
 && /opt/buildenv/bin/pip install "build>=1.2" "setuptools>=69" wheel

# Only what the wheel needs (see .dockerignore).
COPY pyproject.toml README.md ./
COPY common ./common
COPY gateway ./gateway
COPY router ./router

RUN /opt/buildenv/bin/python -m build --wheel --outdir /dist .

# The runtime virtualenv: the project wheel plus its dependencies.
RUN python -m venv /opt/venv \
 && /opt/venv/bin/pip install --upgrade pip \
 && /opt/venv/bin/pip install /dist/*.whl \
 && /opt/venv/bin/python -c "import common, gateway, router"

# ------------------------------------------------------------------------- runtime
FROM ${PYTHON_IMAGE} AS runtime

LABEL org.opencontainers.image.title="ara-notify" \
      org.opencontainers.image.description="Ara Notification Service: WebSocket/SSE notifications, embedded or clustered" \
      org.opencontainers.image.licenses="Apache-2.0"

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    SERVER_HOST=0.0.0.0 \
    SERVER_PORT=8081 \
    SQLITE_PATH=/data/ara.sqlite3

# Fixed numeric uid/gid so Kubernetes can verify runAsNonRoot.
RUN groupadd --system --gid 10001 ara \
 && useradd --system --uid 10001 --gid 10001 --home-dir /home/ara --create-home \
        --shell /usr/sbin/nologin ara \
 && mkdir -p /data \
 && chown 10001:10001 /data

COPY --from=build /opt/venv /opt/venv

USER 10001:10001
WORKDIR /home/ara

EXPOSE 8081

# No curl in the slim image: probe /health with the standard library.
# (Any non-2xx answer or connection error makes urlopen raise -> exit status 1.)
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; r = urllib.request.urlopen('http://127.0.0.1:8081/health', timeout=3); sys.exit(0 if r.status == 200 else 1)"]

ENTRYPOINT ["ara-notify"]
CMD ["gateway"]
