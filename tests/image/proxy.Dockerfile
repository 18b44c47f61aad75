# socat + tinyproxy for the container tests' HTTP CONNECT proxies: konnectivity's Unix socket (socat UNIX-LISTEN
# in front of tinyproxy) and the mTLS proxy (socat OPENSSL-LISTEN in front of tinyproxy), as kind/proxy does
# with alpine. Built from the same locally made Debian base as the pyforward image (no registry here):
#   docker build --network host --build-arg BASE_IMAGE=pyforward-test-base:bookworm-... -f proxy.Dockerfile .
ARG BASE_IMAGE=pyforward-test-base
FROM ${BASE_IMAGE}
# policy-rc.d: the package scripts must not start tinyproxy inside the build (with the host network it would
# take port 8888 on the machine). Versions float with bookworm: this is a test fixture.
# hadolint ignore=DL3008
RUN printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d \
    && chmod 0755 /usr/sbin/policy-rc.d \
    && apt-get update -qq \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends socat tinyproxy >/dev/null \
    && rm -rf /var/lib/apt/lists/* /usr/sbin/policy-rc.d
USER 65532:65532
CMD ["tinyproxy", "-d", "-c", "/etc/tinyproxy/tinyproxy.conf"]
