"""Checks shared by the tests of the local servers (`circuitscale ui`, `make lab`)."""

import socket
import subprocess
import time
import urllib.request

import psutil


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def assert_serves_on_loopback(proc: subprocess.Popen, port: int, path: str = "/", timeout: float = 120) -> None:
    """Wait until `proc` answers http://127.0.0.1:port<path> with 200, then check that it listens on the
    loopback address only (nothing reachable from other machines)."""
    deadline = time.time() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
                assert response.status == 200
                break
        except OSError:
            assert proc.poll() is None and time.time() < deadline, proc.communicate()[0][-3000:]
            time.sleep(1)
    listening = [c for c in psutil.net_connections("tcp") if c.laddr and c.laddr.port == port and c.status == "LISTEN"]
    assert listening and all(c.laddr.ip == "127.0.0.1" for c in listening)
