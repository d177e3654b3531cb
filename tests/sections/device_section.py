"""A tiny third section for tests: a few bytes of "device state" per VM.

Imported by an agent started with ``LIVEMIG_TEST_SECTIONS=tests.sections.device_section``.
The source's state lives in ``<data_dir>/devices/<vm>.bin`` (a VM without that
file migrates without the section); it travels as one SectionState at the
pause, is verified with the other sections' digests before the destination
resumes, and is written on the destination only on activate().
``LIVEMIG_TEST_DEVICE_CORRUPT=1`` on the destination flips a byte on receipt.
"""
from __future__ import annotations

import os

import xxhash

from agent.migration.catalog import SECTIONS
from agent.migration.section import IncomingSection, OutgoingSection
from protocol import SectionState


def device_path(data_dir: str, vm: str) -> str:
    return os.path.join(data_dir, "devices", f"{vm}.bin")


class DeviceOut(OutgoingSection):
    NAME = "device"
    JOINS = "switchover"

    def __init__(self, path: str, stream) -> None:
        self.path, self.stream = path, stream
        with open(path, "rb") as f:
            self.data = f.read()

    def setup_info(self) -> dict:
        return {"size": len(self.data)}

    async def complete(self) -> None:
        await self.stream.conn.send(SectionState(section=self.section_id, data=self.data))
        self.bytes_sent += len(self.data)

    async def digests(self, mode: str) -> tuple[int, bytes]:
        return 1, xxhash.xxh3_128_digest(self.data)

    async def cleanup(self, committed: bool) -> None:
        if committed:
            os.unlink(self.path)


class DeviceIn(IncomingSection):
    NAME = "device"

    def __init__(self, vm, host) -> None:
        self.path = device_path(host.cfg.agent.data_dir, vm.name)
        self.data = b""
        self.written = False

    async def setup(self, info: dict) -> None:
        self.size = info["size"]

    def on_state(self, data: bytes) -> None:
        if os.environ.get("LIVEMIG_TEST_DEVICE_CORRUPT") and data:
            data = bytes([data[0] ^ 0xFF]) + data[1:]
        self.data = data

    async def digests(self, mode: str) -> tuple[int, bytes]:
        return 1, xxhash.xxh3_128_digest(self.data)

    async def activate(self) -> None:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        with open(self.path, "wb") as f:
            f.write(self.data)
        self.written = True

    async def cleanup(self, committed: bool) -> None:
        if not committed and self.written:
            os.unlink(self.path)


def _out(vm, stream, host, options):
    path = device_path(host.cfg.agent.data_dir, vm.name)
    return DeviceOut(path, stream) if os.path.exists(path) else None


SECTIONS.register("device", _out, lambda vm, host: DeviceIn(vm, host))
