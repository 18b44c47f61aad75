"""Shared-key handshake (HELO / PING / PONG), acks, and ClientDecoder.

Every digest is recomputed here with hashlib from the spec's formula, never with the module's helper.
"""

from __future__ import annotations

import hashlib

import msgpack
import pytest

from pyforward.protocol import (
    Ack,
    ClientDecoder,
    HandshakeError,
    Helo,
    Ping,
    Pong,
    ProtocolError,
    ServerDecoder,
    encode_ack,
    encode_helo,
    encode_ping,
    encode_pong,
    make_helo,
    make_ping,
    make_pong,
    verify_ping,
    verify_pong,
)


def h(text: str) -> bytes:
    lines = (line.split("#", 1)[0] for line in text.splitlines())
    return bytes.fromhex("".join("".join(lines).split()))


def sha512_hex(*parts: bytes) -> bytes:
    return hashlib.sha512(b"".join(parts)).hexdigest().encode()


NONCE = bytes(range(0xE0, 0xF0))  # 16 bytes, invalid UTF-8 on purpose
AUTH = bytes(range(0xF0, 0x100))
KEY = "s3cret-κλειδί"
SALT = b"0123456789abcdef0123456789abcdef"  # fluentd: SecureRandom.hex(16)


def decode_str_fields(data: bytes) -> object:
    """Independent decode where str stays str (surrogate-escaped) and bin stays bytes."""
    return msgpack.unpackb(data, raw=False, unicode_errors="surrogateescape")


# ------------------------------------------------------------------------------------------------- HELO


def test_fluent_bit_helo_str_random_bytes_no_keepalive() -> None:
    wire = h("92 a4 48454c4f 82 a5 6e6f6e6365 b0") + NONCE + h("a4 61757468 b0") + AUTH
    assert ClientDecoder().feed(wire) == [Helo(nonce=NONCE, auth=AUTH, keepalive=True)]


def test_fluentd_helo_bin_nonce_and_keepalive() -> None:
    wire = (
        h("92 a4 48454c4f 83 a5 6e6f6e6365 c4 10")
        + NONCE
        + h("a4 61757468 c4 10")
        + AUTH
        + h("a9 6b656570616c697665 c2")
    )
    assert ClientDecoder().feed(wire) == [Helo(nonce=NONCE, auth=AUTH, keepalive=False)]


def test_helo_without_auth_and_nil_options() -> None:
    assert ClientDecoder().feed(h("92 a4 48454c4f 81 a5 6e6f6e6365 a3 616263")) == [Helo(b"abc", b"", True)]
    assert ClientDecoder().feed(h("92 a4 48454c4f c0")) == [Helo(b"", b"", True)]


def test_encode_helo_is_fluentd_shaped() -> None:
    wire = encode_helo(Helo(NONCE, AUTH, keepalive=False))
    assert wire == (
        h("92 a4 48454c4f 83 a5 6e6f6e6365 c4 10")
        + NONCE
        + h("a4 61757468 c4 10")
        + AUTH
        + h("a9 6b656570616c697665 c2")
    )
    assert ClientDecoder().feed(wire) == [Helo(NONCE, AUTH, False)]
    assert encode_helo(Helo(b"n", b"")).endswith(h("a4 61757468 c4 00 a9 6b656570616c697665 c3"))


def test_make_helo() -> None:
    with_users = make_helo(user_auth=True)
    without = make_helo(user_auth=False, keepalive=False)
    assert len(with_users.nonce) == len(with_users.auth) == 16
    assert (len(without.nonce), without.auth, without.keepalive) == (16, b"", False)
    assert make_helo(user_auth=True).nonce != with_users.nonce


# ------------------------------------------------------------------------------------------------- PING


def test_make_ping_digests() -> None:
    helo = Helo(NONCE, AUTH)
    ping = make_ping(helo, hostname="client-1", shared_key=KEY, username="alice", password="pw", salt=SALT)
    assert ping == Ping(
        hostname=b"client-1",
        salt=SALT,
        shared_key_digest=sha512_hex(SALT, b"client-1", NONCE, KEY.encode()),
        username=b"alice",
        password_digest=sha512_hex(AUTH, b"alice", b"pw"),
    )
    assert len(ping.shared_key_digest) == 128
    assert ping.shared_key_digest == ping.shared_key_digest.lower()


def test_fluentd_quirk_auth_without_credentials() -> None:
    # fluentd always sends an auth salt when security is on; its client then sends "" and sha512(auth).
    ping = make_ping(Helo(NONCE, AUTH), hostname="c", shared_key=KEY, salt=SALT)
    assert ping.username == b""
    assert ping.password_digest == hashlib.sha512(AUTH).hexdigest().encode()


def test_no_auth_means_empty_user_fields() -> None:
    ping = make_ping(Helo(NONCE, b""), hostname="c", shared_key=KEY, username="alice", password="pw")
    assert (ping.username, ping.password_digest) == (b"", b"")


def test_default_salt_is_random_hex() -> None:
    a = make_ping(Helo(NONCE, b""), hostname="c", shared_key=KEY)
    b = make_ping(Helo(NONCE, b""), hostname="c", shared_key=KEY)
    assert len(a.salt) == 32
    assert int(a.salt, 16) >= 0
    assert a.salt != b.salt
    assert a.shared_key_digest == sha512_hex(a.salt, b"c", NONCE, KEY.encode())


def test_encode_ping_all_fields_are_str() -> None:
    # fluent-bit's in_forward rejects a PING whose fields are not msgpack str, even for random salt bytes.
    ping = Ping(b"host", AUTH, b"d" * 128, b"", b"")
    wire = encode_ping(ping)
    assert wire == h("96 a4 50494e47 a4 686f7374 b0") + AUTH + h("d9 80") + b"d" * 128 + h("a0 a0")
    fields = decode_str_fields(wire)
    assert isinstance(fields, list)
    assert all(isinstance(field, str) for field in fields)
    assert ServerDecoder().feed(wire) == [ping]


def test_fluent_bit_ping_with_raw_salt_verifies() -> None:
    salt = bytes(range(0x80, 0x90))  # 16 raw bytes as str
    digest = sha512_hex(salt, b"fb-host", NONCE, KEY.encode())
    wire = h("96 a4 50494e47 a7 66622d686f7374 b0") + salt + h("d9 80") + digest + h("a0 a0")
    ping = ServerDecoder().feed(wire)[0]
    assert ping == Ping(b"fb-host", salt, digest, b"", b"")
    assert isinstance(ping, Ping)
    assert verify_ping(ping, nonce=NONCE, shared_key=KEY, auth=AUTH, users={}) is None
    assert verify_ping(ping, nonce=NONCE, shared_key="wrong", auth=AUTH, users={}) == "shared_key mismatch"
    assert verify_ping(ping, nonce=AUTH, shared_key=KEY, auth=AUTH, users={}) == "shared_key mismatch"


def test_fluentd_ping_literal_with_quirk_digest() -> None:
    digest = sha512_hex(SALT, b"fluentd", NONCE, KEY.encode())
    user_digest = sha512_hex(AUTH)  # sha512(auth + "" + "")
    wire = h("96 a4 50494e47 a7 666c75656e7464 d9 20") + SALT + h("d9 80") + digest + h("a0 d9 80") + user_digest
    ping = ServerDecoder().feed(wire)[0]
    assert isinstance(ping, Ping)
    assert ping.password_digest == user_digest
    assert verify_ping(ping, nonce=NONCE, shared_key=KEY, auth=AUTH, users={}) is None
    assert verify_ping(ping, nonce=NONCE, shared_key=KEY, auth=AUTH, users={"alice": "pw"}) == (
        "username/password mismatch"
    )


def test_user_authentication() -> None:
    helo = Helo(NONCE, AUTH)
    users = {"alice": "pw", "bob": "other"}
    good = make_ping(helo, hostname="c", shared_key=KEY, username="alice", password="pw")
    assert verify_ping(good, nonce=NONCE, shared_key=KEY, auth=AUTH, users=users) is None
    wrong = make_ping(helo, hostname="c", shared_key=KEY, username="alice", password="nope")
    assert verify_ping(wrong, nonce=NONCE, shared_key=KEY, auth=AUTH, users=users) == "username/password mismatch"
    unknown = make_ping(helo, hostname="c", shared_key=KEY, username="eve", password="pw")
    assert verify_ping(unknown, nonce=NONCE, shared_key=KEY, auth=AUTH, users=users) == "username/password mismatch"
    swapped = make_ping(helo, hostname="c", shared_key=KEY, username="bob", password="pw")
    assert verify_ping(swapped, nonce=NONCE, shared_key=KEY, auth=AUTH, users=users) == "username/password mismatch"
    bad_utf8 = Ping(good.hostname, good.salt, good.shared_key_digest, b"\xff", good.password_digest)
    assert verify_ping(bad_utf8, nonce=NONCE, shared_key=KEY, auth=AUTH, users=users) == "username/password mismatch"


# ------------------------------------------------------------------------------------------------- PONG


def test_make_pong_ok_digest_and_bytes() -> None:
    ping = make_ping(Helo(NONCE, b""), hostname="client", shared_key=KEY, salt=SALT)
    pong = make_pong(ping, ok=True, reason="", nonce=NONCE, hostname="server", shared_key=KEY)
    digest = sha512_hex(SALT, b"server", NONCE, KEY.encode())
    assert pong == Pong(True, "", b"server", digest)
    assert encode_pong(pong) == h("95 a4 504f4e47 c3 a0 a6 736572766572 d9 80") + digest


def test_make_pong_refused_is_empty_like_fluentd() -> None:
    ping = make_ping(Helo(NONCE, b""), hostname="client", shared_key=KEY, salt=SALT)
    pong = make_pong(ping, ok=False, reason="shared_key mismatch", nonce=NONCE, hostname="server", shared_key=KEY)
    assert pong == Pong(False, "shared_key mismatch", b"", b"")
    assert encode_pong(pong) == h("95 a4 504f4e47 c2 b3") + b"shared_key mismatch" + h("a0 a0")


def test_fluentd_pong_literal_verifies() -> None:
    digest = sha512_hex(SALT, b"aggregator", NONCE, KEY.encode())
    wire = h("95 a4 504f4e47 c3 a0 aa 61676772656761746f72 d9 80") + digest
    (pong,) = ClientDecoder().feed(wire)
    assert pong == Pong(True, "", b"aggregator", digest)
    assert isinstance(pong, Pong)
    verify_pong(pong, salt=SALT, nonce=NONCE, shared_key=KEY, own_hostname="client")


def test_pong_wrong_digest_rejected() -> None:
    digest = sha512_hex(SALT, b"aggregator", NONCE, b"other key")
    pong = Pong(True, "", b"aggregator", digest)
    with pytest.raises(HandshakeError, match="shared_key mismatch"):
        verify_pong(pong, salt=SALT, nonce=NONCE, shared_key=KEY, own_hostname="client")
    with pytest.raises(HandshakeError):
        verify_pong(
            Pong(True, "", b"aggregator", sha512_hex(SALT, b"aggregator", NONCE, KEY.encode())),
            salt=b"another salt",
            nonce=NONCE,
            shared_key=KEY,
            own_hostname="client",
        )


def test_pong_with_own_hostname_rejected_even_with_good_digest() -> None:
    pong = Pong(True, "", b"client", sha512_hex(SALT, b"client", NONCE, KEY.encode()))
    with pytest.raises(HandshakeError, match="own hostname"):
        verify_pong(pong, salt=SALT, nonce=NONCE, shared_key=KEY, own_hostname="client")


def test_pong_refusal_carries_reason() -> None:
    wire = h("95 a4 504f4e47 c2 ba") + b"username/password mismatch" + h("a0 a0")
    (pong,) = ClientDecoder().feed(wire)
    assert pong == Pong(False, "username/password mismatch", b"", b"")
    assert isinstance(pong, Pong)
    with pytest.raises(HandshakeError, match="refused the handshake: username/password mismatch") as info:
        verify_pong(pong, salt=SALT, nonce=NONCE, shared_key=KEY, own_hostname="client")
    assert isinstance(info.value, ProtocolError)
    control = Pong(False, "bad\nline\x1b[31m" + "x" * 500, b"", b"")
    with pytest.raises(HandshakeError) as info:
        verify_pong(control, salt=SALT, nonce=NONCE, shared_key=KEY, own_hostname="client")
    assert "\n" not in str(info.value)
    assert len(str(info.value)) < 300


def test_full_handshake_through_the_wire() -> None:
    helo = make_helo(user_auth=True)
    (got_helo,) = ClientDecoder().feed(encode_helo(helo))
    assert got_helo == helo
    assert isinstance(got_helo, Helo)
    ping = make_ping(got_helo, hostname="shipper", shared_key=KEY, username="u", password="p")
    (got_ping,) = ServerDecoder().feed(encode_ping(ping))
    assert got_ping == ping
    assert isinstance(got_ping, Ping)
    reason = verify_ping(got_ping, nonce=helo.nonce, shared_key=KEY, auth=helo.auth, users={"u": "p"})
    assert reason is None
    pong = make_pong(got_ping, ok=True, reason="", nonce=helo.nonce, hostname="receiver", shared_key=KEY)
    (got_pong,) = ClientDecoder().feed(encode_pong(pong))
    assert got_pong == pong
    assert isinstance(got_pong, Pong)
    verify_pong(got_pong, salt=ping.salt, nonce=helo.nonce, shared_key=KEY, own_hostname="shipper")


# -------------------------------------------------------------------------------------------------- acks


def test_acks_from_fluentd_and_fluent_bit() -> None:
    fluentd = h("81 a3 61636b b9") + b"Bf3Gk2nX0cQm8vT1aPzR7w==\n"
    fluent_bit_old = h("81 a3 61636b d9 20") + b"0123456789abcdef0123456789abcdef"
    as_bin = h("81 a3 61636b c4 02 ff00")
    decoder = ClientDecoder()
    assert decoder.feed(fluentd + fluent_bit_old + as_bin) == [
        Ack(b"Bf3Gk2nX0cQm8vT1aPzR7w==\n"),
        Ack(b"0123456789abcdef0123456789abcdef"),
        Ack(b"\xff\x00"),
    ]
    assert ClientDecoder().feed(encode_ack(b"\xfe\n")) == [Ack(b"\xfe\n")]


def test_client_decoder_split_feeding() -> None:
    digest = sha512_hex(SALT, b"srv", NONCE, KEY.encode())
    stream = (
        encode_helo(Helo(NONCE, AUTH))
        + encode_pong(Pong(True, "", b"srv", digest))
        + encode_ack(b"id-1\n")
        + encode_ack(b"id-2")
    )
    decoder = ClientDecoder()
    events: list[object] = []
    for i in range(len(stream)):
        events.extend(decoder.feed(stream[i : i + 1]))
    assert events == [Helo(NONCE, AUTH), Pong(True, "", b"srv", digest), Ack(b"id-1\n"), Ack(b"id-2")]


@pytest.mark.parametrize(
    ("wire_hex", "message"),
    [
        ("c1", "malformed msgpack"),
        ("c0", "unexpected NoneType"),
        ("a3 616263", "unexpected str"),
        ("81 a3 666f6f 01", "unexpected map"),
        ("81 a3 61636b 01", "ack value"),
        ("92 a4 50494e47 80", "unexpected list"),
        ("91 a4 48454c4f", "HELO without options"),
        ("92 a4 48454c4f 01", "HELO options must be a map"),
        ("92 a4 48454c4f 81 a5 6e6f6e6365 01", "HELO nonce"),
        ("92 a4 48454c4f 81 a9 6b656570616c697665 01", "keepalive"),
        ("94 a4 504f4e47 c3 a0 a0", "PONG has 4 elements"),
        ("95 a4 504f4e47 01 a0 a0 a0", "PONG auth result"),
        ("95 a4 504f4e47 c3 01 a0 a0", "PONG reason"),
    ],
)
def test_client_decoder_rejects(wire_hex: str, message: str) -> None:
    decoder = ClientDecoder()
    with pytest.raises(ProtocolError, match=message):
        decoder.feed(h(wire_hex))
    with pytest.raises(ProtocolError, match="already failed"):
        decoder.feed(encode_ack(b"x"))
