"""SIGKILL a training process once it has written checkpoints (the exact-resume tests of trials and bridges)."""

import signal
import subprocess
import time
from pathlib import Path

from infra.checkpoint import list_checkpoints


def kill_after_checkpoints(proc: subprocess.Popen, run_dir: Path, count: int = 2, timeout: float = 300) -> int:
    """Wait until `run_dir` holds `count` checkpoints, SIGKILL `proc`, and return the newest one's step."""
    deadline = time.time() + timeout
    while len(list_checkpoints(run_dir / "checkpoints")) < count and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    return int(list_checkpoints(run_dir / "checkpoints")[-1].name.split("-")[1])
