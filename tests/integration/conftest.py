"""Fixtures of the end-to-end tests: the process harness (tests/harness.py) and real proxies (tests/proxies.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import CertFiles, write_certs
from tests.proxies import Proxies, proxies_at


@pytest.fixture
def proxies(tmp_path: Path) -> Iterator[Proxies]:
    """Real proxies (tests/proxies.py): tinyproxy, socat Unix-socket and mTLS fronts; all stopped in teardown."""
    with proxies_at(tmp_path / "proxies") as p:
        try:
            yield p
        finally:
            print(p.describe())


@pytest.fixture
def proxy_certs(tmp_path: Path) -> CertFiles:
    """A separate PKI for the proxy (vpn-seed-server): its server cert and our client cert for it."""
    return write_certs(tmp_path / "proxy", "proxy")
