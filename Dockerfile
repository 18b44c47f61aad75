# syntax=docker/dockerfile:1
# pyforward: the kube-apiserver audit-log sidecar.
#
#   docker build -t pyforward:0.1.0 .
#   docker build --build-arg PYTHON_VERSION=3.11 --build-arg VERSION=0.1.0 --build-arg REVISION="$(git rev-parse HEAD)" .
#
# Needs BuildKit (the default since Docker 23; `RUN --mount` below). Builder and runtime use the same base image,
# so the wheels built here (and the venv's interpreter path) match the runtime. Every dependency ships manylinux
# wheels for amd64 and arm64, so neither stage needs a compiler.

ARG PYTHON_VERSION=3.12
# Pin by digest in the release pipeline: python:3.12-slim-bookworm@sha256:...
ARG BASE_IMAGE=python:${PYTHON_VERSION}-slim-bookworm

# --- builder: the project's wheel and every dependency's wheel -------------------------------------------------
FROM ${BASE_IMAGE} AS builder
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore
WORKDIR /src
COPY . .
# Extras: "kubernetes" is kept for compatibility and is empty (kubernetes-asyncio, for discovery of the receiver
# Service and the certificate Secret, is a dependency now). "fast" (uvloop, +14 MB) only pays off once the CLI
# installs uvloop's event loop policy.
ARG EXTRAS=kubernetes
RUN pip wheel --wheel-dir /wheels ".[${EXTRAS}]"

# --- runtime: a venv with only what pyforward needs ----------------------------------------------------------
FROM ${BASE_IMAGE} AS runtime
ARG EXTRAS=kubernetes
ARG VERSION=0.1.0
ARG REVISION=unknown
# The repository URL, from the release pipeline: --build-arg SOURCE_URL=https://...
ARG SOURCE_URL=""
LABEL org.opencontainers.image.title="pyforward" \
      org.opencontainers.image.description="Fluentd Forward-protocol shipper for the kube-apiserver audit log: tails the rotated log, ships every event acked over TCP, mTLS or HTTP CONNECT proxies." \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="${SOURCE_URL}"
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore
# The wheels are bind-mounted from the builder, never copied: no wheel and no pip cache stays in a layer. The venv
# is created without pip (the base image's pip installs into it), so the image carries no second pip. Installing
# offline (--no-index) from exactly the wheels built above makes the image reproducible from the builder stage.
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    python -m venv --without-pip /opt/pyforward \
    && pip --python /opt/pyforward/bin/python install --no-cache-dir --no-index --find-links=/wheels \
        "$(find /wheels -name 'pyforward-*.whl' -print -quit)[${EXTRAS}]" \
    && /opt/pyforward/bin/pyforward --version
# MALLOC_ARENA_MAX=2: glibc's per-thread arenas cost 1-3 MB of RSS for nothing here (bench/README.md).
ENV PATH=/opt/pyforward/bin:$PATH \
    MALLOC_ARENA_MAX=2 \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp
# 65532: the conventional "nonroot" uid (distroless). Numeric, so that runAsNonRoot can verify it.
# Note: kube-apiserver creates its audit log with mode 0600; the pod must run this container with the
# apiserver's uid (or give the file a group it can read), see docs/operations.md.
USER 65532:65532
WORKDIR /tmp
ENTRYPOINT ["pyforward"]
CMD ["run"]
