import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.errors import InvalidTransition
from agent.migration.phases import FINAL, TRANSITIONS, MigrationPhase, PhaseTracker, is_cancellable

P = MigrationPhase
HAPPY = [P.QUEUED, P.NEGOTIATE, P.SETUP, P.PRECOPY, P.STOP_AND_COPY, P.VERIFY, P.RESUME, P.COMMIT, P.COMPLETED]


def test_every_phase_in_table():
    assert set(TRANSITIONS) == set(MigrationPhase)
    assert len(MigrationPhase) == 13           # a new phase must be added to the table and to this count
    for targets in TRANSITIONS.values():
        assert targets <= set(MigrationPhase)


def test_finals_are_terminal_and_reachable():
    for f in FINAL:
        assert TRANSITIONS[f] == frozenset()
    reachable, todo = {P.QUEUED}, [P.QUEUED]
    while todo:
        for n in TRANSITIONS[todo.pop()]:
            if n not in reachable:
                reachable.add(n)
                todo.append(n)
    assert reachable == set(MigrationPhase)


def test_happy_path_and_durations():
    t = PhaseTracker()
    for old, new in zip(HAPPY, HAPPY[1:]):
        t.set_phase(expected=old, new=new)
    assert t.phase is P.COMPLETED
    assert set(t.durations_ms) == {p.value for p in HAPPY[:-1]}


def test_cancel_not_after_resume():
    # Verification comes before resume: until Resume is sent the source owns the VM.
    assert is_cancellable(P.PRECOPY) and is_cancellable(P.QUEUED) and is_cancellable(P.STOP_AND_COPY)
    assert is_cancellable(P.VERIFY)
    assert not is_cancellable(P.RESUME) and not is_cancellable(P.COMMIT)


@given(st.sampled_from(list(MigrationPhase)), st.sampled_from(list(MigrationPhase)), st.sampled_from(list(MigrationPhase)))
def test_cas_semantics(current, expected, new):
    t = PhaseTracker(current)
    legal = current is expected and new in TRANSITIONS[current]
    if legal:
        t.set_phase(expected=expected, new=new)
        assert t.phase is new
    else:
        with pytest.raises(InvalidTransition):
            t.set_phase(expected=expected, new=new)
        assert t.phase is current


def test_job_progress_never_runs_backwards():
    from agent.migration.jobs import Job

    j = Job(vm="v", source="a", destination="b", direction="outbound")
    seen = []
    # round 1 half done, round 1 done with many dirty pages, round 2 ...
    for sent, remaining_pages in [(100, 900), (1000, 0), (1000, 400), (1200, 250), (1400, 0)]:
        j.stats.pages_sent, j.stats.remaining_bytes = sent, remaining_pages * 4096
        seen.append(j.progress())
    assert seen == sorted(seen) and seen[0] == 10.0 and seen[-1] <= 99.9
