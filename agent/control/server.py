"""Control endpoint: a Unix socket (mode 0600) speaking JSON lines.

The socket belongs to the agent's user, mode 0600: whoever can connect can
create, migrate and delete VMs. ``control.group`` grants one group the same
(the socket is chowned to it and made 0660).

Request:  {"op": "vm.create", "args": {...}}\n
Response: {"ok": true, "result": ...}\n  or  {"ok": false, "error": "..."}\n
One connection may carry several requests; a long request (``migrate``
with ``wait``) holds its connection until it ends.

``bind()`` replaces a stale socket file and listens without accepting;
the agent calls it only once it holds the control socket's lock (see
``agent.daemon.host.InstanceLock``), so a live agent's socket is never
unlinked. ``serve()`` starts accepting. ``close()`` removes the socket only
if this server bound it.
"""
from __future__ import annotations

import asyncio
import grp
import json
import os
from typing import Any, Awaitable, Callable

from agent.errors import AgentError
from agent.observe.logs import get_logger

log = get_logger("livemig.control")

MAX_REQUEST_BYTES = 1 << 20
Handler = Callable[[dict], Awaitable[Any]]


class ControlServer:
    def __init__(self, path: str, mode: int, handlers: dict[str, Handler], group: str = "") -> None:
        self.path = path
        self.group = group
        self.mode = (mode | 0o660) if group else mode      # control.group: owner and group read/write
        self.handlers = handlers
        self.server: asyncio.AbstractServer | None = None
        self.tasks: set[asyncio.Task] = set()
        self._inode: int | None = None           # of the socket file this server bound

    async def bind(self) -> None:
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        # The socket is never more open than its mode; with a group, owner-only until it has that group.
        old = os.umask(0o777 & ~(self.mode & 0o700 if self.group else self.mode))
        try:
            self.server = await asyncio.start_unix_server(self._client, self.path, limit=MAX_REQUEST_BYTES,
                                                          start_serving=False)
        finally:
            os.umask(old)
        self._inode = os.stat(self.path).st_ino
        if self.group:
            try:
                os.chown(self.path, -1, grp.getgrnam(self.group).gr_gid)
            except (KeyError, OSError) as exc:
                raise AgentError(f"control.group: cannot give {self.path} to group {self.group!r}: {exc}") from exc
        os.chmod(self.path, self.mode)

    async def serve(self) -> None:
        await self.server.start_serving()

    async def start(self) -> None:
        await self.bind()
        await self.serve()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self.tasks.add(task)
        try:
            while True:
                try:
                    line = await reader.readline()
                except (ValueError, asyncio.LimitOverrunError):
                    await self._reply(writer, {"ok": False, "error": "request too large"})
                    return
                if not line:
                    return
                try:
                    req = json.loads(line)
                    op = req["op"]
                    args = req.get("args") or {}
                    if not isinstance(args, dict):
                        raise ValueError("args must be an object")
                    handler = self.handlers[op]
                except KeyError:
                    await self._reply(writer, {"ok": False, "error": f"unknown request {line[:80]!r}"})
                    continue
                except ValueError as exc:
                    await self._reply(writer, {"ok": False, "error": f"bad request: {exc}"})
                    continue
                try:
                    result = await handler(args)
                    resp = {"ok": True, "result": result}
                except AgentError as exc:
                    resp = {"ok": False, "error": str(exc)}
                except (TypeError, ValueError) as exc:
                    resp = {"ok": False, "error": f"bad arguments for {op}: {exc}"}
                except Exception as exc:
                    log.exception("control_handler_crashed", op=op)
                    resp = {"ok": False, "error": f"internal error: {exc!r}"}
                await self._reply(writer, resp)
        except (ConnectionError, BrokenPipeError):
            pass
        except asyncio.CancelledError:
            # close() at shutdown: the connection ends here. Not re-raised: asyncio's
            # stream callback would log the cancelled task as an error.
            pass
        finally:
            self.tasks.discard(task)
            writer.close()

    @staticmethod
    async def _reply(writer: asyncio.StreamWriter, obj: dict) -> None:
        writer.write(json.dumps(obj).encode() + b"\n")
        await writer.drain()

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
        for t in list(self.tasks):
            t.cancel()
        if self._inode is None:
            return                               # never bound: the socket there is someone else's
        try:
            if os.stat(self.path).st_ino == self._inode:
                os.unlink(self.path)
        except FileNotFoundError:
            pass
        self._inode = None


class ControlClient:
    """Blocking client for the CLI (one request per call)."""

    def __init__(self, path: str, timeout_s: float | None = 30.0) -> None:
        self.path = path
        self.timeout_s = timeout_s

    def call(self, op: str, timeout_s: float | None = -1.0, **args) -> Any:
        import socket

        t = self.timeout_s if timeout_s == -1.0 else timeout_s
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(t)
            try:
                s.connect(self.path)
            except OSError as exc:
                raise AgentError(f"cannot reach the agent at {self.path}: {exc}") from exc
            s.sendall(json.dumps({"op": op, "args": args}).encode() + b"\n")
            buf = b""
            while not buf.endswith(b"\n"):
                chunk = s.recv(65536)
                if not chunk:
                    raise AgentError(f"the agent at {self.path} closed the connection")
                buf += chunk
        resp = json.loads(buf)
        if not resp.get("ok"):
            raise AgentError(resp.get("error", "unknown error"))
        return resp["result"]
