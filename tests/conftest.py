"""Shared fixtures: real certificates (trustme), free ports, temporary dirs, the process harness."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import trustme

if TYPE_CHECKING:
    from tests.harness import Harness


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--long", action="store_true", default=False, help="run the long (soak) modes")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--long"):
        return
    skip = pytest.mark.skip(reason="long mode: pass --long")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class CertFiles:
    """PEM files on disk for one CA, a server certificate (localhost, 127.0.0.1) and a client certificate."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    authority: trustme.CA


def write_certs(directory: Path, name: str = "receiver") -> CertFiles:
    directory.mkdir(parents=True, exist_ok=True)
    ca = trustme.CA(organization_name=f"pyforward test {name} CA")
    server = ca.issue_cert("localhost", "127.0.0.1", name)
    client = ca.issue_cert("audittailer-client", common_name="audittailer-client")
    files = CertFiles(
        ca=directory / "ca.crt",
        server_cert=directory / "server.crt",
        server_key=directory / "server.key",
        client_cert=directory / "client.crt",
        client_key=directory / "client.key",
        authority=ca,
    )
    ca.cert_pem.write_to_path(str(files.ca))
    server.private_key_pem.write_to_path(str(files.server_key))
    for blob in server.cert_chain_pems:
        blob.write_to_path(str(files.server_cert), append=True)
    client.private_key_pem.write_to_path(str(files.client_key))
    for blob in client.cert_chain_pems:
        blob.write_to_path(str(files.client_cert), append=True)
    for key in (files.server_key, files.client_key):
        key.chmod(0o600)
    return files


@pytest.fixture
def certs(tmp_path: Path) -> CertFiles:
    return write_certs(tmp_path / "certs")


@pytest.fixture
def port() -> int:
    return free_port()


@pytest.fixture
def harness(tmp_path: Path) -> Iterator[Harness]:
    """Real `pyforward receive` / `pyforward run` processes under tmp_path, all stopped in teardown."""
    from tests.harness import harness_at  # (tests/harness.py imports this module)

    with harness_at(tmp_path) as h:
        try:
            yield h
        finally:
            print(h.describe())  # captured: pytest shows it for a failing test only
