"""Process-group start for training workers: gloo on CPU (DS_ACCELERATOR=cpu), NCCL on GPUs.

Three ways in: a launcher already set RANK / WORLD_SIZE (torchrun, the deepspeed launcher, Ray
Train), `spawn()` starting N local processes, or one process alone (a world of one on loopback).
"""

import ctypes
import json
import os
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.multiprocessing import ProcessRaisedException


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


def collective_device() -> torch.device:
    """Where the default group's collectives take their tensors: this rank's GPU under NCCL (a CPU tensor
    raises "No backend type associated with device type cpu"), the CPU under gloo."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_mean(value: float) -> float:
    """The mean of `value` over the ranks (every rank calls it)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=collective_device())
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return float(tensor.cpu()) / dist.get_world_size()


def all_reduce_mean_(tensors: list[torch.Tensor]) -> None:
    """Replace each tensor by its mean over the ranks, in place, in one collective over a flat buffer
    (every rank calls it with tensors of the same shapes in the same order)."""
    if not tensors or not dist.is_initialized() or dist.get_world_size() == 1:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors]).to(collective_device())
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= dist.get_world_size()
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()


def spawn(fn: Callable[..., None], workers: int, *args) -> None:
    """Run `fn(*args)` in `workers` local processes joined in one group (ranks 0..workers-1).

    If a worker raises, the others are stopped and the worker's own exception is raised here (chained to
    torch's report, which carries the worker's traceback); a worker that dies without raising (a signal)
    raises torch's ProcessExitedException. If this process is interrupted (Ctrl-C, SIGTERM) the workers
    get SIGTERM (an interrupt in them) and a moment to end their runs; they die with it on SIGKILL.
    """
    port = free_port()
    if workers > 1:
        prebuild_cpu_comm_op()
    with tempfile.TemporaryDirectory(prefix="circuitscale-spawn-") as errors:
        processes = mp.start_processes(_entry, args=(fn, workers, port, errors, args), nprocs=workers,
                                       start_method="spawn", join=False)
        try:
            while not processes.join():
                pass
        except ProcessRaisedException as failure:
            _stop(processes.processes, settle_s=10.0)  # peers that fail too (the same NaN) end by themselves
            raised = _raised_in(Path(errors), failure.error_index)
            if raised is None:
                raise
            raise raised from failure
        except BaseException:
            _stop(processes.processes)
            raise


def _stop(processes: list, *, settle_s: float = 0.0, grace_s: float = 30.0) -> None:
    """Give the workers `settle_s` to end by themselves, then SIGTERM to those alive and `grace_s` (in all)
    to finish their runs' bookkeeping; SIGKILL to any still alive (e.g. stuck in a collective with a dead
    peer)."""
    deadline = time.monotonic() + settle_s
    for process in processes:
        process.join(timeout=max(0.0, deadline - time.monotonic()))
    for process in processes:
        if process.is_alive():
            process.terminate()
    deadline = time.monotonic() + grace_s
    for process in processes:
        process.join(timeout=max(0.0, deadline - time.monotonic()))
        if process.is_alive():
            process.kill()


def _raised_in(folder: Path, rank: int) -> BaseException | None:
    """The exception worker `rank` reported before it died, rebuilt from its JSON record, or None (none
    written, unreadable, or of a class this process has not imported).

    JSON, not pickle: nothing a process writes is unpickled here. The class is looked up only among the
    modules already imported (no import runs on a name read from a file) and must be an exception class;
    it is rebuilt from its message, the form every exception of ours takes."""
    try:
        record = json.loads((folder / f"rank-{rank}.json").read_text(encoding="utf-8"))
        module = sys.modules.get(str(record["module"]))
        cls = module
        for part in str(record["qualname"]).split("."):
            cls = getattr(cls, part, None)
        if module is None or not (isinstance(cls, type) and issubclass(cls, BaseException)):
            return None
        return cls(str(record["message"]))
    except Exception:  # noqa: BLE001 - torch's report of the failure is raised instead
        return None


def _report(errors: str, rank: int, err: BaseException) -> None:
    """Write the exception `err` of worker `rank` as JSON (class and message) for spawn() to raise."""
    record = {"module": type(err).__module__, "qualname": type(err).__qualname__, "message": str(err)}
    (Path(errors) / f"rank-{rank}.json").write_text(json.dumps(record), encoding="utf-8")


def prebuild_cpu_comm_op() -> None:
    """On CPU, DeepSpeed JIT-compiles its shared-memory allreduce op the first time a group starts; build
    it here, once, so the workers load the cached module instead of all compiling it at the same moment
    (a first run on a fresh machine once aborted a worker right after that build)."""
    if torch.cuda.is_available():
        return
    accelerator_env()
    try:
        from deepspeed.accelerator import get_accelerator  # after accelerator_env(), as above

        builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
        if builder is not None:
            builder.load(verbose=False)
    except Exception:  # noqa: BLE001 - the workers will report a real problem themselves
        pass


def _entry(rank: int, fn: Callable[..., None], workers: int, port: int, errors: str, args: tuple) -> None:
    _die_with_parent()
    signal.signal(signal.SIGTERM, _interrupt)  # stopped by the parent: an interrupt, so runs end KILLED
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(workers), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    accelerator_env()
    if not torch.cuda.is_available():  # share the cores instead of oversubscribing them
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))
    try:
        fn(*args)
        # Gloo's worker threads must be joined while the interpreter is alive: a process that exits with
        # its group still up can abort in a C++ destructor ("terminate called without an active
        # exception", SIGABRT) after its work is done, which CI once saw fail a passing run.
        shutdown()
    except BaseException as err:
        try:  # the exception's class and message, for spawn() to raise in the parent
            _report(errors, rank, err)
        except Exception:  # noqa: BLE001 - torch's report still names it
            pass
        raise


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _die_with_parent() -> None:
    """Linux: a worker gets SIGKILL when the process that spawned it dies, so none is orphaned."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
