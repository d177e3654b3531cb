"""Migration endpoint: the TCP listener for inbound migrations and queries.

One tracked task per connection (``agent.daemon.tasks.TaskSet``), at most
``limits.max_connections`` at a time. ``bind()`` listens without accepting
(the agent adopts its VMs in between), ``serve()`` starts accepting.
Shutdown gives inbound migrations the same grace as outbound ones; one
that owns its VM already (from Resume on) or is discarding is never
cancelled.
"""
from __future__ import annotations

import asyncio

from protocol import MigrationSession, Role

from agent.daemon.config import parse_hostport
from agent.daemon.host import Host
from agent.daemon.tasks import TaskSet
from agent.migration.destination import DestinationMigration
from agent.migration.phases import is_cancellable
from agent.net.transport import FrameProtocol
from agent.observe.logs import get_logger

log = get_logger("livemig.endpoint")


class MigrationEndpoint:
    def __init__(self, host: Host) -> None:
        self.host = host
        self.server: asyncio.Server | None = None
        self.tasks = TaskSet("endpoint")
        self._conns = 0

    async def bind(self) -> tuple[str, int]:
        h, p = parse_hostport(self.host.cfg.agent.listen)
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(self._factory, h, p, reuse_address=True, start_serving=False)
        addr = self.server.sockets[0].getsockname()
        return addr[0], addr[1]

    async def serve(self) -> None:
        await self.server.start_serving()

    async def start(self) -> tuple[str, int]:
        addr = await self.bind()
        await self.serve()
        return addr

    def _factory(self) -> FrameProtocol:
        return FrameProtocol(MigrationSession(Role.DESTINATION), on_connect=self._spawn)

    def _spawn(self, conn: FrameProtocol) -> None:
        limit = self.host.cfg.limits.max_connections
        if len(self.tasks) >= limit:
            log.warning("connection_refused_limit", peer=conn.peer, limit=limit)
            conn.close()
            return
        self._conns += 1
        inbound = DestinationMigration(self.host, conn)

        def cancellable() -> bool:
            job = inbound.job
            return job is None or (not inbound.owned and is_cancellable(job.phase))

        self.tasks.spawn(inbound.run(), f"inbound:{self._conns}:{conn.peer}", cancellable=cancellable)

    def close(self) -> None:
        """Accept no new connection (those under way go on)."""
        if self.server is not None:
            self.server.close()

    async def shutdown(self, grace_s: float) -> None:
        self.close()
        await self.tasks.shutdown(grace_s)
