"""Process-group start for training workers: gloo on CPU (DS_ACCELERATOR=cpu), NCCL on GPUs.

Three ways in: a launcher already set RANK / WORLD_SIZE (torchrun, the deepspeed launcher, Ray
Train), `spawn()` starting N local processes, or one process alone (a world of one on loopback).
"""

import ctypes
import os
import signal
import socket
import sys
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def launched_by_launcher() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def accelerator_env() -> None:
    """DeepSpeed picks its accelerator at import: tell it before anything imports deepspeed."""
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")


def init_process_group(backend: str = "auto") -> tuple[int, int]:
    """Join (or create, for a lone process) the default process group; returns (rank, world size)."""
    accelerator_env()
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", os.environ["RANK"])
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    import deepspeed  # imported here, after accelerator_env() told it which accelerator to use

    deepspeed.init_distributed(dist_backend=backend, verbose=False)
    return dist.get_rank(), dist.get_world_size()


def all_reduce_mean(value: float) -> float:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    tensor = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return float(tensor) / dist.get_world_size()


def spawn(fn: Callable[..., None], workers: int, *args) -> None:
    """Run `fn(*args)` in `workers` local processes joined in one group (ranks 0..workers-1).

    If one worker fails the others are stopped and the failure is raised here; if this process is
    interrupted (Ctrl-C, SIGTERM) the workers are stopped too, and they die with it on SIGKILL.
    """
    port = free_port()
    if workers > 1:
        prebuild_cpu_comm_op()
    context = mp.start_processes(_entry, args=(fn, workers, port, args), nprocs=workers, start_method="spawn",
                                 join=False)
    try:
        while not context.join():
            pass
    except BaseException:
        for process in context.processes:
            if process.is_alive():
                process.terminate()
        raise


def prebuild_cpu_comm_op() -> None:
    """On CPU, DeepSpeed JIT-compiles its shared-memory allreduce op the first time a group starts; build
    it here, once, so the workers load the cached module instead of all compiling it at the same moment
    (a first run on a fresh machine once aborted a worker right after that build)."""
    if torch.cuda.is_available():
        return
    accelerator_env()
    try:
        from deepspeed.accelerator import get_accelerator

        builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
        if builder is not None:
            builder.load(verbose=False)
    except Exception:  # noqa: BLE001 - the workers will report a real problem themselves
        pass


def _entry(rank: int, fn: Callable[..., None], workers: int, port: int, args: tuple) -> None:
    _die_with_parent()
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(workers), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    accelerator_env()
    if not torch.cuda.is_available():  # share the cores instead of oversubscribing them
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))
    fn(*args)


def _die_with_parent() -> None:
    """Linux: a worker gets SIGKILL when the process that spawned it dies, so none is orphaned."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
