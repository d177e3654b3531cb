"""State checks for the fault tests, shared by test_fault_matrix, test_verify and test_switchover.

The end state every fault must reach (``settled``):

- the VM runs on exactly one host: listed there with state ``running``,
  listed by no other agent (``assert_runs_on_exactly_one``);
- its write counter is at least a value read before the fault;
- no job is left running on any agent;
- the only segments with the test's prefix are the VM's own, on the host
  that runs it, and the only guest process is that VM's guest;
- no ``held.*`` file is left in any data dir;
- throttle_pct is 0.

``RunMonitor`` watches the same thing *while* the fault plays out: it
samples the control page of every segment with the test's prefix every
~5 ms and records a violation when two guests run at once (in two
consecutive samples) or when a running copy's write counter is below one
seen earlier.
"""
from __future__ import annotations

import glob
import os
import signal
import socket
import struct
import threading
import time

from agent.errors import AgentError

SHM = "/dev/shm"
CALL_TIMEOUT_S = 3.0
FINAL = ("completed", "failed", "cancelled")


# ---- small probes ------------------------------------------------------------
def free_addr() -> str:
    """A free TCP port on 127.0.0.1, as HOST:PORT (fixed, so a restarted agent keeps its address)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


def segments(prefix: str, agent: str | None = None) -> set[str]:
    head = f"{prefix}." if agent is None else f"{prefix}.{agent}."
    return {n for n in os.listdir(SHM) if n.startswith(head)}


def guest_pids(prefix: str, agent: str | None = None, vm: str | None = None) -> dict[int, str]:
    """Live (non-zombie) guest processes of the test's segments: {pid: segment}."""
    from memstore.guest import find_guests

    head = f"{prefix}." + (f"{agent}." if agent else "") + (f"{vm}." if agent and vm else "")
    return {pid: seg for seg, pids in find_guests(head).items() for pid in pids}


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return False


def kill_guest(prefix: str, agent: str, vm: str, timeout_s: float = 10.0) -> int:
    """SIGKILL the VM's guest on ``agent`` (waits for it to exist, then until it is dead)."""
    from tests.conftest import wait_for

    pids = wait_for(lambda: guest_pids(prefix, agent, vm), timeout_s, interval_s=0.002,
                    what=f"a guest of {vm} on {agent}")
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    for pid in pids:
        wait_for(lambda: not pid_alive(pid), timeout_s, interval_s=0.002, what=f"guest {pid} dead")
    return next(iter(pids))


def held_files(*ags) -> list[str]:
    return sorted(p for ag in ags for p in glob.glob(os.path.join(ag.data_dir, "held.*")))


def call(ag, op: str, **args):
    """A control call that fails fast (an agent that is down or stopped must not hang a poll)."""
    return ag.call(op, timeout_s=CALL_TIMEOUT_S, **args)


def vm_info(ag, vm: str) -> dict | None:
    for v in call(ag, "vm.list"):
        if v["name"] == vm:
            return v
    return None


def writes(ag, vm: str) -> int:
    return call(ag, "vm.show", name=vm)["writes"]


# ---- the end state -----------------------------------------------------------
def eventually(check, timeout_s: float, interval_s: float = 0.02, what: str = "the end state"):
    """Poll ``check()`` until it returns without AssertionError/AgentError; returns its result.
    On timeout raise an AssertionError with the last reason."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return check()
        except (AssertionError, AgentError, OSError) as exc:
            last = exc
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout_s} s: {last}") from last
        time.sleep(interval_s)


def assert_runs_on_exactly_one(ags, vm: str):
    """The VM is listed by exactly one of ``ags``, state ``running`` there. Returns (agent, info)."""
    listed = []
    for ag in ags:
        info = vm_info(ag, vm)
        if info is not None:
            listed.append((ag, info))
    where = [(ag.name, info["state"]) for ag, info in listed]
    assert len(listed) == 1, f"{vm} must be listed by exactly one agent, listed by {where or 'none'}"
    ag, info = listed[0]
    assert info["state"] == "running", f"{vm} on {ag.name} is {info['state']}, not running"
    return ag, info


def assert_no_job_running(ags) -> None:
    running = [(ag.name, j["id"], j["state"]) for ag in ags for j in call(ag, "jobs") if j["state"] not in FINAL]
    assert not running, f"jobs still running: {running}"


def assert_only_vm_left(prefix: str, info: dict) -> None:
    segs = segments(prefix)
    assert segs == {info["segment"]}, f"segments {sorted(segs)}, expected only {info['segment']}"
    pids = guest_pids(prefix)
    assert set(pids) == {info["guest_pid"]}, f"guest processes {pids}, expected only {info['guest_pid']}"


def assert_no_holds(ags) -> None:
    left = held_files(*ags)
    assert not left, f"held files left: {left}"


def settled(ags, vm: str, prefix: str, *, min_writes: int = 0, hosts=None):
    """Every condition of the end state at once (see the module docstring). Returns (agent, info)."""
    assert_no_job_running(ags)
    ag, info = assert_runs_on_exactly_one(ags, vm)
    if hosts is not None:
        assert ag.name in hosts, f"{vm} runs on {ag.name}, expected on {' or '.join(sorted(hosts))}"
    assert info["writes"] >= min_writes, f"writes {info['writes']} < {min_writes} read before the fault"
    assert info["throttle_pct"] == 0, f"throttle_pct {info['throttle_pct']} on {ag.name}"
    assert_only_vm_left(prefix, info)
    assert_no_holds(ags)
    return ag, info


def assert_keeps_writing(ag, vm: str, above: int, by: int = 100, timeout_s: float = 10.0) -> int:
    """The counter goes past ``above + by`` (and was never below ``above``)."""
    seen = []

    def grown():
        w = writes(ag, vm)
        seen.append(w)
        assert w >= above, f"writes {w} went below {above}"
        assert w > above + by, f"writes {w} not yet past {above + by}"
        return w

    return eventually(grown, timeout_s, what=f"{vm} writing on {ag.name}")


# ---- continuous watch --------------------------------------------------------
_CTL = struct.Struct("<16Q")          # the first 16 u64 slots of the control page
_SLOT_CMD, _SLOT_STATE, _SLOT_PID, _SLOT_WRITES = 3, 5, 6, 7
_RUN, _RUNNING = 0, 1


def running_copies(prefix: str) -> dict[str, int]:
    """{segment: writes} of the segments whose guest is alive and running (control page read with pread)."""
    out = {}
    for name in segments(prefix):
        try:
            fd = os.open(os.path.join(SHM, name), os.O_RDONLY)
        except OSError:
            continue
        try:
            raw = os.pread(fd, _CTL.size, 0)
        finally:
            os.close(fd)
        if len(raw) < _CTL.size:
            continue
        q = _CTL.unpack(raw)
        if q[_SLOT_CMD] == _RUN and q[_SLOT_STATE] == _RUNNING and q[_SLOT_PID] and pid_alive(q[_SLOT_PID]):
            out[name] = q[_SLOT_WRITES]
    return out


class RunMonitor:
    """Background sampler: never two running copies, never a counter below one seen earlier."""

    def __init__(self, prefix: str, interval_s: float = 0.005) -> None:
        self.prefix = prefix
        self.interval_s = interval_s
        self.violations: list[str] = []
        self.samples = 0
        self.max_writes = 0
        self.ever_ran: set[str] = set()        # segments seen running at least once
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "RunMonitor":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        double = 0
        while not self._stop.is_set():
            copies = running_copies(self.prefix)
            self.samples += 1
            double = double + 1 if len(copies) > 1 else 0
            if double == 2:       # two samples in a row: not a read that straddled a handover
                self.violations.append(f"two running copies: {copies}")
            self.ever_ran.update(copies)
            for seg, w in copies.items():
                if w < self.max_writes:
                    self.violations.append(f"{seg} runs with writes {w} < {self.max_writes} seen before")
                self.max_writes = max(self.max_writes, w)
            self._stop.wait(self.interval_s)

    def check(self) -> None:
        assert self.samples > 0, "the run monitor took no sample"
        assert not self.violations, f"run monitor: {self.violations[:5]}"

    def ran_on(self, agent: str) -> set[str]:
        """Segments of ``agent`` that were ever seen running."""
        return {seg for seg in self.ever_ran if seg.startswith(f"{self.prefix}.{agent}.")}
