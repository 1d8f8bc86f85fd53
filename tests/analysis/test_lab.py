"""`make lab`: JupyterLab on 127.0.0.1 only, opening the analysis notebook on a study (the latest one unless
CIRCUITSCALE_STUDY names one; analysis.load.latest_study is tested in test_load.py)."""

import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_make_lab_serves_the_notebook_on_loopback(study, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = os.environ | {"HOME": str(tmp_path), "CIRCUITSCALE_STUDY": str(study)}  # a fresh Jupyter runtime folder
    proc = subprocess.Popen(["make", "-s", "lab", f"LAB_PORT={port}"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.time() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/lab", timeout=5) as response:
                    assert response.status == 200
                    break
            except OSError:
                assert proc.poll() is None and time.time() < deadline, proc.communicate()[0][-3000:]
                time.sleep(1)
        listening = [c for c in psutil.net_connections("tcp") if c.laddr and c.laddr.port == port
                     and c.status == "LISTEN"]
        assert listening and all(c.laddr.ip == "127.0.0.1" for c in listening)  # loopback only
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        out = proc.communicate(timeout=60)[0]
    assert f"study: {study}" in out
