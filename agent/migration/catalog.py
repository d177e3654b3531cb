"""The sections a VM migrates with (section.py), by name, in id order.

RAM is always first. ``LIVEMIG_TEST_SECTIONS=module[,module...]`` in an
agent's environment imports those modules at start so that each can
register a section (test-only: how tests add a device-state section that
goes through the same driver; see tests/tools/device_section.py).
"""
from __future__ import annotations

import importlib
import os

from agent.migration import disk_section
from agent.migration import platform_section
from agent.migration.platform_section import PlatformIn, PlatformOut
from agent.migration.ram import RamIn, RamOut
from agent.migration.section import SectionRegistry

SECTIONS = SectionRegistry()
SECTIONS.register("ram", lambda vm, stream, host, options: RamOut(vm, stream), lambda vm, host: RamIn(vm, host))
SECTIONS.register(disk_section.NAME, disk_section.out_factory, disk_section.in_factory,
                  probe=disk_section.probe, plan=disk_section.plan)
SECTIONS.register(platform_section.NAME, lambda vm, stream, host, options: PlatformOut(vm, options),
                  lambda vm, host: PlatformIn(vm, host), probe=platform_section.probe)

for _mod in filter(None, os.environ.get("LIVEMIG_TEST_SECTIONS", "").split(",")):
    importlib.import_module(_mod.strip())
