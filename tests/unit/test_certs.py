"""TLSMaterial: validation, contexts, and reload from a Kubernetes-style Secret volume (real files)."""

from __future__ import annotations

import logging
import os
import ssl
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import trustme
from cryptography.hazmat.primitives import serialization

from pyforward.certs import CertError, TLSFiles, TLSMaterial
from tests.conftest import CertFiles

PASSWORD = "s3cret-Passw0rd"


# -- a Secret volume as kubelet writes it ----------------------------------------------------------------


class SecretVolume:
    """``<dir>/tls.crt -> ..data/tls.crt``, ``..data -> ..<n>``; updates swap ``..data`` atomically.

    This is kubelet's AtomicWriter: the visible file names never change, the resolved paths do.
    """

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self._n = 0

    def path(self, name: str) -> Path:
        return self.dir / name

    def write(self, files: dict[str, bytes], mode: int = 0o600) -> None:
        self._n += 1
        payload = self.dir / f"..2024_01_01_00_00_{self._n:02d}.000000001"
        payload.mkdir()
        for name, data in files.items():
            (payload / name).write_bytes(data)
            (payload / name).chmod(mode)
        tmp_link = self.dir / "..data_tmp"
        tmp_link.symlink_to(payload.name)
        os.replace(tmp_link, self.dir / "..data")  # the atomic swap
        for name in files:
            link = self.dir / name
            if not link.is_symlink():
                link.symlink_to(Path("..data") / name)


def pem(blob: trustme.Blob) -> bytes:
    return blob.bytes()


def leaf_files(
    ca: trustme.CA, common_name: str, not_before: datetime | None = None, not_after: datetime | None = None
) -> dict[str, bytes]:
    leaf = ca.issue_cert(common_name, common_name=common_name, not_before=not_before, not_after=not_after)
    return {
        "ca.crt": pem(ca.cert_pem),
        "tls.crt": b"".join(pem(b) for b in leaf.cert_chain_pems),
        "tls.key": pem(leaf.private_key_pem),
    }


def volume_material(vol: SecretVolume, **kwargs: object) -> TLSMaterial:
    files = TLSFiles(ca_file=vol.path("ca.crt"), cert_file=vol.path("tls.crt"), key_file=vol.path("tls.key"))
    return TLSMaterial(files, purpose="client", check_interval=0, **kwargs)  # type: ignore[arg-type]


def records(caplog: pytest.LogCaptureFixture, level: int) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == level and r.name == "pyforward.certs"]


@pytest.fixture
def ca() -> trustme.CA:
    return trustme.CA(organization_name="pyforward unit CA")


# -- contexts --------------------------------------------------------------------------------------------


def test_client_context_verifies_and_carries_client_cert(certs: CertFiles) -> None:
    material = TLSMaterial(
        TLSFiles(ca_file=certs.ca, cert_file=certs.client_cert, key_file=certs.client_key), purpose="client"
    )
    material.load()
    context = material.context()
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert context.check_hostname is True
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2
    assert len(context.get_ca_certs()) == 1
    assert material.generation == 1
    assert material.certificate is not None
    assert "CN=audittailer-client" in material.certificate.subject
    assert "pyforward test receiver CA" in material.certificate.issuer
    assert material.certificate.path == str(certs.client_cert)
    assert [info.issuer for info in material.ca] == [material.certificate.issuer]
    remaining = material.seconds_to_expiry()
    assert remaining is not None
    assert remaining > 86400
    assert material.has_client_certificate


def test_client_without_ca_uses_the_system_store() -> None:
    material = TLSMaterial(TLSFiles(), purpose="client")
    material.load()
    context = material.context()
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert context.check_hostname is True
    assert context.cert_store_stats() == ssl.create_default_context().cert_store_stats()
    assert material.certificate is None
    assert material.ca == []
    assert material.seconds_to_expiry() is None
    assert not material.has_client_certificate


def test_server_context_and_client_cert_requirement(certs: CertFiles) -> None:
    files = TLSFiles(ca_file=certs.ca, cert_file=certs.server_cert, key_file=certs.server_key)
    plain = TLSMaterial(files, purpose="server")
    plain.load()
    assert plain.context().verify_mode == ssl.CERT_NONE
    assert plain.certificate is not None
    assert {"localhost", "127.0.0.1", "receiver"} <= set(plain.certificate.sans)

    mutual = TLSMaterial(files, purpose="server", require_client_cert=True)
    mutual.load()
    assert mutual.context().verify_mode == ssl.CERT_REQUIRED
    assert mutual.context().minimum_version == ssl.TLSVersion.TLSv1_2


def test_server_needs_cert_and_key(certs: CertFiles) -> None:
    with pytest.raises(CertError, match="server needs both a certificate and a key"):
        TLSMaterial(TLSFiles(ca_file=certs.ca), purpose="server").load()


def test_client_cert_requirement_needs_a_ca(certs: CertFiles) -> None:
    files = TLSFiles(cert_file=certs.server_cert, key_file=certs.server_key)
    with pytest.raises(CertError, match="needs a CA file"):
        TLSMaterial(files, purpose="server", require_client_cert=True).load()


def test_certificate_without_key_is_refused(certs: CertFiles) -> None:
    with pytest.raises(CertError, match="certificate file given without the other"):
        TLSMaterial(TLSFiles(cert_file=certs.client_cert), purpose="client").load()


def test_context_before_load_loads() -> None:
    material = TLSMaterial(TLSFiles(), purpose="client")
    assert material.context() is material.context()
    assert material.generation == 1


# -- validation errors -----------------------------------------------------------------------------------


def test_key_that_does_not_belong_to_the_certificate(certs: CertFiles) -> None:
    files = TLSFiles(ca_file=certs.ca, cert_file=certs.client_cert, key_file=certs.server_key)
    with pytest.raises(CertError) as info:
        TLSMaterial(files, purpose="client").load()
    assert str(info.value).startswith(
        f"receiver tls key {certs.server_key} does not match certificate {certs.client_cert} (CN=audittailer-client"
    )
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("role", ["ca_file", "cert_file", "key_file"])
def test_bad_pem(certs: CertFiles, tmp_path: Path, role: str) -> None:
    bad = tmp_path / "bad.pem"
    bad.write_text("-----BEGIN CERTIFICATE-----\nnot base64 at all!\n-----END CERTIFICATE-----\n")
    bad.chmod(0o600)
    paths = {"ca_file": certs.ca, "cert_file": certs.client_cert, "key_file": certs.client_key}
    paths[role] = bad
    with pytest.raises(CertError, match=r"^bad PEM in receiver tls (CA|certificate|key) .*bad\.pem"):
        TLSMaterial(TLSFiles(**paths), purpose="client").load()  # type: ignore[arg-type]


def test_empty_ca_file(tmp_path: Path) -> None:
    empty = tmp_path / "ca.crt"
    empty.write_bytes(b"")
    with pytest.raises(CertError, match=rf"^bad PEM in proxy tls CA {empty}"):
        TLSMaterial(TLSFiles(ca_file=empty), purpose="client", name="proxy").load()


def test_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "ca.crt"
    with pytest.raises(CertError) as info:
        TLSMaterial(TLSFiles(ca_file=missing), purpose="client", name="proxy").load()
    assert str(info.value) == f"cannot read proxy tls CA {missing}: no such file or directory"


# Python 3.12+ warns about any fork() of a process with threads (xdist's worker has some). The child only drops its
# ids, loads one CA file and _exits: this test starts no thread of its own.
@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded, use of fork:DeprecationWarning")
def test_unreadable_file_names_permission_denied(certs: CertFiles) -> None:
    # root reads anything, so as root the check runs in a child process as 'nobody'.
    if os.geteuid() != 0:
        certs.ca.chmod(0)
        with pytest.raises(CertError, match=rf"^cannot read receiver tls CA {certs.ca}: permission denied$"):
            TLSMaterial(TLSFiles(ca_file=certs.ca), purpose="client").load()
        return
    # The interpreter lives under /root here, so not a new process: a forked child that drops to 'nobody'.
    certs.ca.chmod(0)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            os.setgid(65534)
            os.setuid(65534)
            try:
                TLSMaterial(TLSFiles(ca_file=certs.ca), purpose="client").load()
                message = "loaded"
            except CertError as exc:
                message = str(exc)
            os.write(write_end, message.encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        message = pipe.read().decode()
    os.waitpid(pid, 0)
    # The pytest tmp dir is 0700 for root: 'nobody' cannot even stat the path, which is the same error.
    assert message == f"cannot read receiver tls CA {certs.ca}: permission denied"


def test_encrypted_key_with_password(tmp_path: Path, ca: trustme.CA, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="pyforward.certs")
    leaf = ca.issue_cert("client", common_name="client")
    key = serialization.load_pem_private_key(leaf.private_key_pem.bytes(), password=None)
    encrypted = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(PASSWORD.encode()),
    )
    cert_path, key_path = tmp_path / "tls.crt", tmp_path / "tls.key"
    leaf.cert_chain_pems[0].write_to_path(str(cert_path))
    key_path.write_bytes(encrypted)
    key_path.chmod(0o600)

    files = TLSFiles(cert_file=cert_path, key_file=key_path, key_password=PASSWORD)
    assert PASSWORD not in repr(files)
    material = TLSMaterial(files, purpose="client")
    assert PASSWORD not in repr(material)
    material.load()
    assert material.certificate is not None

    wrong = TLSFiles(cert_file=cert_path, key_file=key_path, key_password="not-it")
    with pytest.raises(CertError, match=f"^receiver tls key {key_path}: wrong key password$"):
        TLSMaterial(wrong, purpose="client").load()
    with pytest.raises(CertError, match="is encrypted and no key password is set"):
        TLSMaterial(TLSFiles(cert_file=cert_path, key_file=key_path), purpose="client").load()
    assert PASSWORD not in caplog.text
    assert "not-it" not in caplog.text
    assert "PRIVATE KEY" not in caplog.text


# -- warnings --------------------------------------------------------------------------------------------


def write_leaf(
    directory: Path,
    ca: trustme.CA,
    key_mode: int = 0o600,
    not_before: datetime | None = None,
    not_after: datetime | None = None,
) -> TLSFiles:
    directory.mkdir(parents=True, exist_ok=True)
    files = leaf_files(ca, "client", not_before=not_before, not_after=not_after)
    for name, data in files.items():
        (directory / name).write_bytes(data)
    (directory / "tls.key").chmod(key_mode)
    return TLSFiles(ca_file=directory / "ca.crt", cert_file=directory / "tls.crt", key_file=directory / "tls.key")


def test_certificate_expiring_soon_warns_once(tmp_path: Path, ca: trustme.CA, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="pyforward.certs")
    soon = datetime.now(UTC) + timedelta(days=5)
    files = write_leaf(tmp_path, ca, not_after=soon)
    material = TLSMaterial(files, purpose="client", name="proxy")
    material.load()
    warnings = records(caplog, logging.WARNING)
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith(f"proxy certificate {files.cert_file} (CN=client")
    assert "expires in 5.0 days" in warnings[0] or "expires in 4.9 days" in warnings[0]
    remaining = material.seconds_to_expiry()
    assert remaining is not None
    assert 4 * 86400 < remaining <= 5 * 86400


def test_certificate_valid_long_enough_does_not_warn(
    tmp_path: Path, ca: trustme.CA, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="pyforward.certs")
    material = TLSMaterial(write_leaf(tmp_path, ca), purpose="client")
    material.load()
    assert records(caplog, logging.WARNING) == []
    assert records(caplog, logging.ERROR) == []


def test_expired_certificate_is_an_error_but_loads(
    tmp_path: Path, ca: trustme.CA, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="pyforward.certs")
    past = datetime.now(UTC) - timedelta(days=2)
    files = write_leaf(tmp_path, ca, not_before=past - timedelta(days=10), not_after=past)
    material = TLSMaterial(files, purpose="client")
    material.load()
    errors = records(caplog, logging.ERROR)
    assert len(errors) == 1, errors
    assert "expired at" in errors[0]
    assert str(files.cert_file) in errors[0]
    remaining = material.seconds_to_expiry()
    assert remaining is not None
    assert remaining < 0


def test_key_readable_by_others_warns(tmp_path: Path, ca: trustme.CA, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="pyforward.certs")
    files = write_leaf(tmp_path, ca, key_mode=0o644)
    TLSMaterial(files, purpose="client").load()
    warnings = records(caplog, logging.WARNING)
    assert warnings == [
        f"receiver tls key {files.key_file} is readable by group/others (mode 0644); "
        "restrict it to the owner (0600/0400)"
    ]


def test_key_readable_by_owner_only_does_not_warn(
    tmp_path: Path, ca: trustme.CA, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="pyforward.certs")
    TLSMaterial(write_leaf(tmp_path, ca, key_mode=0o400), purpose="client").load()
    assert records(caplog, logging.WARNING) == []


# -- reload ----------------------------------------------------------------------------------------------


def test_symlink_swap_reloads(tmp_path: Path, ca: trustme.CA, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="pyforward.certs")
    vol = SecretVolume(tmp_path / "secret")
    vol.write(leaf_files(ca, "first"))
    material = volume_material(vol)
    material.load()
    first = material.context()
    assert material.context() is first
    assert material.generation == 1

    rotated_ca = trustme.CA(organization_name="rotated CA")
    vol.write(leaf_files(rotated_ca, "second"))
    second = material.context()
    assert second is not first
    assert material.generation == 2
    assert material.certificate is not None
    assert material.certificate.subject.startswith("CN=second")
    assert "rotated CA" in material.ca[0].subject
    assert "rotated CA" in str(second.get_ca_certs())
    assert material.context() is second
    assert material.generation == 2
    assert any("reloaded (generation 2)" in m and "CN=second" in m for m in records(caplog, logging.INFO))


def test_rewrite_in_place_reloads(tmp_path: Path, ca: trustme.CA) -> None:
    # Not a Secret volume: a plain file replaced by rename (new inode), e.g. by an operator's script.
    files = write_leaf(tmp_path, ca)
    material = TLSMaterial(files, purpose="client", check_interval=0)
    material.load()
    first = material.context()
    new = leaf_files(ca, "again")
    assert files.cert_file is not None
    assert files.key_file is not None
    for target, data in ((files.cert_file, new["tls.crt"]), (files.key_file, new["tls.key"])):
        tmp = target.with_suffix(".tmp")
        tmp.write_bytes(data)
        tmp.chmod(0o600)
        os.replace(tmp, target)
    assert material.context() is not first
    assert material.generation == 2
    assert material.certificate is not None
    assert material.certificate.subject.startswith("CN=again")


@pytest.mark.parametrize(
    ("breakage", "expected"),
    [
        ("bad-pem", "bad PEM in receiver tls certificate"),
        ("wrong-key", "does not match certificate"),
    ],
)
def test_broken_update_keeps_the_last_good_context(
    tmp_path: Path, ca: trustme.CA, caplog: pytest.LogCaptureFixture, breakage: str, expected: str
) -> None:
    caplog.set_level(logging.INFO, logger="pyforward.certs")
    vol = SecretVolume(tmp_path / "secret")
    good = leaf_files(ca, "good")
    vol.write(good)
    material = volume_material(vol)
    material.load()
    first = material.context()

    broken = dict(leaf_files(ca, "broken"))
    if breakage == "bad-pem":
        broken["tls.crt"] = b"-----BEGIN CERTIFICATE-----\ngarbage\n-----END CERTIFICATE-----\n"
    else:
        broken["tls.key"] = good["tls.key"]
    vol.write(broken)
    assert material.context() is first
    assert material.context() is first  # checked again: still one error, not one per call
    assert material.generation == 1
    assert material.certificate is not None
    assert material.certificate.subject.startswith("CN=good")
    errors = records(caplog, logging.ERROR)
    assert len(errors) == 1, errors
    assert "receiver TLS reload failed, keeping the previous certificates" in errors[0]
    assert expected in errors[0]
    assert str(vol.path("tls.crt")) in errors[0] or str(vol.path("tls.key")) in errors[0]

    vol.write(leaf_files(ca, "fixed"))
    assert material.context() is not first
    assert material.generation == 2
    assert material.certificate is not None
    assert material.certificate.subject.startswith("CN=fixed")


def test_vanished_file_keeps_the_last_good_context(
    tmp_path: Path, ca: trustme.CA, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="pyforward.certs")
    vol = SecretVolume(tmp_path / "secret")
    vol.write(leaf_files(ca, "good"))
    material = volume_material(vol)
    material.load()
    first = material.context()
    (vol.dir / "..data").unlink()
    assert material.context() is first
    assert material.context() is first
    errors = records(caplog, logging.ERROR)
    assert len(errors) == 1, errors
    assert f"cannot read receiver tls CA {vol.path('ca.crt')}: no such file or directory" in errors[0]


def test_check_interval_limits_stat(tmp_path: Path, ca: trustme.CA) -> None:
    vol = SecretVolume(tmp_path / "secret")
    vol.write(leaf_files(ca, "first"))
    files = TLSFiles(ca_file=vol.path("ca.crt"), cert_file=vol.path("tls.crt"), key_file=vol.path("tls.key"))
    material = TLSMaterial(files, purpose="client", check_interval=3600)
    material.load()
    first = material.context()
    vol.write(leaf_files(ca, "second"))
    assert material.context() is first  # not looked at again within the interval
    assert material.generation == 1
    assert material.check_for_changes() is True
    assert material.context() is not first
    assert material.generation == 2
    assert material.check_for_changes() is False
