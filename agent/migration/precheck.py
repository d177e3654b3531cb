"""``migrate --dry-run`` and the fail-fast check of ``migrate`` without --wait:
connect, handshake, and ask the destination's admission (name, memory and
/dev/shm, maintenance, slots, workload, the sections this agent migrates
with) without creating anything there (a Prepare with the "dry-run"
feature is answered Ready or Reject, and the destination keeps nothing)."""
from __future__ import annotations

import secrets
import time

import msgpack

from protocol import Prepare, ProtocolError, Ready

from agent.daemon.config import parse_hostport
from agent.errors import AgentError, PeerError
from agent.migration.catalog import SECTIONS
from agent.migration.destination import DRY_RUN
from agent.net.peer import open_session


async def precheck(host, vm, target: str, verify_mode: str | None = None,
                   setup: dict[str, dict] | None = None, options: dict | None = None) -> dict:
    """{"ok": bool, "destination", "agent", "reason", "code", "ms"}; never raises for a refusal.
    ``setup`` gives some sections' setup maps for the destination's probes
    (section.py ``probes``); the others get an empty map."""
    t0 = time.monotonic()
    h, p = parse_hostport(target)
    from agent.migration.platform_section import NAME as PLATFORM, platform_info

    setup = {PLATFORM: platform_info(vm, options), **(setup or {})}    # CPU and networks are checked too
    names = tuple(SECTIONS.outgoing)
    out = {"ok": False, "destination": target, "agent": None, "reason": None, "code": None}
    conn = None
    try:
        conn, _, welcome = await open_session(host, h, p)
        out["agent"] = welcome.agent
        await conn.send(Prepare(
            migration_id=f"dry-{secrets.token_hex(6)}", vm=vm.name, memory_bytes=vm.record.memory_bytes,
            workload=vm.record.workload, features=(DRY_RUN,), source=host.name, sections=names,
            setup=msgpack.packb([setup.get(n, {}) for n in names]), verify_mode=verify_mode or host.cfg.migration.verify,
            streams=host.cfg.migration.data_streams()))
        await conn.expect(Ready, host.cfg.migration.handshake_timeout_s)
        out["ok"] = True
    except PeerError as exc:
        out["reason"], out["code"] = str(exc), exc.code
    except (AgentError, ProtocolError, OSError, TimeoutError) as exc:
        out["reason"] = str(exc) or f"cannot reach {target}"
    finally:
        if conn is not None:
            conn.close()
    out["ms"] = round((time.monotonic() - t0) * 1000.0, 1)
    return out
