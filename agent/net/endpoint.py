"""Migration endpoint: the TCP listener for inbound migrations and queries."""
from __future__ import annotations

import asyncio

from protocol import MigrationSession, Role

from agent.daemon.config import parse_hostport
from agent.migration.destination import DestinationMigration
from agent.daemon.host import Host
from agent.observe.logs import get_logger
from agent.net.transport import FrameProtocol

log = get_logger("livemig.endpoint")


class MigrationEndpoint:
    def __init__(self, host: Host) -> None:
        self.host = host
        self.server: asyncio.Server | None = None
        self.tasks: set[asyncio.Task] = set()

    async def start(self) -> tuple[str, int]:
        h, p = parse_hostport(self.host.cfg.agent.listen)
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(self._factory, h, p, reuse_address=True)
        addr = self.server.sockets[0].getsockname()
        return addr[0], addr[1]

    def _factory(self) -> FrameProtocol:
        return FrameProtocol(MigrationSession(Role.DESTINATION), on_connect=self._spawn)

    def _spawn(self, conn: FrameProtocol) -> None:
        if len(self.tasks) >= self.host.cfg.limits.max_connections:
            log.warning("connection_refused_limit", peer=conn.peer, limit=self.host.cfg.limits.max_connections)
            conn.close()
            return
        task = asyncio.get_running_loop().create_task(DestinationMigration(self.host, conn).run())
        self.tasks.add(task)
        task.add_done_callback(self._reap)

    def _reap(self, task: asyncio.Task) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("inbound_task_crashed", error=repr(task.exception()))

    def close(self) -> None:
        if self.server is not None:
            self.server.close()

    async def shutdown(self, grace_s: float) -> None:
        self.close()
        if self.tasks:
            done, pending = await asyncio.wait(self.tasks, timeout=grace_s)
            for t in pending:
                t.cancel()
            if pending:
                await asyncio.wait(pending, timeout=5.0)
