"""The worker's web port: where it binds, and what /health says (issue 12)."""

from __future__ import annotations

from pathlib import Path


def listening_addresses(port: int) -> set[str]:
    """The local addresses of the TCP sockets listening on ``port`` (Linux /proc)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not Path(table).exists():
            continue
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, _, hex_port = local.rpartition(":")
            if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                found.add(address)
    return found


def test_the_web_port_binds_to_the_web_host_only(start_worker, shuttle_config):
    worker = start_worker(shuttle_config)  # --web-host defaults to 127.0.0.1
    assert listening_addresses(worker.web_port) == {"0100007F"}  # 127.0.0.1, not 0.0.0.0
