"""The "platform" section: the CPU and networks a VM needs (agent/daemon/platform.py).

It moves no data: its setup carries the VM's CPU requirements, its networks
and whether the migration allows a network change; the destination's probe
refuses before anything is built (in a dry run too) when its CPU lacks the
vendor or a flag or it is not connected to one of the networks, naming what
is missing; its setup records them for the VM that arrives. Both sides digest
the same setup, so verification proves they agree on it.
"""
from __future__ import annotations

import msgpack
import xxhash

from agent.daemon.platform import check
from agent.migration.section import IncomingSection, OutgoingSection

NAME = "platform"


def platform_info(vm, options: dict | None) -> dict:
    r = vm.record
    return {"cpu": r.cpu, "networks": list(r.networks),
            "allow_network_change": bool((options or {}).get("allow_network_change"))}


def _digest(info: dict) -> tuple[int, bytes]:
    return 1, xxhash.xxh3_128_digest(msgpack.packb({"cpu": info.get("cpu"), "networks": info.get("networks")}))


class PlatformOut(OutgoingSection):
    NAME = NAME
    JOINS = "switchover"           # nothing to send in the rounds or at the pause

    def __init__(self, vm, options: dict | None) -> None:
        self.info = platform_info(vm, options)

    def setup_info(self) -> dict:
        return self.info

    async def complete(self) -> None:
        pass

    async def digests(self, mode: str) -> tuple[int, bytes]:
        return _digest(self.info)


class PlatformIn(IncomingSection):
    NAME = NAME

    def __init__(self, vm, host) -> None:
        self.vm, self.host = vm, host
        self.info: dict = {}

    async def setup(self, info: dict) -> None:
        probe(info, self.host)
        self.info = info
        self.vm.record.cpu = info.get("cpu")
        self.vm.record.networks = list(info.get("networks") or [])

    async def digests(self, mode: str) -> tuple[int, bytes]:
        return _digest(self.info)


def probe(info: dict, host) -> None:
    if info:
        check(info.get("cpu"), info.get("networks"), bool(info.get("allow_network_change")), host.cfg, host.name)
