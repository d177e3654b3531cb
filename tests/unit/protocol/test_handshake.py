"""Negotiation (pure) and HMAC authentication helpers."""

from __future__ import annotations

import hashlib
import hmac

import pytest

from protocol import (
    FEATURES,
    MIN_PROTOCOL_VERSION,
    PROTOCOL_VERSION,
    Agreement,
    Capabilities,
    ErrorCode,
    FrameDecoder,
    Hello,
    LocalProtocolError,
    NegotiationFailed,
    Reject,
    Welcome,
    accept_welcome,
    auth_proof,
    check_proof,
    encode_frame,
    make_nonce,
    negotiate,
)

CN = bytes(range(16))
SN = bytes(range(16, 32))
KEY = b"shared-secret"


def caps(lo: int, hi: int, features=(), slots: int = 4) -> Capabilities:
    return Capabilities(version_min=lo, version_max=hi, features=frozenset(features), max_live_migrations=slots)


def test_known_features():
    assert FEATURES == frozenset({"zero-pages", "digests-xxh3-128", "auth-hmac-sha256"})


def test_own_versions():
    assert 1 <= MIN_PROTOCOL_VERSION <= PROTOCOL_VERSION
    # v3 only: a v2 peer sends its pages on the control connection, which a v3
    # session refuses, so v1 and v2 peers are refused at the handshake.
    assert MIN_PROTOCOL_VERSION == PROTOCOL_VERSION == 3


#: What this build offers (as the agents build it from the wire constants).
OURS = Capabilities(
    version_min=MIN_PROTOCOL_VERSION, version_max=PROTOCOL_VERSION, features=FEATURES, max_live_migrations=4
)


def old_hello(version: int) -> Hello:
    """A Hello from a source that speaks only ``version`` (an older build), as it arrives on the wire."""
    hello = Hello(version_min=version, version_max=version, agent="old-src:7070", features=("zero-pages",),
                  max_live_migrations=4, nonce=CN)
    decoder = FrameDecoder()
    decoder.receive_data(encode_frame(hello))
    event = decoder.next_event()
    assert event == hello and type(event) is Hello  # an old Hello still decodes: refusal is negotiation's job
    return event


@pytest.mark.parametrize("version", [1, 2], ids=["v1", "v2"])
def test_old_only_hello_is_refused_naming_both_ranges(version):
    with pytest.raises(NegotiationFailed) as info:
        negotiate(OURS, Capabilities.from_hello(old_hello(version)))
    err = info.value
    assert err.code is ErrorCode.VERSION_MISMATCH
    assert "local offers 3" in err.reason and f"remote offers {version}" in err.reason
    assert err.reason == f"no common protocol version: local offers 3, remote offers {version}"
    # the destination answers with a Reject carrying code and reason
    reject = Reject(code=err.code, reason=err.reason)
    assert reject.code is ErrorCode.VERSION_MISMATCH and f"remote offers {version}" in reject.reason


def test_v2_to_v1_range_is_refused():
    """A peer offering 1..2 (the last build that spoke both) shares nothing with v3."""
    with pytest.raises(NegotiationFailed) as info:
        negotiate(caps(1, 2), OURS)
    assert info.value.code is ErrorCode.VERSION_MISMATCH
    assert info.value.reason == "no common protocol version: local offers 1..2, remote offers 3"


@pytest.mark.parametrize(
    "lo, hi, agreed",
    [(1, 3, 3), (2, 3, 3), (3, 3, 3), (1, 5, 3), (3, 4, 3)],
)
def test_peers_overlapping_v3_agree_on_v3(lo, hi, agreed):
    remote = caps(lo, hi, {"zero-pages"})
    assert negotiate(OURS, remote).version == agreed
    assert negotiate(remote, OURS).version == agreed


def test_v4_only_peer_is_refused_naming_both_ranges():
    with pytest.raises(NegotiationFailed) as info:
        negotiate(OURS, caps(4, 5))
    assert info.value.code is ErrorCode.VERSION_MISMATCH
    assert "local offers 3" in str(info.value) and "remote offers 4..5" in str(info.value)


@pytest.mark.parametrize("version", [1, 2, 4])
def test_welcome_of_another_version_is_refused_by_a_v3_source(version):
    """Source side: an older (or newer) destination that answered anyway with its own version."""
    with pytest.raises(NegotiationFailed) as info:
        accept_welcome(OURS, welcome(version=version, slots=2))
    err = info.value
    assert err.code is ErrorCode.VERSION_MISMATCH
    assert f"version {version}" in err.reason and "local offers 3" in err.reason
    assert accept_welcome(OURS, welcome(version=3, slots=2)).version == 3


@pytest.mark.parametrize(
    "local, remote, version",
    [
        ((1, 1), (1, 1), 1),
        ((1, 3), (2, 5), 3),
        ((2, 5), (1, 3), 3),
        ((1, 9), (4, 4), 4),
        ((3, 3), (1, 3), 3),
        ((1, 2), (2, 9), 2),
    ],
)
def test_highest_common_version(local, remote, version):
    assert negotiate(caps(*local), caps(*remote)).version == version
    assert negotiate(caps(*remote), caps(*local)).version == version  # symmetric


@pytest.mark.parametrize("local, remote", [((1, 1), (2, 2)), ((3, 5), (1, 2)), ((1, 2), (3, 9))])
def test_no_common_version_names_both_offers(local, remote):
    with pytest.raises(NegotiationFailed) as info:
        negotiate(caps(*local), caps(*remote))
    err = info.value
    assert err.code is ErrorCode.VERSION_MISMATCH
    for lo, hi in (local, remote):
        assert (f"{lo}..{hi}" if lo != hi else str(lo)) in str(err)
    assert "local" in str(err) and "remote" in str(err)


@pytest.mark.parametrize(
    "local, remote, common",
    [
        ({"a", "b"}, {"b", "c"}, {"b"}),
        (set(), {"a"}, set()),
        (FEATURES, FEATURES, FEATURES),
        (FEATURES, {"future-thing", "zero-pages"}, {"zero-pages"}),
    ],
)
def test_features_intersection(local, remote, common):
    assert negotiate(caps(1, 1, local), caps(1, 1, remote)).features == frozenset(common)


@pytest.mark.parametrize("local, remote, slots", [(1, 8, 1), (8, 1, 1), (3, 3, 3), (4, 6, 4)])
def test_slots_are_min(local, remote, slots):
    agreement = negotiate(caps(1, 1, slots=local), caps(1, 1, slots=remote))
    assert agreement == Agreement(version=1, features=frozenset(), slots=slots)


def test_capabilities_validation():
    with pytest.raises(LocalProtocolError):
        caps(2, 1)
    with pytest.raises(LocalProtocolError):
        caps(1, 1, slots=0)
    assert Capabilities(1, 1, {"a"}, 1).features == frozenset({"a"})  # type: ignore[arg-type]


def test_capabilities_from_hello():
    hello = Hello(
        version_min=1, version_max=3, agent="a", features=("x", "y"), max_live_migrations=2, nonce=CN
    )
    assert Capabilities.from_hello(hello) == caps(1, 3, {"x", "y"}, 2)


def welcome(version=1, features=("zero-pages",), slots=2) -> Welcome:
    return Welcome(
        version=version, agent="d", features=features, max_live_migrations=slots, slots=slots, nonce=SN, proof=b"",
        slots_free=slots, memory_free_bytes=2**30, status="accepting",
    )


def test_accept_welcome():
    local = caps(1, 2, {"zero-pages", "digests-xxh3-128"}, 4)
    assert accept_welcome(local, welcome(2, ("zero-pages", "new"), 2)) == Agreement(
        version=2, features=frozenset({"zero-pages"}), slots=2
    )
    with pytest.raises(NegotiationFailed) as info:
        accept_welcome(local, welcome(version=3))
    assert info.value.code is ErrorCode.VERSION_MISMATCH and "3" in str(info.value)
    with pytest.raises(NegotiationFailed) as info:
        accept_welcome(local, welcome(slots=5))
    assert info.value.code is ErrorCode.INCOMPATIBLE


def test_make_nonce():
    nonces = {make_nonce() for _ in range(32)}
    assert len(nonces) == 32
    assert all(type(n) is bytes and len(n) == 16 for n in nonces)


def test_auth_proof_matches_spec():
    expected = hmac.new(KEY, b"livemig-server\0" + CN + SN, hashlib.sha256).digest()
    assert auth_proof(KEY, "server", CN, SN) == expected
    assert len(expected) == 32


def test_roles_and_nonces_change_the_proof():
    proofs = {
        auth_proof(KEY, "server", CN, SN),
        auth_proof(KEY, "client", CN, SN),
        auth_proof(KEY, "server", SN, CN),
        auth_proof(b"other", "server", CN, SN),
    }
    assert len(proofs) == 4


@pytest.mark.parametrize("role", ["server", "client"])
def test_check_proof_ok(role):
    check_proof(KEY, role, CN, SN, auth_proof(KEY, role, CN, SN))


@pytest.mark.parametrize(
    "proof",
    [
        auth_proof(b"wrong key", "client", CN, SN),
        auth_proof(KEY, "server", CN, SN),  # reflected proof of the other role
        auth_proof(KEY, "client", SN, CN),
        b"",
        b"\0" * 32,
        auth_proof(KEY, "client", CN, SN)[:31],
        "not bytes",
    ],
    ids=range(7),
)
def test_check_proof_bad(proof):
    with pytest.raises(NegotiationFailed) as info:
        check_proof(KEY, "client", CN, SN, proof)  # type: ignore[arg-type]
    assert info.value.code is ErrorCode.AUTH_FAILED


@pytest.mark.parametrize(
    "key, role, cn, sn",
    [(b"", "server", CN, SN), (KEY, "peer", CN, SN), (KEY, "server", CN[:8], SN), (KEY, "client", CN, b"")],
)
def test_auth_proof_misuse(key, role, cn, sn):
    with pytest.raises(LocalProtocolError):
        auth_proof(key, role, cn, sn)
