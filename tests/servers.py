"""Checks shared by the tests of the local servers (`circuitscale ui`, `make lab`)."""

import os
import signal
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
            if proc.poll() is not None or time.time() >= deadline:
                # a server still running would never close its output: stop it before reading what it said
                try:  # its whole group when it leads one (`make lab` and its Jupyter), else the process
                    if os.getpgid(proc.pid) == proc.pid:
                        os.killpg(proc.pid, signal.SIGKILL)
                    else:
                        proc.kill()
                except ProcessLookupError:
                    pass
                out = proc.communicate(timeout=60)[0] or ""
                raise AssertionError(f"nothing answered http://127.0.0.1:{port}{path} within {timeout:.0f} s "
                                     f"(exit {proc.returncode}): {out[-3000:]}") from None
            time.sleep(1)
    listening = [c for c in psutil.net_connections("tcp") if c.laddr and c.laddr.port == port and c.status == "LISTEN"]
    assert listening and all(c.laddr.ip == "127.0.0.1" for c in listening)
