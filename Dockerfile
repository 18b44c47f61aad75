# pyforward: the kube-apiserver audit-log sidecar.
#
#   docker build -t pyforward:dev .
#   docker build --build-arg PYTHON_VERSION=3.11 --build-arg VERSION=0.1.0 --build-arg REVISION="$(git rev-parse HEAD)" .
#   docker build --secret id=extra-ca,src=/usr/local/share/ca-certificates/corp.crt .   # TLS-intercepting network
#
# Needs BuildKit (the default since Docker 23; `RUN --mount` below), and only its built-in Dockerfile frontend:
# no `# syntax=` line, which would make BuildKit pull a frontend image and fail without a registry (issue 13).
# Builder and runtime use the same base image, so the wheels built here (and the venv's interpreter path) match
# the runtime. Every dependency ships manylinux wheels for amd64 and arm64, so neither stage needs a compiler.
# tests/image builds this file as it is (with BASE_IMAGE set to a locally made Debian base) and runs it.

ARG PYTHON_VERSION=3.12
# Pin by digest in the release pipeline: python:3.12-slim-bookworm@sha256:...
ARG BASE_IMAGE=python:${PYTHON_VERSION}-slim-bookworm
# The version of the wheel built here and of the image's label. The build context has no .git (.dockerignore), so
# setuptools-scm cannot read the tag: the release workflow passes it (the tag without its v); without it the
# image says it does not know, as a build from a tree without git does (pyproject.toml's fallback_version).
ARG VERSION=0.0.0+unknown

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
ARG VERSION
# Only pyforward's version is pretended (the _FOR_PYFORWARD form): a dependency built from an sdist with
# setuptools-scm keeps its own.
ENV SETUPTOOLS_SCM_PRETEND_VERSION_FOR_PYFORWARD=${VERSION}
# Extra CA certificates for a build network that intercepts TLS (a corporate proxy) or a private index with its
# own CA: a PEM bundle given as the BuildKit secret "extra-ca" (`--secret id=extra-ca,src=FILE`). pip trusts it
# in addition to the base image's CAs. A secret is mounted for one RUN only: it is in no layer and not in the
# image (to trust it at run time as well, see EXTRA_CA_IN_IMAGE below).
RUN --mount=type=secret,id=extra-ca,required=false \
    if [ -s /run/secrets/extra-ca ]; then \
        cat /etc/ssl/certs/ca-certificates.crt /run/secrets/extra-ca > /tmp/pip-ca.pem \
        && export PIP_CERT=/tmp/pip-ca.pem; \
    fi \
    && pip wheel --wheel-dir /wheels ".${EXTRAS:+[${EXTRAS}]}" \
    && rm -f /tmp/pip-ca.pem

# --- runtime: a venv with only what pyforward needs ----------------------------------------------------------
FROM ${BASE_IMAGE} AS runtime
ARG EXTRAS=kubernetes
ARG VERSION
# The commit and the repository URL, from the release workflow (.github/workflows/release.yml).
ARG REVISION=unknown
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
# EXTRA_CA_IN_IMAGE=true: also add the "extra-ca" secret to the image's trust store (a receiver or proxy whose
# certificate chains to that CA, with no PYFORWARD_TLS_CA_FILE / PYFORWARD_PROXY_CA_FILE). Off by default.
ARG EXTRA_CA_IN_IMAGE=false
# The wheels are bind-mounted from the builder, never copied: no wheel and no pip cache stays in a layer. The venv
# is created without pip (the base image's pip installs into it), so the image carries no second pip. Installing
# offline (--no-index) from exactly the wheels built above makes the image reproducible from the builder stage.
# Then what `pyforward run` never loads goes: type stubs (*.pyi: 4 MB, kubernetes_asyncio's), the dependencies'
# own tests and the README/CHANGELOG kubernetes_asyncio drops into site-packages. Licenses and .pyc files stay
# (with a read-only root filesystem, modules without .pyc would be compiled again at every start).
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    --mount=type=secret,id=extra-ca,required=false \
    if [ "${EXTRA_CA_IN_IMAGE}" = true ]; then \
        test -s /run/secrets/extra-ca || { echo "EXTRA_CA_IN_IMAGE=true needs --secret id=extra-ca,src=FILE" >&2; exit 1; }; \
        cp /run/secrets/extra-ca /usr/local/share/ca-certificates/pyforward-extra-ca.crt \
        && update-ca-certificates >/dev/null || exit 1; \
    fi \
    && python -m venv --without-pip /opt/pyforward \
    && pip --python /opt/pyforward/bin/python install --no-cache-dir --no-index --find-links=/wheels \
        "$(find /wheels -name 'pyforward-*.whl' -print -quit)${EXTRAS:+[${EXTRAS}]}" \
    && site="$(/opt/pyforward/bin/python -c 'import sysconfig; print(sysconfig.get_path("purelib"))')" \
    && find "$site" -name '*.pyi' -delete \
    && find "$site" -mindepth 2 -maxdepth 2 -type d \( -name tests -o -name test \) -prune -exec rm -rf {} + \
    && rm -f "$site/README.md" "$site/CHANGELOG.md" "$site/CONTRIBUTING.md" "$site/pyproject.toml" \
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
