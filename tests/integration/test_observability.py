"""Metrics endpoint and the SVG report, from a real agent."""
from __future__ import annotations

import socket
import xml.etree.ElementTree as ET

import pytest

pytestmark = pytest.mark.timeout(90)


def scrape(addr: str) -> str:
    host, port = addr.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    return body.decode()


def sample(text: str, name: str, **labels) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in text.splitlines():
        if line.startswith(name + ("{" + want + "}" if want else " ")):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} {labels} not in metrics")


def test_metrics_and_svg_report(agents, tmp_path):
    a = agents("A", "--metrics", "127.0.0.1:0")
    b = agents("B", "--metrics", "127.0.0.1:0")
    a.call("vm.create", name="vm1", memory="32M", workload="uniform:rate=2000", prefill="random")
    before = scrape(a.call("status")["metrics"])
    assert sample(before, "livemig_vms") == 1
    report = a.call("migrate", vm="vm1", to=b.addr, wait=True, timeout_s=None)
    assert report["status"] == "completed"

    text = scrape(a.call("status")["metrics"])
    assert sample(text, "livemig_migrations_completed_total", direction="outbound") == 1
    assert sample(text, "livemig_bytes_sent_total", direction="outbound") == report["bytes_sent"]
    assert sample(text, "livemig_vms") == 0
    inbound = scrape(b.call("status")["metrics"])
    assert sample(inbound, "livemig_migrations_completed_total", direction="inbound") == 1
    assert sample(inbound, "livemig_vms") == 1

    svg = tmp_path / "m.svg"
    r = agents.cli(a, "report", report["id"], "--svg", str(svg))
    assert r.returncode == 0, r.stderr
    root = ET.parse(svg).getroot()
    assert root.tag.endswith("svg")
    assert "vm1" in svg.read_text()
    b.call("vm.delete", name="vm1")
