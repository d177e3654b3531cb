"""What a VM needs of its host besides memory and disks: a CPU and networks.

A VM records the CPU it was created for: ``host`` mode (the creating host's
vendor and feature flags, from /proc/cpuinfo) or ``compat`` mode (the vendor
and a documented baseline, x86-64-v2: like Hyper-V's processor compatibility
mode, it trades features for mobility). A destination admits it only if the
vendor matches and it has every flag the VM needs. A VM also names the
networks it is connected to; a destination not connected to one of them
refuses it unless the migration allows a network change.

For labs that study heterogeneous clusters on one machine, an agent can
present another CPU and its own networks: ``[host] cpu_vendor``,
``cpu_flags`` (space separated) and ``networks`` (comma separated) in its
config. That is a simulation knob, documented as such: the guests here do
not execute the CPU's instructions.
"""
from __future__ import annotations

from agent.errors import AdmissionRefused

#: x86-64-v2 (the psABI baseline levels): baseline + cx16 lahf_lm popcnt sse4_1 sse4_2 ssse3
COMPAT_FLAGS = ("cmov", "cx8", "fpu", "fxsr", "mmx", "sse", "sse2",
                "cx16", "lahf_lm", "popcnt", "sse4_1", "sse4_2", "ssse3")
INCOMPATIBLE = 17      # protocol ErrorCode.INCOMPATIBLE (checked by a test)


def read_cpuinfo(path: str = "/proc/cpuinfo") -> tuple[str, tuple[str, ...]]:
    vendor, flags = "", ()
    try:
        with open(path) as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "vendor_id" and not vendor:
                    vendor = value.strip()
                elif key == "flags" and not flags:
                    flags = tuple(sorted(set(value.split())))
                if vendor and flags:
                    break
    except OSError:
        pass
    return vendor or "unknown", flags


def host_cpu(cfg) -> tuple[str, tuple[str, ...]]:
    """This agent's CPU: the machine's, or the one its config presents."""
    vendor, flags = read_cpuinfo()
    if cfg.host.cpu_vendor:
        vendor = cfg.host.cpu_vendor
    if cfg.host.cpu_flags:
        flags = tuple(sorted(set(cfg.host.cpu_flags.split())))
    return vendor, flags


def host_networks(cfg) -> tuple[str, ...]:
    return tuple(n.strip() for n in cfg.host.networks.split(",") if n.strip())


def vm_cpu(mode: str, cfg) -> dict:
    """The CPU a new VM records (``vm create --cpu host|compat``)."""
    if mode not in ("host", "compat"):
        raise ValueError(f"cpu: 'host' or 'compat', got {mode!r}")
    vendor, flags = host_cpu(cfg)
    if mode == "compat":
        missing = [f for f in COMPAT_FLAGS if f not in flags]
        if missing:
            raise ValueError(f"this host lacks the compatibility baseline's flags: {' '.join(missing)}")
        flags = COMPAT_FLAGS
    return {"mode": mode, "vendor": vendor, "flags": sorted(flags)}


def check(cpu: dict | None, networks: list | None, allow_network_change: bool, cfg, host_name: str) -> None:
    """Refuse (AdmissionRefused) a VM this host cannot run; the reason names what is missing."""
    if cpu:
        vendor, flags = host_cpu(cfg)
        if cpu.get("vendor") != vendor:
            raise AdmissionRefused(f"{host_name} has a {vendor} CPU, the VM needs {cpu.get('vendor')} "
                                   f"(create it with --cpu compat for mobility within one vendor)", INCOMPATIBLE)
        missing = sorted(set(cpu.get("flags") or ()) - set(flags))
        if missing:
            raise AdmissionRefused(f"{host_name}'s CPU lacks flags the VM needs: {' '.join(missing)}"
                                   f"{' (create it with --cpu compat)' if cpu.get('mode') == 'host' else ''}",
                                   INCOMPATIBLE)
    have = host_networks(cfg)
    absent = [n for n in (networks or ()) if n not in have]
    if absent and not allow_network_change:
        raise AdmissionRefused(f"{host_name} is not connected to network {', '.join(repr(n) for n in absent)} "
                               f"(migrate --allow-network-change to move it anyway)", INCOMPATIBLE)
