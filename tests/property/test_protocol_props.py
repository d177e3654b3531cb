"""Property tests for protocol/: round trips, chunking, garbage, session table."""

from __future__ import annotations

from collections import deque

import msgpack
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol import (
    CLOSED,
    MAGIC,
    MAX_INCOMPLETE_FRAME_BYTES,
    MAX_SECTIONS,
    MAX_STREAMS,
    NEED_DATA,
    NONCE_BYTES,
    PAGE_SIZE,
    PREFIX,
    PREFIX_SIZE,
    QUERY_STATES,
    REGISTRY,
    TRANSITIONS,
    U64_MAX,
    Abort,
    Auth,
    BatchFlags,
    Commit,
    Committed,
    Digests,
    ErrorCode,
    FrameDecoder,
    Hello,
    Join,
    LocalProtocolError,
    Message,
    MigrationSession,
    MsgType,
    PageBatch,
    Payload,
    Prepare,
    Query,
    QueryResult,
    Ready,
    Reject,
    RemoteProtocolError,
    Resume,
    Resumed,
    Role,
    RoundAck,
    RoundEnd,
    SectionState,
    SessionState,
    StateTransfer,
    VERIFY_MODES,
    Welcome,
    decode_body,
    encode_frame,
    parse_prefix,
)
from tests.unit.protocol.conftest import make_examples

# -- strategies -------------------------------------------------------------------

u64 = st.integers(0, U64_MAX)
small_int = st.integers(0, 10_000)
ints = st.one_of(small_int, u64)
text = st.text(max_size=40)
ids = st.text(min_size=1, max_size=64)
features = st.lists(st.text(max_size=24), max_size=8).map(tuple)
nonce = st.binary(min_size=16, max_size=16)
codes = st.sampled_from(list(ErrorCode))
sections = st.integers(0, MAX_SECTIONS - 1)
streams = st.integers(1, MAX_STREAMS)
stream_index = st.integers(0, MAX_STREAMS - 1)
tokens = st.binary(min_size=NONCE_BYTES, max_size=NONCE_BYTES)


@st.composite
def hellos(draw) -> Hello:
    lo, hi = sorted((draw(ints), draw(ints)))
    return Hello(
        version_min=lo,
        version_max=hi,
        agent=draw(text),
        features=draw(features),
        max_live_migrations=draw(st.integers(1, U64_MAX)),
        nonce=draw(nonce),
    )


@st.composite
def page_batches(draw, max_pages: int = 64, max_runs: int = 8) -> PageBatch:
    counts = draw(st.lists(st.integers(1, max_pages), min_size=1, max_size=max_runs))
    counts = counts[: max(1, len(counts))]
    while sum(counts) > max_pages and len(counts) > 1:
        counts.pop()
    counts[0] = min(counts[0], max_pages)
    firsts = draw(st.lists(st.integers(0, 2**48), min_size=len(counts), max_size=len(counts)))
    flags = draw(st.sampled_from([BatchFlags.NONE, BatchFlags.ZERO]))
    pages = sum(counts)
    return PageBatch(
        section=draw(sections),
        round=draw(ints),
        runs=tuple(zip(firsts, counts)),
        flags=flags,
        payload_len=0 if flags & BatchFlags.ZERO else pages * PAGE_SIZE,
    )


STRATEGIES: dict[MsgType, st.SearchStrategy[Message]] = {
    MsgType.HELLO: hellos(),
    MsgType.WELCOME: st.builds(
        Welcome,
        version=ints,
        agent=text,
        features=features,
        max_live_migrations=ints,
        slots=st.integers(1, U64_MAX),
        nonce=nonce,
        proof=st.sampled_from([b"", b"\x5a" * 32]),
        slots_free=ints,
        memory_free_bytes=ints,
        status=st.sampled_from(["accepting", "maintenance"]),
    ),
    MsgType.AUTH: st.builds(Auth, proof=st.binary(min_size=32, max_size=32)),
    MsgType.REJECT: st.builds(Reject, code=codes, reason=text),
    MsgType.PREPARE: st.builds(
        Prepare,
        migration_id=ids,
        vm=ids,
        memory_bytes=st.integers(1, 2**40).map(lambda n: n * PAGE_SIZE),
        workload=text,
        features=features,
        source=text,
        sections=st.lists(st.text(min_size=1, max_size=12), min_size=1, max_size=4, unique=True).map(tuple),
        setup=st.binary(max_size=64),
        verify_mode=st.sampled_from(sorted(VERIFY_MODES)),
        streams=streams,
    ),
    MsgType.READY: st.builds(Ready, migration_id=ids, prefault_ms=ints, streams=streams, token=tokens),
    MsgType.PAGE_BATCH: page_batches(),
    MsgType.ROUND_END: st.builds(RoundEnd, round=ints, pages_sent=ints, dirty_pages=ints),
    MsgType.STATE_TRANSFER: st.builds(StateTransfer, vcpu_state=st.binary(max_size=64), device_state=st.binary(max_size=64)),
    MsgType.DIGESTS: st.builds(
        Digests, section=sections, chunk_pages=st.integers(1, U64_MAX), digests=st.integers(0, 8).map(lambda n: bytes(range(16)) * n)
    ),
    MsgType.RESUME: st.builds(Resume, migration_id=ids),
    MsgType.RESUMED: st.builds(Resumed, writes=ints),
    MsgType.COMMIT: st.builds(Commit, migration_id=ids),
    MsgType.COMMITTED: st.just(Committed()),
    MsgType.QUERY: st.builds(Query, migration_id=ids),
    MsgType.QUERY_RESULT: st.builds(QueryResult, migration_id=ids, state=st.sampled_from(sorted(QUERY_STATES))),
    MsgType.ABORT: st.builds(Abort, code=codes, reason=text),
    MsgType.ROUND_ACK: st.builds(RoundAck, round=ints),
    MsgType.SECTION_STATE: st.builds(SectionState, section=sections, data=st.binary(max_size=64)),
    MsgType.JOIN: st.builds(Join, migration_id=ids, stream=stream_index, token=tokens),
}
messages = st.one_of(*STRATEGIES.values())


def test_strategies_are_exhaustive():
    assert set(STRATEGIES) == set(MsgType) == set(REGISTRY)


def payload_for(msg: Message) -> bytes:
    n = msg.payload_len if isinstance(msg, PageBatch) else 0
    return (b"\x00\x01\x02\xfe\xff" * (n // 5 + 1))[:n]


# -- round trips -------------------------------------------------------------------


@settings(max_examples=400, deadline=None)
@given(messages)
def test_encode_decode_round_trip(msg):
    assert type(msg).from_body(msg.to_body()) == msg
    frame = encode_frame(msg)
    prefix = parse_prefix(frame)
    assert prefix.type is msg.TYPE and prefix.body_len == len(frame) - PREFIX_SIZE
    decoded = decode_body(prefix, frame[PREFIX_SIZE:])
    assert decoded == msg and type(decoded) is type(msg)
    # via msgpack's own view of the body as well (lists, not tuples)
    assert type(msg).from_body(msgpack.unpackb(frame[PREFIX_SIZE:])) == msg


def _events(stream: bytes, sizes: list[int] | None) -> list[object]:
    decoder = FrameDecoder()
    out: list[object] = []

    def drain() -> None:
        while (event := decoder.next_event()) is not NEED_DATA:
            if isinstance(event, Payload):
                assert 0 < len(event.data)
                if out and isinstance(out[-1], bytearray):
                    out[-1] += event.data
                else:
                    out.append(bytearray(event.data))
            else:
                out.append(event)
            if event is CLOSED:
                return
        assert decoder.buffered <= MAX_INCOMPLETE_FRAME_BYTES

    pos = 0
    i = 0
    while pos < len(stream):
        n = len(stream) if sizes is None else sizes[i % len(sizes)]
        decoder.receive_data(stream[pos : pos + n])
        pos += n
        i += 1
        drain()
    decoder.receive_data(b"")
    drain()
    return [bytes(e) if isinstance(e, bytearray) else e for e in out]


small_batches = page_batches(max_pages=2, max_runs=2)  # byte-at-a-time stays cheap
stream_messages = st.one_of(
    small_batches,  # about half of the frames carry (or announce) pages
    st.one_of(*(s for t, s in STRATEGIES.items() if t is not MsgType.PAGE_BATCH)),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(stream_messages, max_size=6), st.lists(st.integers(1, 5000), min_size=1, max_size=20))
def test_chunking_does_not_change_events(msgs, sizes):
    stream = b""
    expected: list[object] = []
    for msg in msgs:
        payload = payload_for(msg)
        stream += encode_frame(msg) + payload
        expected.append(msg)
        if payload:
            expected.append(payload)
    expected.append(CLOSED)
    assert _events(stream, None) == expected
    assert _events(stream, [1]) == expected
    assert _events(stream, sizes) == expected


# -- v3 bounds ---------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(st.integers(-(2**65), 2**65), tokens)
def test_stream_counts_are_1_to_max_streams(n, token):
    """Prepare.streams and Ready.streams: 1..MAX_STREAMS, nothing else."""
    base = CANONICAL[MsgType.PREPARE].to_body()
    for build in (lambda: Prepare.from_body({**base, "streams": n}),
                  lambda: Ready(migration_id=MID, prefault_ms=0, streams=n, token=token)):
        if 1 <= n <= MAX_STREAMS:
            assert build().streams == n
        else:
            try:
                build()
            except (LocalProtocolError, RemoteProtocolError) as exc:
                assert exc.code is ErrorCode.MALFORMED
            else:
                raise AssertionError(f"streams={n} accepted")


@settings(max_examples=300, deadline=None)
@given(st.integers(-(2**65), 2**65), tokens)
def test_join_stream_is_0_to_max_streams_minus_1(n, token):
    try:
        join = Join(migration_id=MID, stream=n, token=token)
    except LocalProtocolError as exc:
        assert exc.code is ErrorCode.MALFORMED
        assert not 0 <= n < MAX_STREAMS
    else:
        assert 0 <= n < MAX_STREAMS and join.stream == n


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=3 * NONCE_BYTES), st.sampled_from(["join", "ready"]))
def test_tokens_are_exactly_nonce_bytes(token, kind):
    try:
        if kind == "join":
            msg = Join(migration_id=MID, stream=0, token=token)
        else:
            msg = Ready(migration_id=MID, prefault_ms=0, streams=1, token=token)
    except LocalProtocolError as exc:
        assert exc.code is ErrorCode.MALFORMED and len(token) != NONCE_BYTES
    else:
        assert len(token) == NONCE_BYTES and msg.token == token
        assert decode_body(parse_prefix(encode_frame(msg)), encode_frame(msg)[PREFIX_SIZE:]) == msg


# -- garbage -------------------------------------------------------------------------


@st.composite
def garbage(draw) -> bytes:
    kind = draw(st.integers(0, 3))
    if kind == 0:
        return draw(st.binary(max_size=300))
    if kind == 1:
        return MAGIC + draw(st.binary(max_size=300))
    if kind == 2:
        body = draw(st.binary(max_size=200))
        return PREFIX.pack(
            MAGIC,
            draw(st.integers(0, max(MsgType) + 1)),  # every type, and unknown ones on both sides
            draw(st.sampled_from([0, 0, 0, 1])),
            draw(st.one_of(st.just(len(body)), st.integers(0, 2**32 - 1))),
            draw(st.one_of(st.just(0), st.integers(0, 2**32 - 1))),
        ) + body + draw(st.binary(max_size=50))
    # a valid stream with a few bytes changed, cut or extended
    msgs = draw(st.lists(stream_messages, min_size=1, max_size=3))
    data = bytearray(b"".join(encode_frame(m) + payload_for(m) for m in msgs))
    for _ in range(draw(st.integers(1, 4))):
        index = draw(st.integers(0, len(data) - 1))
        data[index] = draw(st.integers(0, 255))
    return bytes(data[: draw(st.integers(0, len(data)))]) + draw(st.binary(max_size=8))


@settings(max_examples=400, deadline=None)
@given(garbage(), st.lists(st.integers(1, 64), min_size=1, max_size=8))
def test_garbage_only_raises_remote_protocol_error(data, sizes):
    decoder = FrameDecoder()
    pos, i = 0, 0
    try:
        while True:
            chunk = data[pos : pos + sizes[i % len(sizes)]]
            pos += len(chunk)
            i += 1
            decoder.receive_data(chunk)  # b"" at the end is EOF
            while (event := decoder.next_event()) is not NEED_DATA:
                assert isinstance(event, (Message, Payload)) or event is CLOSED
                if event is CLOSED:
                    return
            assert decoder.buffered <= MAX_INCOMPLETE_FRAME_BYTES
            if not chunk:
                raise AssertionError("EOF must give CLOSED or an error")
    except RemoteProtocolError as exc:
        assert isinstance(exc.code, ErrorCode)
        try:
            decoder.next_event()
        except RemoteProtocolError:
            pass
        else:
            raise AssertionError("decoder must stay in error state")


msgpack_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(2**63), U64_MAX), st.floats(), text, st.binary(max_size=40)),
    lambda inner: st.one_of(st.lists(inner, max_size=6), st.dictionaries(text, inner, max_size=4)),
    max_leaves=12,
)
field_names = st.sampled_from(sorted({k for cls in REGISTRY.values() for k in cls._NAMES} | {"x"}))


@settings(max_examples=400, deadline=None)
@given(st.sampled_from(list(MsgType)), st.dictionaries(field_names, msgpack_values, max_size=8), st.data())
def test_random_bodies_decode_or_raise_malformed(msg_type, body, data):
    cls = REGISTRY[msg_type]
    if data.draw(st.booleans()):  # often start from a valid body and perturb it
        base = data.draw(STRATEGIES[msg_type]).to_body()
        body = {**base, **dict(list(body.items())[:1])}
    packed = msgpack.packb(body)
    prefix = parse_prefix(PREFIX.pack(MAGIC, msg_type, 0, len(packed), 0))
    try:
        msg = decode_body(prefix, packed)
    except RemoteProtocolError as exc:
        assert exc.code is ErrorCode.MALFORMED
    else:
        assert type(msg) is cls
        assert decode_body(prefix, encode_frame(msg)[PREFIX_SIZE:]) == msg


# -- session table -------------------------------------------------------------------

S, D = Role.SOURCE, Role.DESTINATION
MID = "mig-prop"
#: one valid message per type, ids = MID (the shared example table)
CANONICAL: dict[MsgType, Message] = make_examples(MID)
SAME_ID = {MsgType.READY, MsgType.RESUME, MsgType.COMMIT, MsgType.QUERY_RESULT}


def model_next(state: SessionState, sender: Role, msg: Message, auth: bool, mid: str | None) -> SessionState | None:
    """What the table says, or None if illegal."""
    new = TRANSITIONS.get((sender, state, msg.TYPE))
    if new is None:
        return None
    if msg.TYPE in SAME_ID and msg.migration_id != mid:  # type: ignore[attr-defined]
        return None
    if new is SessionState.AUTH and not auth:
        return SessionState.IDLE
    return new


def _paths() -> dict[SessionState, tuple[bool, list[tuple[Role, MsgType]]]]:
    """Shortest message path from HELLO to every reachable state (BFS on the table)."""
    found: dict[SessionState, tuple[bool, list[tuple[Role, MsgType]]]] = {}
    for auth in (False, True):
        queue = deque([(SessionState.HELLO, [])])
        seen = {SessionState.HELLO}
        while queue:
            state, path = queue.popleft()
            found.setdefault(state, (auth, path))
            for (sender, src, msg_type) in TRANSITIONS:
                if src is not state:
                    continue
                new = model_next(state, sender, CANONICAL[msg_type], auth, MID)
                if new is not None and new not in seen:
                    seen.add(new)
                    queue.append((new, [*path, (sender, msg_type)]))
    return found


PATHS = _paths()


def test_every_state_but_error_is_reachable():
    assert set(PATHS) == set(SessionState) - {SessionState.ERROR}


def _session_in(state: SessionState, role: Role) -> MigrationSession:
    auth, path = PATHS[state]
    session = MigrationSession(role, auth_required=auth)
    for sender, msg_type in path:
        if sender is role:
            session.send(CANONICAL[msg_type])
        else:
            session.receive(CANONICAL[msg_type])
    assert session.state is state
    return session


@settings(max_examples=600, deadline=None)
@given(
    st.sampled_from(sorted(PATHS, key=lambda s: s.value)),
    st.sampled_from([S, D]),
    st.booleans(),
    st.one_of(st.sampled_from(list(CANONICAL.values())), messages),
)
def test_every_state_message_pair_is_legal_or_an_error(state, role, sending, msg):
    session = _session_in(state, role)
    sender = role if sending else role.peer
    expected = model_next(state, sender, msg, session.auth_required, session.migration_id)
    try:
        if sending:
            assert session.send(msg) == encode_frame(msg)
        else:
            assert session.receive(msg) is msg
    except (LocalProtocolError, RemoteProtocolError) as exc:
        assert expected is None, f"legal move refused: {exc}"
        assert isinstance(exc, LocalProtocolError if sending else RemoteProtocolError)
        assert exc.code is ErrorCode.UNEXPECTED
        assert session.state is SessionState.ERROR
        for call in (session.send, session.receive):
            try:
                call(CANONICAL[MsgType.ABORT])
            except (LocalProtocolError, RemoteProtocolError):
                pass
            else:
                raise AssertionError("ERROR state must refuse everything")
    else:
        assert expected is not None, "illegal move accepted"
        assert session.state is expected


#: What a data stream carries after its Join, written out from the spec
#: (protocol/session.py's docstring), independently of TRANSITIONS.
DATA_SENDS = {S: {MsgType.PAGE_BATCH, MsgType.ROUND_END, MsgType.ABORT}, D: {MsgType.ABORT}}


@settings(max_examples=300, deadline=None)
@given(st.sampled_from([S, D]), st.sampled_from([S, D]), messages)
def test_data_stream_carries_only_pages(role, sender, msg):
    """In DATA: PageBatch/RoundEnd from the source (stays DATA), Abort from
    either (CLOSED); every other message, from either side, is UNEXPECTED."""
    session = _session_in(SessionState.DATA, role)
    action = session.send if sender is role else session.receive
    if msg.TYPE in DATA_SENDS[sender]:
        action(msg)
        assert session.state is (SessionState.CLOSED if msg.TYPE is MsgType.ABORT else SessionState.DATA)
        assert session.migration_id == MID  # set by the Join, untouched by what follows
    else:
        try:
            action(msg)
        except (LocalProtocolError, RemoteProtocolError) as exc:
            assert exc.code is ErrorCode.UNEXPECTED
            assert session.state is SessionState.ERROR
        else:
            raise AssertionError(f"{type(msg).__name__} from {sender.value} accepted in DATA")


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from(sorted(set(PATHS) - {SessionState.DATA}, key=lambda s: s.value)),
    st.sampled_from([S, D]),
    page_batches(),
)
def test_pages_are_refused_outside_data_streams(state, role, batch):
    """v3: no state of the control conversation accepts a PageBatch, from either side."""
    for sender in (S, D):
        session = _session_in(state, role)
        try:
            (session.send if sender is role else session.receive)(batch)
        except (LocalProtocolError, RemoteProtocolError) as exc:
            assert exc.code is ErrorCode.UNEXPECTED
        else:
            raise AssertionError(f"PageBatch from {sender.value} accepted in {state.name}")


@settings(max_examples=200, deadline=None)
@given(st.booleans(), st.lists(st.tuples(st.sampled_from(list(CANONICAL.values())), st.sampled_from([S, D])), max_size=40))
def test_random_legal_walks_keep_both_ends_in_step(auth, moves):
    ends = {S: MigrationSession(S, auth_required=auth), D: MigrationSession(D, auth_required=auth)}
    for msg, sender in moves:
        if msg.TYPE not in ends[sender].allowed_to_send():
            assert msg.TYPE not in ends[sender.peer].allowed_to_receive()
            continue
        frame = ends[sender].send(msg)
        decoder = FrameDecoder()
        decoder.receive_data(frame)
        ends[sender.peer].receive(decoder.next_event())
        assert ends[S].state is ends[D].state
        assert ends[S].migration_id == ends[D].migration_id
        if ends[S].state is SessionState.CLOSED:
            break
