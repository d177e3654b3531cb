"""MigrationSession: order enforcement, pair tests (h11 ConnectionPair style)."""

from __future__ import annotations

import pytest

from protocol import (
    ABORTABLE_STATES,
    PAGE_SIZE,
    TRANSITIONS,
    Abort,
    Auth,
    BatchFlags,
    CLOSED,
    Digests,
    ErrorCode,
    FrameDecoder,
    Join,
    LocalProtocolError,
    Message,
    MigrationSession,
    MsgType,
    PageBatch,
    Payload,
    Ready,
    Reject,
    RemoteProtocolError,
    Role,
    RoundAck,
    RoundEnd,
    SectionState,
    SessionState,
    encode_frame,
)

S, D = Role.SOURCE, Role.DESTINATION
St = SessionState


class Pair:
    """A SOURCE and a DESTINATION session linked through real frames."""

    def __init__(self, auth_required: bool = False) -> None:
        self.sessions = {
            S: MigrationSession(S, auth_required=auth_required),
            D: MigrationSession(D, auth_required=auth_required),
        }

    @property
    def state(self) -> SessionState:
        source, dest = self.sessions[S].state, self.sessions[D].state
        assert source is dest, (source, dest)
        return source

    def send(self, sender: Role, msg: Message, payload: bytes = b"") -> SessionState:
        frame = self.sessions[sender].send(msg)
        assert frame == encode_frame(msg)
        decoder = FrameDecoder()
        decoder.receive_data(frame + payload)
        decoder.receive_data(b"")
        event = decoder.next_event()
        assert event == msg
        if payload:
            assert decoder.next_event() == Payload(payload)
        assert decoder.next_event() is CLOSED
        assert self.sessions[sender.peer].receive(event) is event
        return self.state


#: Who sends each message type (Abort: either).
SENDER = {
    MsgType.HELLO: S,
    MsgType.WELCOME: D,
    MsgType.AUTH: S,
    MsgType.REJECT: D,
    MsgType.PREPARE: S,
    MsgType.READY: D,
    MsgType.PAGE_BATCH: S,
    MsgType.ROUND_END: S,
    MsgType.STATE_TRANSFER: S,
    MsgType.DIGESTS: D,
    MsgType.RESUME: S,
    MsgType.RESUMED: D,
    MsgType.COMMIT: S,
    MsgType.COMMITTED: D,
    MsgType.QUERY: S,
    MsgType.QUERY_RESULT: D,
    MsgType.ROUND_ACK: D,
    MsgType.SECTION_STATE: S,
    MsgType.JOIN: S,
}

_T = MsgType
_HANDSHAKE = [_T.HELLO, _T.WELCOME]
#: protocol v2: the digests come before Resume (verification before resume)
_MIGRATE = [*_HANDSHAKE, _T.PREPARE, _T.READY, _T.STATE_TRANSFER, _T.DIGESTS, _T.RESUME, _T.RESUMED, _T.COMMIT]
#: state -> (auth_required, message types leading there)
PATHS = {
    St.HELLO: (False, []),
    St.WELCOME: (False, [_T.HELLO]),
    St.AUTH: (True, _HANDSHAKE),
    St.IDLE: (False, _HANDSHAKE),
    St.QUERYING: (False, [*_HANDSHAKE, _T.QUERY]),
    St.PREPARING: (False, _MIGRATE[:3]),
    St.TRANSFER: (False, _MIGRATE[:4]),
    St.SWITCHOVER: (False, _MIGRATE[:5]),  # StateTransfer sent, no Digests yet
    St.RESUMING: (False, _MIGRATE[:7]),
    St.COMMITTING: (False, _MIGRATE[:8]),
    St.COMMIT_SENT: (False, _MIGRATE),
    St.CLOSED: (False, [*_MIGRATE, _T.COMMITTED]),
    St.DATA: (False, [_T.JOIN]),  # a data stream: Join instead of Hello
}


def drive(state: SessionState, examples) -> Pair:
    auth, path = PATHS[state]
    pair = Pair(auth_required=auth)
    for msg_type in path:
        msg = examples[msg_type]
        pair.send(SENDER[msg_type], msg, b"\0" * getattr(msg, "payload_len", 0))
    assert pair.state is state
    return pair


def expect_unexpected(pair: Pair, sender: Role, msg: Message, state: SessionState) -> None:
    """``msg`` from ``sender`` is refused (UNEXPECTED) on both ends, which then stay in ERROR."""
    assert pair.state is state
    with pytest.raises(LocalProtocolError) as local:
        pair.sessions[sender].send(msg)
    assert local.value.code is ErrorCode.UNEXPECTED
    assert type(msg).__name__ in str(local.value) and state.name in str(local.value)
    with pytest.raises(RemoteProtocolError) as remote:
        pair.sessions[sender.peer].receive(msg)
    assert remote.value.code is ErrorCode.UNEXPECTED
    for session in pair.sessions.values():
        assert session.state is St.ERROR
        with pytest.raises(LocalProtocolError):
            session.send(Abort(code=ErrorCode.INTERNAL, reason="x"))
        with pytest.raises(RemoteProtocolError):
            session.receive(Abort(code=ErrorCode.INTERNAL, reason="x"))
        assert session.state is St.ERROR



# -- the table ----------------------------------------------------------------


def test_every_state_is_covered():
    sources = {state for (_, state, _) in TRANSITIONS}
    assert sources == set(SessionState) - {St.CLOSED, St.ERROR}
    assert set(PATHS) == set(SessionState) - {St.ERROR}
    assert St.ERROR not in set(TRANSITIONS.values())


def test_every_msgtype_is_used():
    assert {t for (_, _, t) in TRANSITIONS} == set(MsgType)


def test_senders_match_table():
    for (role, _, msg_type), _ in TRANSITIONS.items():
        if msg_type is not MsgType.ABORT:
            assert SENDER[msg_type] is role, msg_type


def test_abortable_states():
    assert ABORTABLE_STATES == set(SessionState) - {St.HELLO, St.WELCOME, St.CLOSED, St.ERROR}
    assert St.DATA in ABORTABLE_STATES  # a data stream can be given up from either end


def test_pages_only_on_data_streams():
    """v3: PageBatch is legal in DATA only, and only from the source."""
    assert {(role, state) for (role, state, t) in TRANSITIONS if t is _T.PAGE_BATCH} == {(S, St.DATA)}
    assert (S, St.TRANSFER, _T.PAGE_BATCH) not in TRANSITIONS
    # the only ways out of a data stream are Abort (and EOF, outside the table)
    assert {new for (_, state, _), new in TRANSITIONS.items() if state is St.DATA} == {St.DATA, St.CLOSED}
    assert {state for (_, state, t), new in TRANSITIONS.items() if new is St.DATA} == {St.HELLO, St.DATA}


def test_verifying_state_is_gone():
    """v2 verifies before resume: there is no state after Resumed but COMMITTING."""
    assert "VERIFYING" not in SessionState.__members__
    assert "verifying" not in {state.value for state in SessionState}


#: Every non-Abort move of protocol v3, written out independently of the
#: table under test (S = source sends, D = destination sends).
V3_MOVES = {
    (S, St.HELLO, _T.HELLO): St.WELCOME,
    (D, St.WELCOME, _T.WELCOME): St.AUTH,
    (D, St.WELCOME, _T.REJECT): St.CLOSED,
    (S, St.AUTH, _T.AUTH): St.IDLE,
    (D, St.IDLE, _T.REJECT): St.CLOSED,
    (S, St.IDLE, _T.QUERY): St.QUERYING,
    (D, St.QUERYING, _T.QUERY_RESULT): St.CLOSED,
    (D, St.QUERYING, _T.REJECT): St.CLOSED,
    (S, St.IDLE, _T.PREPARE): St.PREPARING,
    (D, St.PREPARING, _T.READY): St.TRANSFER,
    (D, St.PREPARING, _T.REJECT): St.CLOSED,
    (S, St.TRANSFER, _T.ROUND_END): St.TRANSFER,
    (S, St.TRANSFER, _T.SECTION_STATE): St.TRANSFER,
    (D, St.TRANSFER, _T.ROUND_ACK): St.TRANSFER,
    (D, St.SWITCHOVER, _T.ROUND_ACK): St.SWITCHOVER,
    (D, St.RESUMING, _T.ROUND_ACK): St.RESUMING,
    (S, St.TRANSFER, _T.STATE_TRANSFER): St.SWITCHOVER,
    (D, St.SWITCHOVER, _T.DIGESTS): St.SWITCHOVER,
    (S, St.SWITCHOVER, _T.RESUME): St.RESUMING,
    (D, St.RESUMING, _T.RESUMED): St.COMMITTING,
    (S, St.COMMITTING, _T.COMMIT): St.COMMIT_SENT,
    (D, St.COMMIT_SENT, _T.COMMITTED): St.CLOSED,
    # a data stream (its own connection): Join, then pages and round ends
    (S, St.HELLO, _T.JOIN): St.DATA,
    (S, St.DATA, _T.PAGE_BATCH): St.DATA,
    (S, St.DATA, _T.ROUND_END): St.DATA,
}


def test_table_is_exactly_the_v3_order():
    moves = {key: new for key, new in TRANSITIONS.items() if key[2] is not _T.ABORT}
    assert moves == V3_MOVES
    aborts = {key: new for key, new in TRANSITIONS.items() if key[2] is _T.ABORT}
    assert aborts == {(role, state, _T.ABORT): St.CLOSED for role in Role for state in ABORTABLE_STATES}


# -- happy paths -----------------------------------------------------------------


def data_stream(join: Join) -> Pair:
    """A data-stream pair after its Join (a connection of its own, no Hello)."""
    pair = Pair()
    assert pair.state is St.HELLO
    assert pair.send(S, join) is St.DATA
    assert pair.sessions[S].migration_id == pair.sessions[D].migration_id == join.migration_id
    return pair


@pytest.mark.parametrize("auth", [False, True])
def test_full_migration(examples, auth):
    control = Pair(auth_required=auth)
    assert control.state is St.HELLO
    assert control.send(S, examples[_T.HELLO]) is St.WELCOME
    assert control.send(D, examples[_T.WELCOME]) is (St.AUTH if auth else St.IDLE)
    if auth:
        assert control.send(S, examples[_T.AUTH]) is St.IDLE
    prepare = examples[_T.PREPARE]
    assert control.send(S, prepare) is St.PREPARING
    assert control.sessions[S].migration_id == control.sessions[D].migration_id == "mig-0001"
    ready = examples[_T.READY]
    assert 1 <= ready.streams <= prepare.streams
    assert control.send(D, ready) is St.TRANSFER
    # v3: the pages travel on Ready.streams data streams, each opened with a
    # Join carrying Ready's token; the control connection never sees a page.
    streams = [
        data_stream(Join(migration_id=ready.migration_id, stream=i, token=ready.token)) for i in range(ready.streams)
    ]
    sections = prepare.sections
    for rnd in range(3):
        for section in range(len(sections)):
            for i, stream in enumerate(streams):
                first = 1024 * i
                batch = PageBatch(section=section, round=rnd, runs=((first, 2), (first + 9, 1)),
                                  flags=BatchFlags.NONE, payload_len=3 * PAGE_SIZE)
                assert stream.send(S, batch, b"\xab" * batch.payload_len) is St.DATA
                zero = PageBatch(section=section, round=rnd, runs=((first + 100, 50),), flags=BatchFlags.ZERO,
                                 payload_len=0)
                assert stream.send(S, zero) is St.DATA
        # every data stream ends its part of the round, then the control stream
        for stream in streams:
            sent = 53 * len(sections)
            assert stream.send(S, RoundEnd(round=rnd, pages_sent=sent, dirty_pages=3 - rnd)) is St.DATA
        total = 53 * len(sections) * len(streams)
        assert control.send(S, RoundEnd(round=rnd, pages_sent=total, dirty_pages=3 - rnd)) is St.TRANSFER
        assert control.send(D, RoundAck(round=rnd)) is St.TRANSFER
    # at the pause: each section's own state, then the vCPU state
    for section in range(len(sections)):
        assert control.send(S, SectionState(section=section, data=b"state %d" % section)) is St.TRANSFER
    assert control.send(S, examples[_T.STATE_TRANSFER]) is St.SWITCHOVER
    # verification before resume: one Digests per section, guest still paused
    for section in range(len(sections)):
        digests = Digests(section=section, chunk_pages=16, digests=bytes([section]) * 32)
        assert control.send(D, digests) is St.SWITCHOVER
    assert control.send(S, examples[_T.RESUME]) is St.RESUMING
    assert control.send(D, examples[_T.RESUMED]) is St.COMMITTING
    assert control.send(S, examples[_T.COMMIT]) is St.COMMIT_SENT
    assert control.send(D, examples[_T.COMMITTED]) is St.CLOSED
    # the data streams end with EOF: still in DATA, each for this migration
    for stream in streams:
        assert stream.state is St.DATA
        assert stream.sessions[D].migration_id == control.sessions[D].migration_id


def test_page_batch_on_the_control_connection_is_refused(examples):
    """v3: a v2-style source sending pages after Ready is refused (UNEXPECTED) on both ends."""
    pair = drive(St.TRANSFER, examples)
    assert pair.send(S, RoundEnd(round=0, pages_sent=0, dirty_pages=0)) is St.TRANSFER  # RoundEnd stays
    expect_unexpected(pair, S, examples[_T.PAGE_BATCH], St.TRANSFER)
    zero = PageBatch(section=0, round=0, runs=((0, 1),), flags=BatchFlags.ZERO, payload_len=0)
    pair = drive(St.TRANSFER, examples)
    expect_unexpected(pair, S, zero, St.TRANSFER)


# -- data streams ------------------------------------------------------------------


@pytest.mark.parametrize("auth", [False, True])
def test_data_stream(examples, auth):
    """Join first (no Hello, no Auth: the token is the credential), then pages and round ends."""
    pair = Pair(auth_required=auth)
    join = examples[_T.JOIN]
    assert pair.send(S, join) is St.DATA
    assert pair.sessions[S].migration_id == pair.sessions[D].migration_id == join.migration_id
    for rnd in range(4):
        batch = PageBatch(section=0, round=rnd, runs=((rnd, 1),), flags=BatchFlags.NONE, payload_len=PAGE_SIZE)
        assert pair.send(S, batch, bytes([rnd]) * PAGE_SIZE) is St.DATA
        assert pair.send(S, examples[_T.PAGE_BATCH], b"\0" * examples[_T.PAGE_BATCH].payload_len) is St.DATA
        assert pair.send(S, RoundEnd(round=rnd, pages_sent=7, dirty_pages=0)) is St.DATA
    assert pair.send(S, RoundEnd(round=4, pages_sent=0, dirty_pages=0)) is St.DATA  # an empty part of a round
    assert pair.sessions[S].migration_id == join.migration_id  # pages carry no id: it stays the Join's
    with pytest.raises(LocalProtocolError):
        pair.sessions[S].set_auth_required(not auth)  # no auth step on a data stream
    assert pair.state is St.DATA


def test_join_sets_the_migration_id(example_factory):
    for mid in ("a", "mig-other", "x" * 64):
        pair = Pair()
        pair.send(S, example_factory(mid)[_T.JOIN])
        assert pair.sessions[S].migration_id == pair.sessions[D].migration_id == mid


def test_data_stream_allows_only_pages(examples):
    pair = drive(St.DATA, examples)
    source, dest = pair.sessions[S], pair.sessions[D]
    assert source.allowed_to_send() == {_T.PAGE_BATCH, _T.ROUND_END, _T.ABORT} == dest.allowed_to_receive()
    assert dest.allowed_to_send() == {_T.ABORT} == source.allowed_to_receive()


@pytest.mark.parametrize(
    "sender, msg_type",
    [
        (S, _T.HELLO),  # a data stream never becomes a control connection
        (S, _T.PREPARE),
        (S, _T.QUERY),
        (S, _T.JOIN),  # Join twice
        (S, _T.AUTH),
        (S, _T.SECTION_STATE),  # control messages stay on the control connection
        (S, _T.STATE_TRANSFER),
        (S, _T.RESUME),
        (S, _T.COMMIT),
        (D, _T.WELCOME),
        (D, _T.READY),
        (D, _T.ROUND_ACK),  # acks travel on the control connection
        (D, _T.DIGESTS),
        (D, _T.REJECT),
        (D, _T.PAGE_BATCH),  # wrong direction
        (D, _T.ROUND_END),
        (D, _T.JOIN),
    ],
    ids=lambda v: getattr(v, "name", None) or str(v),
)
def test_data_stream_refuses(sender, msg_type, examples):
    expect_unexpected(drive(St.DATA, examples), sender, examples[msg_type], St.DATA)


def test_second_join_refused_even_for_the_same_stream(examples):
    pair = drive(St.DATA, examples)
    expect_unexpected(pair, S, examples[_T.JOIN], St.DATA)
    pair = drive(St.DATA, examples)
    other = Join(migration_id="mig-other", stream=0, token=bytes(16))
    expect_unexpected(pair, S, other, St.DATA)


@pytest.mark.parametrize("sender", [S, D], ids=lambda r: r.value)
def test_abort_from_data_closes(sender, examples):
    pair = drive(St.DATA, examples)
    pair.send(S, examples[_T.PAGE_BATCH], b"\0" * examples[_T.PAGE_BATCH].payload_len)
    assert pair.send(sender, Abort(code=ErrorCode.TIMEOUT, reason="stream stalled")) is St.CLOSED
    # nothing more on a closed data stream, not even a late page
    expect_unexpected(pair, S, examples[_T.PAGE_BATCH], St.CLOSED)


@pytest.mark.parametrize(
    "state", [St.WELCOME, St.AUTH, St.IDLE, St.PREPARING, St.TRANSFER, St.SWITCHOVER, St.CLOSED],
    ids=lambda s: s.name,
)
def test_join_only_as_first_frame(state, examples):
    """Join opens a connection: once a control conversation started it is refused."""
    expect_unexpected(drive(state, examples), S, examples[_T.JOIN], state)


def test_resume_without_digests_only_after_state_transfer(examples):
    """No Digests is not an order error (the source decides when it has
    verified enough); skipping StateTransfer is."""
    pair = drive(St.SWITCHOVER, examples)
    assert pair.send(S, examples[_T.RESUME]) is St.RESUMING
    assert pair.send(D, examples[_T.RESUMED]) is St.COMMITTING

    pair = drive(St.TRANSFER, examples)
    expect_unexpected(pair, S, examples[_T.RESUME], St.TRANSFER)


def test_late_round_ack_around_the_digests(examples):
    pair = drive(St.SWITCHOVER, examples)
    assert pair.send(D, RoundAck(round=7)) is St.SWITCHOVER
    assert pair.send(D, examples[_T.DIGESTS]) is St.SWITCHOVER
    assert pair.send(D, RoundAck(round=8)) is St.SWITCHOVER
    assert pair.send(S, examples[_T.RESUME]) is St.RESUMING
    assert pair.send(D, RoundAck(round=9)) is St.RESUMING
    assert pair.send(D, examples[_T.RESUMED]) is St.COMMITTING


def test_digests_mismatch_is_aborted_before_resume(examples):
    """The v2 failure path: the source aborts in SWITCHOVER, no Resume ever."""
    pair = drive(St.SWITCHOVER, examples)
    assert pair.send(D, examples[_T.DIGESTS]) is St.SWITCHOVER
    abort = Abort(code=ErrorCode.VERIFY_FAILED, reason="section 2 chunk 5 differs")
    assert pair.send(S, abort) is St.CLOSED


def _after_digests(examples) -> Pair:
    pair = drive(St.SWITCHOVER, examples)
    pair.send(D, examples[_T.DIGESTS])
    assert pair.state is St.SWITCHOVER
    return pair


def _after_resume(examples) -> Pair:
    pair = _after_digests(examples)
    pair.send(S, examples[_T.RESUME])
    assert pair.state is St.RESUMING
    return pair


def test_resumed_before_resume_is_unexpected(examples):
    expect_unexpected(_after_digests(examples), D, examples[_T.RESUMED], St.SWITCHOVER)
    expect_unexpected(drive(St.SWITCHOVER, examples), D, examples[_T.RESUMED], St.SWITCHOVER)


def test_digests_after_resume_is_unexpected(examples):
    expect_unexpected(_after_resume(examples), D, examples[_T.DIGESTS], St.RESUMING)


def test_section_state_after_state_transfer_is_unexpected(examples):
    expect_unexpected(_after_digests(examples), S, examples[_T.SECTION_STATE], St.SWITCHOVER)


def test_query_path(examples):
    pair = drive(St.IDLE, examples)
    assert pair.send(S, examples[_T.QUERY]) is St.QUERYING
    assert pair.send(D, examples[_T.QUERY_RESULT]) is St.CLOSED


@pytest.mark.parametrize("state", [St.WELCOME, St.IDLE, St.PREPARING, St.QUERYING])
def test_reject_closes(state, examples):
    pair = drive(state, examples)
    assert pair.send(D, Reject(code=ErrorCode.BUSY, reason="full")) is St.CLOSED


def test_bad_auth_proof_is_rejected(examples):
    pair = drive(St.AUTH, examples)
    pair.send(S, Auth(proof=b"\xee" * 32))
    assert pair.send(D, Reject(code=ErrorCode.AUTH_FAILED, reason="bad proof")) is St.CLOSED


def test_pipelined_prepare_then_reject_for_bad_auth(examples):
    pair = drive(St.AUTH, examples)
    source, dest = pair.sessions[S], pair.sessions[D]
    auth_frame = source.send(examples[_T.AUTH])
    assert auth_frame
    source.send(examples[_T.PREPARE])  # sent before the destination checked the proof
    dest.receive(examples[_T.AUTH])
    reject = Reject(code=ErrorCode.AUTH_FAILED, reason="bad proof")
    dest.send(reject)
    source.receive(reject)
    assert source.state is dest.state is St.CLOSED


# -- auth decision ---------------------------------------------------------------


def test_set_auth_required_after_welcome(examples):
    source = MigrationSession(S)
    source.send(examples[_T.HELLO])
    source.receive(examples[_T.WELCOME])
    assert source.state is St.IDLE
    source.set_auth_required(True)  # e.g. Welcome carried a server proof
    assert source.state is St.AUTH and source.auth_required
    source.set_auth_required(False)
    assert source.state is St.IDLE
    source.set_auth_required(True)
    source.send(examples[_T.AUTH])
    assert source.state is St.IDLE
    with pytest.raises(LocalProtocolError):
        source.set_auth_required(False)
    assert source.state is St.IDLE  # a refused decision is not a protocol error


def test_set_auth_required_before_welcome(examples):
    dest = MigrationSession(D)
    dest.receive(examples[_T.HELLO])
    dest.set_auth_required(True)
    assert dest.state is St.WELCOME
    dest.send(examples[_T.WELCOME])
    assert dest.state is St.AUTH
    with pytest.raises(RemoteProtocolError):
        dest.receive(examples[_T.PREPARE])  # skipping Auth
    assert dest.state is St.ERROR


def test_set_auth_required_closed_after_first_message_past_welcome(examples):
    pair = drive(St.IDLE, examples)
    pair.send(S, examples[_T.QUERY])
    with pytest.raises(LocalProtocolError):
        pair.sessions[S].set_auth_required(True)


# -- aborts ----------------------------------------------------------------------


@pytest.mark.parametrize("sender", [S, D], ids=lambda r: r.value)
@pytest.mark.parametrize("state", sorted(ABORTABLE_STATES, key=lambda s: s.value), ids=lambda s: s.name)
def test_abort_in_each_state(state, sender, examples):
    pair = drive(state, examples)
    assert pair.send(sender, Abort(code=ErrorCode.CANCELLED, reason="cancel")) is St.CLOSED


@pytest.mark.parametrize("sender", [S, D], ids=lambda r: r.value)
@pytest.mark.parametrize("state", [St.HELLO, St.WELCOME, St.CLOSED], ids=lambda s: s.name)
def test_abort_not_allowed(state, sender, examples):
    pair = drive(state, examples)
    abort = Abort(code=ErrorCode.CANCELLED, reason="x")
    with pytest.raises(LocalProtocolError):
        pair.sessions[sender].send(abort)
    assert pair.sessions[sender].state is St.ERROR
    with pytest.raises(RemoteProtocolError) as info:
        pair.sessions[sender.peer].receive(abort)
    assert info.value.code is ErrorCode.UNEXPECTED
    assert pair.sessions[sender.peer].state is St.ERROR


# -- out of order ------------------------------------------------------------------


@pytest.mark.parametrize(
    "state, sender, msg_type",
    [
        (St.HELLO, S, _T.PREPARE),
        (St.HELLO, D, _T.WELCOME),  # destination speaks first
        (St.WELCOME, S, _T.HELLO),  # Hello twice
        (St.IDLE, S, _T.AUTH),  # auth not required
        (St.AUTH, S, _T.PREPARE),  # auth required but skipped
        (St.IDLE, D, _T.READY),  # Ready without Prepare
        (St.PREPARING, S, _T.PAGE_BATCH),  # before Ready
        (St.TRANSFER, S, _T.PAGE_BATCH),  # v3: pages only on a data stream
        (St.TRANSFER, D, _T.PAGE_BATCH),  # wrong direction
        (St.HELLO, S, _T.PAGE_BATCH),  # pages before Join
        (St.HELLO, S, _T.ROUND_END),  # round end before Join
        (St.HELLO, D, _T.JOIN),  # wrong direction
        (St.TRANSFER, S, _T.JOIN),  # Join on the control connection
        (St.TRANSFER, S, _T.RESUME),  # Resume before the vCPU state
        (St.TRANSFER, D, _T.DIGESTS),  # digests before the pause
        (St.TRANSFER, D, _T.SECTION_STATE),  # wrong direction
        (St.PREPARING, S, _T.SECTION_STATE),  # before Ready
        (St.SWITCHOVER, S, _T.PAGE_BATCH),  # pages after StateTransfer
        (St.SWITCHOVER, S, _T.SECTION_STATE),  # section state after StateTransfer
        (St.SWITCHOVER, S, _T.STATE_TRANSFER),  # StateTransfer twice
        (St.SWITCHOVER, S, _T.DIGESTS),  # wrong direction
        (St.SWITCHOVER, D, _T.RESUMED),  # Resumed before Resume
        (St.TRANSFER, D, _T.RESUMED),  # Resumed before anything
        (St.SWITCHOVER, S, _T.COMMIT),  # commit before resume
        (St.RESUMING, D, _T.DIGESTS),  # digests after Resume (v1 order)
        (St.RESUMING, S, _T.COMMIT),  # commit before Resumed
        (St.RESUMING, S, _T.RESUME),  # Resume twice
        (St.COMMITTING, D, _T.DIGESTS),  # digests after Resumed (v1 order)
        (St.COMMITTING, D, _T.RESUMED),  # Resumed twice
        (St.COMMITTING, D, _T.COMMITTED),  # Committed before Commit
        (St.COMMIT_SENT, S, _T.COMMIT),  # Commit twice
        (St.QUERYING, S, _T.PREPARE),
        (St.CLOSED, S, _T.HELLO),
    ],
    ids=lambda v: getattr(v, "name", None) or str(v),
)
def test_out_of_order(state, sender, msg_type, examples):
    expect_unexpected(drive(state, examples), sender, examples[msg_type], state)


def test_failed_send_produces_no_bytes_and_keeps_error(examples):
    session = MigrationSession(S)
    with pytest.raises(LocalProtocolError):
        session.send(examples[_T.READY])
    with pytest.raises(LocalProtocolError):
        session.send(examples[_T.HELLO])  # even a once-legal message
    with pytest.raises(LocalProtocolError):
        session.set_auth_required(True)


@pytest.mark.parametrize("msg", [Ready(migration_id="other", prefault_ms=0, streams=1, token=bytes(16))], ids=["Ready"])
def test_migration_id_must_match(msg, examples):
    pair = drive(St.PREPARING, examples)
    with pytest.raises(LocalProtocolError) as info:
        pair.sessions[D].send(msg)
    assert "other" in str(info.value)
    with pytest.raises(RemoteProtocolError):
        pair.sessions[S].receive(msg)


@pytest.mark.parametrize("state, msg_type", [(St.SWITCHOVER, _T.RESUME), (St.COMMITTING, _T.COMMIT), (St.QUERYING, _T.QUERY_RESULT)])
def test_ids_checked_for_later_messages(state, msg_type, examples, example_factory):
    pair = drive(state, examples)
    wrong = example_factory("mig-other")[msg_type]
    sender = SENDER[msg_type]
    with pytest.raises(LocalProtocolError):
        pair.sessions[sender].send(wrong)
    with pytest.raises(RemoteProtocolError):
        pair.sessions[sender.peer].receive(wrong)


def test_non_message_is_refused():
    session = MigrationSession(S)
    with pytest.raises(LocalProtocolError):
        session.send(b"raw")  # type: ignore[arg-type]
    assert session.state is St.ERROR


def test_role_must_be_role():
    with pytest.raises(TypeError):
        MigrationSession("source")  # type: ignore[arg-type]


# -- introspection -------------------------------------------------------------------


def test_allowed_sets(examples):
    source, dest = MigrationSession(S), MigrationSession(D)
    # a new connection: Hello (control) or Join (data stream)
    assert source.allowed_to_send() == {_T.HELLO, _T.JOIN} == dest.allowed_to_receive()
    assert source.allowed_to_receive() == frozenset() == dest.allowed_to_send()
    pair = drive(St.TRANSFER, examples)
    assert pair.sessions[S].allowed_to_send() == {
        _T.ROUND_END, _T.SECTION_STATE, _T.STATE_TRANSFER, _T.ABORT
    }
    assert pair.sessions[S].allowed_to_receive() == {_T.ROUND_ACK, _T.ABORT}
    assert pair.sessions[D].allowed_to_send() == {_T.ROUND_ACK, _T.ABORT}
    pair = drive(St.SWITCHOVER, examples)
    assert pair.sessions[S].allowed_to_send() == {_T.RESUME, _T.ABORT} == pair.sessions[D].allowed_to_receive()
    assert pair.sessions[D].allowed_to_send() == {_T.DIGESTS, _T.ROUND_ACK, _T.ABORT}
    pair = drive(St.RESUMING, examples)
    assert pair.sessions[D].allowed_to_send() == {_T.RESUMED, _T.ROUND_ACK, _T.ABORT}
    assert pair.sessions[S].allowed_to_send() == {_T.ABORT}
    pair = drive(St.COMMITTING, examples)
    assert pair.sessions[S].allowed_to_send() == {_T.COMMIT, _T.ABORT}
    assert pair.sessions[D].allowed_to_send() == {_T.ABORT}


def test_roles_and_repr():
    assert Role.SOURCE.value == "source" and Role.DESTINATION.value == "destination"
    assert Role.SOURCE.peer is Role.DESTINATION and Role.DESTINATION.peer is Role.SOURCE
    session = MigrationSession(D, auth_required=True)
    assert session.role is D and session.auth_required and session.migration_id is None
    assert "destination" in repr(session) and "HELLO" in repr(session)
