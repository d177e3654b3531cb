"""Control handlers for VMs: vm.create/list/show/delete/pause/resume/start.

``pause``/``resume`` are the operator's: a VM paused here stays paused
across agent restarts (record ``paused``). A VM paused by an outbound
switchover whose end is unknown (``record.outbound`` set) is resumed only
with ``force``: the destination may be running it.

Disks (``vm.create``): ``disks: [{"name", "size", "path"?}]`` creates each
image sparse (every block a hole), at ``path`` or
``<data_dir>/disks/<vm>/<name>.img``; ``attach: [{"name", "path"}]`` takes
an existing image as it is (its size is its virtual size). The workload is
checked against the disks (``io`` needs one, ``iows`` must fit each).
``vm.delete`` removes the images it created, not attached ones, and none
with ``keep_files``.
"""
from __future__ import annotations

import asyncio
import os
from typing import TYPE_CHECKING

from memstore import BLOCK_SIZE, DiskError, DiskImage, GuestRam, add_disk, parse_size

from agent.daemon.config import NAME_RE
from agent.daemon.vm import Vm, VmRecord, check_workload
from agent.errors import VmError
from agent.migration.heat import ChunkHeat
from agent.observe.logs import get_logger

if TYPE_CHECKING:
    from agent.daemon.agent import Agent

log = get_logger("livemig.control.vm")

RESOLVER_CANCEL_WAIT_S = 5.0


def _fill_random(ram: memoryview, chunk_bytes: int = 4 * 2**20) -> None:
    """Fill guest RAM with incompressible bytes (a VM that has used all its memory)."""
    for off in range(0, len(ram), chunk_bytes):
        n = min(chunk_bytes, len(ram) - off)
        ram[off:off + n] = os.urandom(n)


def _name(args: dict) -> str:
    name = args.get("name")
    if not isinstance(name, str) or NAME_RE.fullmatch(name) is None:
        raise VmError(f"bad VM name {name!r}: use 1-64 of A-Z a-z 0-9 _ -")
    return name


def _memory_bytes(args: dict) -> int:
    memory = args.get("memory", "256M")
    try:
        if isinstance(memory, bool):
            raise ValueError(f"memory: expected a size, got {memory!r}")
        return parse_size(memory) if isinstance(memory, str) else int(memory)
    except (TypeError, ValueError) as exc:
        raise VmError(str(exc)) from exc


def _disk_name(value, what: str) -> str:
    if not isinstance(value, str) or NAME_RE.fullmatch(value) is None:
        raise VmError(f"{what}: bad disk name {value!r}: use 1-64 of A-Z a-z 0-9 _ -")
    return value


def _path_arg(value, what: str) -> str:
    if not isinstance(value, str) or not value or "\0" in value:
        raise VmError(f"{what}: expected a file path, got {value!r}")
    return os.path.abspath(value)


def default_disk_dir(data_dir: str, vm: str) -> str:
    return os.path.join(os.path.abspath(data_dir), "disks", vm)


def disk_specs(args: dict, vm: str, data_dir: str, other_disks: dict[str, str]) -> list[dict]:
    """The disks a vm.create asks for, checked: ``{"name", "path", "size_bytes", "attached"}``
    in index order (created ones first, then attached). ``other_disks`` maps the
    real path of every disk another VM uses to that VM's name."""
    disks, attach = args.get("disks") or [], args.get("attach") or []
    if not isinstance(disks, list) or not isinstance(attach, list):
        raise VmError("disks and attach must be lists")
    out: list[dict] = []
    for d in disks:
        if not isinstance(d, dict):
            raise VmError(f"disks: expected {{name, size, path?}}, got {d!r}")
        name = _disk_name(d.get("name"), "disk")
        size = d.get("size")
        try:
            if isinstance(size, bool) or size is None:
                raise ValueError(f"expected a size, got {size!r}")
            size_bytes = parse_size(size) if isinstance(size, str) else int(size)
        except (TypeError, ValueError) as exc:
            raise VmError(f"disk {name}: {exc}") from exc
        if size_bytes <= 0 or size_bytes % BLOCK_SIZE:
            raise VmError(f"disk {name}: size must be a positive multiple of {BLOCK_SIZE // 1024} KiB "
                          f"(the disk block), got {size!r}")
        path = _path_arg(d["path"], f"disk {name}") if d.get("path") else \
            os.path.join(default_disk_dir(data_dir, vm), f"{name}.img")
        if os.path.lexists(path):
            raise VmError(f"disk {name}: {path} exists; use --attach {name}:{path} to use it as it is")
        if d.get("path") and not os.path.isdir(os.path.dirname(path)):
            raise VmError(f"disk {name}: directory {os.path.dirname(path)} does not exist")
        out.append({"name": name, "path": path, "size_bytes": size_bytes, "attached": False})
    for d in attach:
        if not isinstance(d, dict):
            raise VmError(f"attach: expected {{name, path}}, got {d!r}")
        name = _disk_name(d.get("name"), "attached disk")
        path = _path_arg(d.get("path"), f"disk {name}")
        try:
            with DiskImage.open(path, readonly=True) as img:
                size_bytes = img.size_bytes
        except DiskError as exc:
            raise VmError(f"disk {name}: {exc}") from exc
        out.append({"name": name, "path": path, "size_bytes": size_bytes, "attached": True})
    seen_names: set[str] = set()
    seen_paths: dict[str, str] = {}
    for d in out:
        if d["name"] in seen_names:
            raise VmError(f"disk name {d['name']!r} is given twice")
        seen_names.add(d["name"])
        real = os.path.realpath(d["path"])
        if real in seen_paths:
            raise VmError(f"disks {seen_paths[real]} and {d['name']} are the same file {real}")
        if real in other_disks:
            raise VmError(f"disk {d['name']}: {real} is already a disk of VM {other_disks[real]}")
        seen_paths[real] = d["name"]
    return out


def disk_owners(registry) -> dict[str, str]:
    """{real path of a disk image: VM name} over every VM of the registry."""
    return {os.path.realpath(d["path"]): vm.name for vm in registry for d in vm.record.disks}


def unresolved_message(vm: Vm) -> str:
    peer = (vm.record.outbound or {}).get("peer") or "its destination"
    return (f"{vm.name} is paused because its migration to {peer} is unresolved: the destination may be "
            f"running it; resuming here with --force can leave two running copies")


def remove_disk_files(paths: list[str], default_dir: str) -> list[str]:
    """Unlink these images (those that exist), then the VM's default disk
    folder if that left it empty; returns the paths removed."""
    removed = []
    for p in paths:
        try:
            os.unlink(p)
            removed.append(p)
        except FileNotFoundError:
            pass
    try:
        os.rmdir(default_dir)
    except OSError:
        pass                              # absent, or holds something else: leave it
    return removed


class VmOps:
    def __init__(self, agent: "Agent") -> None:
        self.agent = agent
        self.host = agent.host

    def handlers(self) -> dict:
        return {"vm.create": self.create, "vm.list": self.list, "vm.show": self.show, "vm.delete": self.delete,
                "vm.pause": self.pause, "vm.resume": self.resume, "vm.start": self.start}

    @property
    def ack_timeout_s(self) -> float:
        return self.host.cfg.migration.guest_ack_timeout_s

    def _idle_vm(self, args: dict, what: str) -> Vm:
        """The named VM, not owned by a migration (which would race an operator command)."""
        vm = self.host.registry.get(_name(args))
        if vm.migrating is not None:
            raise VmError(f"{vm.name} is migrating (job {vm.migrating}); {what} it when the job has ended")
        if vm.record.state == "incoming":
            raise VmError(f"{vm.name} is arriving by migration; {what} it once it runs here")
        if vm.restarting:
            raise VmError(f"the guest of {vm.name} is being restarted; try again in a moment")
        return vm

    async def create(self, args: dict):
        name, memory_bytes = _name(args), _memory_bytes(args)
        workload = args.get("workload", "idle")
        prefill = args.get("prefill", "none")
        if prefill not in ("none", "random"):
            raise VmError(f"prefill: 'none' or 'random', got {prefill!r}")
        h, reg = self.host, self.host.registry
        if name in reg:
            raise VmError(f"a VM named {name!r} already exists on {h.name}")
        disks = disk_specs(args, name, h.cfg.agent.data_dir, disk_owners(reg))
        cpu, networks = _platform(args, h.cfg)
        check_workload(workload, memory_bytes, [d["size_bytes"] for d in disks])
        available = h.memory_available()
        if memory_bytes > available:
            raise VmError(f"not enough memory on {h.name}: VM needs {memory_bytes / 2**20:.0f} MiB, "
                          f"{available / 2**20:.0f} MiB available")
        vm_id = Vm.new_id()
        ram = reg.create_segment(name, vm_id, memory_bytes)
        vm = Vm(VmRecord(name=name, id=vm_id, memory_bytes=memory_bytes, workload=workload, segment=ram.name,
                         cpu=cpu, networks=networks), ram)
        vm.on_release = reg.forget_segment
        added = False
        created: list[str] = []
        try:
            for d in disks:
                if not d["attached"]:
                    os.makedirs(os.path.dirname(d["path"]), mode=0o700, exist_ok=True)
                    DiskImage.create(d["path"], d["size_bytes"]).close()
                    created.append(d["path"])
                add_disk(ram, d["path"])
            vm.record.disks = disks
            if prefill == "random":
                await asyncio.to_thread(_fill_random, ram.ram)
            ram.ctl.workload = workload
            ram.ctl.seed = int.from_bytes(os.urandom(8), "little") >> 1
            reg.add(vm)
            added = True
            vm.start_guest(h.guest_log(name))
            reg.save(vm)
            await vm.wait_running(self.ack_timeout_s)
        except BaseException as exc:
            await vm.stop_guest(1.0)
            vm.release()
            if added:
                reg.remove(vm)
            remove_disk_files(created, default_disk_dir(h.cfg.agent.data_dir, name))
            if isinstance(exc, DiskError):
                raise VmError(str(exc)) from exc
            raise
        log.info("vm_created", vm=name, memory_bytes=memory_bytes, workload=workload, segment=ram.name,
                 disks=[(d["name"], d["path"], d["size_bytes"]) for d in disks])
        return vm.info()

    async def list(self, args: dict):
        return [vm.info() for vm in self.host.registry]

    async def show(self, args: dict):
        return {**self.host.registry.get(_name(args)).info(), "last_migration": self._last_migration(args["name"])}

    def _last_migration(self, name: str) -> dict | None:
        """When, from, to, downtime, verified: the VM's newest finished migration (history.py)."""
        from agent.control.history import history_of

        history = history_of(self.host.jobs.observers)
        return history.last_migration(name) if history is not None else None

    async def delete(self, args: dict):
        vm = self._idle_vm(args, "delete")
        keep_files = args.get("keep_files", False)
        if not isinstance(keep_files, bool):
            raise VmError(f"keep_files: expected true/false, got {keep_files!r}")
        await self._drop_resolver(vm)
        await vm.stop_guest(self.ack_timeout_s)
        vm.release()
        self.host.registry.remove(vm)
        ours = [d["path"] for d in vm.record.disks if not d.get("attached")]
        kept = [d["path"] for d in vm.record.disks if d.get("attached") or keep_files]
        removed = [] if keep_files else remove_disk_files(
            ours, default_disk_dir(self.host.cfg.agent.data_dir, vm.name))
        log.info("vm_deleted", vm=vm.name, files_removed=removed, files_kept=kept)
        return {"deleted": vm.name, "files_removed": removed, "files_kept": kept}

    async def pause(self, args: dict):
        vm = self._idle_vm(args, "pause")
        state = vm.state()
        if state == "paused":
            return vm.info()
        if state != "running":
            raise VmError(f"{vm.name} is {state}; only a running VM can be paused")
        rec = vm.record
        rec.state = "paused"                  # the intent first: a restart keeps it paused
        self.host.registry.save(vm)
        try:
            await vm.pause(self.ack_timeout_s)
        except VmError:
            rec.state = "running"
            self.host.registry.save(vm)
            raise
        log.info("vm_paused", vm=vm.name)
        return vm.info()

    async def resume(self, args: dict):
        vm = self._idle_vm(args, "resume")
        force = args.get("force", False)
        if not isinstance(force, bool):
            raise VmError(f"force: expected true/false, got {force!r}")
        if vm.broken:
            raise VmError(f"{vm.name} is broken ({vm.record.broken_reason}); try vm start")
        if vm.record.outbound:
            if not force:
                raise VmError(unresolved_message(vm))
            log.warning("vm_resume_forced", vm=vm.name, outbound=vm.record.outbound)
            await self._drop_resolver(vm)
            vm.record.outbound = None
            vm.hold_reason = ""
        vm.record.state = "running"
        self.host.registry.save(vm)
        if vm.guest_alive():
            await vm.resume(self.ack_timeout_s)
        else:                                 # died while paused: a new guest, running
            await vm.restart_guest(self.host.guest_log(vm.name), self.ack_timeout_s, run=True)
            vm.record.guest_restarts += 1
            self.host.registry.save(vm)
        log.info("vm_resumed", vm=vm.name, forced=bool(force))
        return vm.info()

    async def start(self, args: dict):
        vm = self._idle_vm(args, "start")
        if vm.broken:
            self._reattach(vm)
        elif vm.guest_alive():
            raise VmError(f"{vm.name} is {vm.state()}: its guest runs already")
        run = vm.record.state == "running"
        await vm.restart_guest(self.host.guest_log(vm.name), self.ack_timeout_s, run=run)
        self.host.registry.save(vm)
        if vm.record.outbound:
            self.agent.start_resolver(vm)
        log.info("vm_started", vm=vm.name, paused=not run)
        return vm.info()

    def _reattach(self, vm: Vm) -> None:
        rec = vm.record
        try:
            vm.ram = GuestRam.attach(rec.segment)
        except Exception as exc:
            raise VmError(f"{vm.name} is still broken: segment {rec.segment} does not attach: {exc}") from exc
        vm.heat = ChunkHeat(vm.ram.npages)
        vm.ram.ctl.throttle_pct = 0
        rec.state = "paused" if rec.outbound else "running"
        rec.broken_reason = ""

    async def _drop_resolver(self, vm: Vm) -> None:
        task, vm.resolver = vm.resolver, None
        if task is not None and not task.done():
            task.cancel()
            await asyncio.wait([task], timeout=RESOLVER_CANCEL_WAIT_S)


def _platform(args: dict, cfg) -> tuple[dict, list[str]]:
    """The CPU (``cpu``: host | compat) and networks a new VM records (platform.py)."""
    from agent.daemon.config import NAME_RE
    from agent.daemon.platform import vm_cpu

    mode = args.get("cpu") or "host"
    try:
        cpu = vm_cpu(mode, cfg)
    except ValueError as exc:
        raise VmError(str(exc)) from None
    networks = args.get("networks") or []
    if not isinstance(networks, list) or not all(isinstance(n, str) and NAME_RE.fullmatch(n) for n in networks):
        raise VmError(f"networks: names of 1-64 of A-Z a-z 0-9 _ -, got {networks!r}")
    return cpu, sorted(set(networks))
