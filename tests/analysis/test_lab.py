"""`make lab`: JupyterLab on 127.0.0.1 only, opening the analysis notebook on a study (the latest one unless
CIRCUITSCALE_STUDY names one; analysis.load.latest_study is tested in test_load.py)."""

import os
import signal
import subprocess
from pathlib import Path

import pytest

from tests.servers import assert_serves_on_loopback, free_port

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_make_lab_serves_the_notebook_on_loopback(study, tmp_path):
    port = free_port()
    env = os.environ | {"HOME": str(tmp_path), "CIRCUITSCALE_STUDY": str(study)}  # a fresh Jupyter runtime folder
    proc = subprocess.Popen(["make", "-s", "lab", f"LAB_PORT={port}"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        assert_serves_on_loopback(proc, port, "/lab", timeout=600)  # the first call installs the jupyter extra
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        out = proc.communicate(timeout=60)[0]
    assert f"study: {study}" in out
