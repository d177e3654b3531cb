"""Error hierarchy (h11 style): abstract base, Local vs Remote, codes."""

from __future__ import annotations

import pickle

import pytest

from protocol import (
    ErrorCode,
    LocalProtocolError,
    NegotiationFailed,
    ProtocolError,
    RemoteProtocolError,
)


def test_protocol_error_is_abstract():
    with pytest.raises(TypeError):
        ProtocolError("x", ErrorCode.INTERNAL)


def test_local_defaults_to_unexpected():
    err = LocalProtocolError("sent Ready too early")
    assert err.code is ErrorCode.UNEXPECTED
    assert err.reason == str(err) == "sent Ready too early"
    assert isinstance(err, ProtocolError)


def test_remote_defaults_to_malformed():
    err = RemoteProtocolError("garbage")
    assert err.code is ErrorCode.MALFORMED
    assert err.reason == str(err) == "garbage"
    assert RemoteProtocolError("x", ErrorCode.TOO_LARGE).code is ErrorCode.TOO_LARGE
    assert RemoteProtocolError("x", code=ErrorCode.TRUNCATED).code is ErrorCode.TRUNCATED


def test_negotiation_failed():
    err = NegotiationFailed("no common version")
    assert isinstance(err, RemoteProtocolError)
    assert err.code is ErrorCode.VERSION_MISMATCH
    assert NegotiationFailed("bad proof", code=ErrorCode.AUTH_FAILED).code is ErrorCode.AUTH_FAILED


def test_local_and_remote_are_distinct():
    assert not issubclass(LocalProtocolError, RemoteProtocolError)
    assert not issubclass(RemoteProtocolError, LocalProtocolError)


def test_int_code_is_normalised():
    assert RemoteProtocolError("x", 3).code is ErrorCode.TOO_LARGE  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "err",
    [LocalProtocolError("a"), RemoteProtocolError("b", ErrorCode.TIMEOUT), NegotiationFailed("c", ErrorCode.AUTH_FAILED)],
    ids=repr,
)
def test_pickle_round_trip(err):
    again = pickle.loads(pickle.dumps(err))
    assert type(again) is type(err) and again.code is err.code and again.reason == err.reason
