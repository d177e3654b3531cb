"""Migration history: the reports of finished jobs, kept in ``<data_dir>/history.jsonl``.

``JobHistory`` is a JobTable observer (``job_finished``): each finished job,
inbound or outbound, appends its report as one JSON line. The file is a
bounded ring: once it holds ``2 x limit`` lines it is rewritten with the
newest ``limit`` (a temporary file, fsync, rename: a crash leaves the old
file or the new one, never half of one). A line that does not parse (a
crash in the middle of an append) is skipped at load.

The control ops read it for ``jobs`` (finished jobs survive an agent
restart; ``vm``/``state``/``since`` filters) and ``vm show`` (the VM's last
migration). Each report carries ``state`` next to ``status`` (``job_report``).
"""
from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, Iterable

from agent.observe.logs import get_logger

if TYPE_CHECKING:
    from agent.migration.jobs import Job

log = get_logger("livemig.control.history")

HISTORY_FILE = "history.jsonl"
HISTORY_LIMIT = 200

#: What ``vm show`` tells of a VM's last migration.
LAST_MIGRATION_KEYS = ("id", "state", "direction", "source", "destination", "finished_at", "downtime_ms",
                       "verified", "error")


def job_report(job: "Job") -> dict:
    """``job.report()`` with ``state`` (the job's phase, as ``jobs`` shows it) next to ``status``."""
    r = job.report()
    return {"id": r["id"], "status": r["status"], "state": job.phase.value,
            **{k: v for k, v in r.items() if k not in ("id", "status")}}


class JobHistory:
    """The last ``limit`` finished jobs of this agent, in memory and in ``<data_dir>/history.jsonl``."""

    def __init__(self, data_dir: str, limit: int = HISTORY_LIMIT) -> None:
        self.path = os.path.join(data_dir, HISTORY_FILE)
        self.limit = limit
        self._records: list[dict] = []
        self._lines = 0                      # lines in the file (compaction at 2 x limit)
        self._load()

    # ---- the file ------------------------------------------------------------
    def _load(self) -> None:
        try:
            with open(self.path, encoding="utf-8") as f:
                lines = f.readlines()
        except FileNotFoundError:
            return
        except OSError as exc:
            log.warning("history_unreadable", path=self.path, error=str(exc))
            return
        bad = 0
        for line in lines:
            try:
                rec = json.loads(line)
            except ValueError:
                bad += 1
                continue
            if isinstance(rec, dict) and isinstance(rec.get("id"), str):
                self._records.append(rec)
            else:
                bad += 1
        self._lines = len(lines)
        self._records = self._records[-self.limit:]
        if bad:
            log.warning("history_lines_skipped", path=self.path, lines=bad)

    def _append(self, rec: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(rec, separators=(",", ":")) + "\n")
        self._lines += 1
        if self._lines >= 2 * self.limit:
            self._compact()

    def _compact(self) -> None:
        tmp = f"{self.path}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            for rec in self._records:
                f.write(json.dumps(rec, separators=(",", ":")) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        self._lines = len(self._records)

    # ---- JobTable observer ---------------------------------------------------
    def job_started(self, job: "Job") -> None:
        pass

    def job_finished(self, job: "Job") -> None:
        rec = job_report(job)
        self._records.append(rec)
        del self._records[:-self.limit]
        try:
            self._append(rec)
        except OSError as exc:               # a full disk must not fail the migration's end
            log.warning("history_write_failed", path=self.path, job=job.id, error=str(exc))

    # ---- queries -------------------------------------------------------------
    def records(self) -> list[dict]:
        """Oldest first."""
        return list(self._records)

    def get(self, job_id: str) -> dict | None:
        return next((r for r in reversed(self._records) if r.get("id") == job_id), None)

    def last_migration(self, vm: str) -> dict | None:
        """The newest finished migration of ``vm`` (either direction), the fields vm show prints."""
        rec = next((r for r in reversed(self._records) if r.get("vm") == vm), None)
        if rec is None:
            return None
        out = {k: rec.get(k) for k in LAST_MIGRATION_KEYS}
        out["state"] = rec.get("state") or rec.get("status")
        return out


def history_of(observers: Iterable) -> JobHistory | None:
    """The JobHistory among a JobTable's observers (registered by the agent), or None."""
    return next((o for o in observers if isinstance(o, JobHistory)), None)


def matches(row: dict, vm: str | None, state: str | None, since: float | None) -> bool:
    """The ``jobs`` filters: VM name, state (``state`` or ``status``), running or ended at/after ``since``."""
    if vm is not None and row.get("vm") != vm:
        return False
    if state is not None and state not in (row.get("state"), row.get("status")):
        return False
    # a job still running is within any window; a finished one by its end
    return since is None or row.get("finished_at") is None or row["finished_at"] >= since
