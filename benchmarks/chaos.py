"""The study under fire (issue 17): run a study fault-free, then again while injecting faults from a seeded
schedule, rerunning the same command after each fault that stops it until the study finishes; then check
the invariants and print the chaos table and a final JSON line.

    .venv/bin/python benchmarks/chaos.py [--study smoke|cpu] [--seed N] [--per-kind 5] [--out DIR]

Faults, each `--per-kind` times (the schedule is drawn from `--seed`; when a fault fires depends on timing):
  worker_kill         SIGKILL of one Ray Train worker process, alternately mid-step (at a random time) and
                      mid-checkpoint-write (the checkpoint failpoint, infra/checkpoint.py, holds each write
                      open for a moment, and the pid named by the staging folder is killed inside it)
  driver_kill         SIGKILL of the `circuitscale study` process group: the driver and the local Ray head it
                      started (GCS, raylet, workers); the same command is run again
  mlflow_down         the study's MLflow server (a real `mlflow server` on a SQLite store) SIGKILLed, left down
                      a few seconds, then started again on the same store and port
  disk_full           the study folder's filesystem (a tmpfs with a size cap, mounted here as root) filled to
                      the last byte: the study must stop with an error naming a path, or ride it out; the
                      space is given back and the same command run again
  corrupt_shard       one byte flipped in a shard of the study's dataset between runs: the next run must name
                      the file and rebuild the dataset
  corrupt_checkpoint  one byte flipped in the newest checkpoint of an unfinished trial between runs: the
                      trial must name it in its trial.log and resume from the previous one

Invariants, checked at the end: every trial FINISHED exactly once in MLflow and no run left RUNNING; every
metric in each trial's metrics.jsonl reached MLflow; each trial's exported weights equal the fault-free run's
bit for bit; the report equals the fault-free report (its timings aside); no `.tmp-` staging folder left in
the study folder or the dataset cache. `lost` counts trials whose weights differ or are missing plus metrics
that never reached MLflow; it must be 0, as must `duplicated_runs` and `running_runs`.
"""

import argparse
import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

# This folder holds kernels.py: run as a script, it would shadow the `kernels` package.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import psutil  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from infra.checkpoint import PAUSE_FAILPOINT  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
KINDS = ("worker_kill", "driver_kill", "mlflow_down", "disk_full", "corrupt_shard", "corrupt_checkpoint")
SMALL_PACKAGES = ("json", "html", "urllib", "http")  # the tests' small corpus (tests/conftest.py)
# timing keys of headline.json and the lines / columns of report.md that hold wall-clock figures
TIMING_KEYS = ("wall_s", "trial_work_s", "overhead_ratio")
TIMING_COLUMNS = ("train s", "prune s")


@dataclass
class Study:
    name: str
    sweep: Path
    args: list[str]
    fs_mb: int  # the size cap of the chaos run's filesystem
    episode_timeout: float  # seconds one run of the command may take before the harness calls it hung
    window: tuple[float, float]  # seconds after a run starts within which its faults fire


def study_setup(kind: str, out: Path) -> Study:
    if kind == "smoke":
        corpus = out / "corpus"
        if not corpus.is_dir():
            import sysconfig
            stdlib = Path(sysconfig.get_paths()["stdlib"])
            for name in SMALL_PACKAGES:
                shutil.copytree(stdlib / name, corpus / name, ignore=shutil.ignore_patterns("__pycache__"))
        args = [f"data.sources=[{corpus}]", "data.mix=null", "data.vocab_size=512", "data.val_fraction=0.2",
                "data.shard_tokens=20000", "prune.tasks=[if_equals,while_return_true]",  # the tests' smoke study
                # and four checkpoints per trial, not two: more writes to die in. Where checkpoints fall
                # changes nothing in the weights (exact resume), so the tests' study is still the reference
                "train.checkpoint_every=5"]
        return Study("smoke", ROOT / "sweeps" / "smoke.yaml", args, fs_mb=160, episode_timeout=900,
                     window=(15, 45))
    return Study("cpu", ROOT / "sweeps" / "cpu.yaml", [], fs_mb=1024, episode_timeout=3600, window=(60, 900))


@dataclass
class Fault:
    kind: str
    detail: str = ""
    when: float = 0.0  # seconds since the chaos run began
    checks: dict = field(default_factory=dict)  # what the harness verified right after it


class MlflowServer:
    """A real `mlflow server` on a SQLite store under `folder`, on a fixed port across restarts."""

    def __init__(self, folder: Path) -> None:
        import socket
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        command = [str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri",
                   f"sqlite:///{self.folder / 'mlflow.db'}", "--artifacts-destination", str(self.folder / "artifacts"),
                   "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"]
        log = open(self.folder / "server.log", "a")  # noqa: SIM115 (the server holds it)
        # no GenAI job runner (two more processes that a 2-core machine pays for at every restart)
        env = os.environ | {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        self.proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
        deadline = time.time() + 180
        while time.time() < deadline:
            try:
                urllib.request.urlopen(f"{self.uri}/health", timeout=2)  # noqa: S310 (loopback)
                return
            except OSError:
                if self.proc.poll() is not None:
                    break
                time.sleep(0.5)
        raise RuntimeError(f"mlflow server did not start; see {self.folder / 'server.log'}")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            kill_tree(self.proc.pid)
        self.proc = None


def kill_tree(pid: int) -> None:
    """SIGKILL a process, its process group and every descendant (a local Ray's processes included)."""
    try:
        family = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        family = []
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    for proc in family:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(family, timeout=30)


def _trial_of(worker: psutil.Process) -> Path | None:
    """The trial folder a worker process trains (rank 0 holds its metrics.jsonl open), or None."""
    try:
        for handle in worker.open_files():
            path = Path(handle.path)
            if path.name == "metrics.jsonl" and path.parent.parent.name == "trials":
                return path.parent
    except psutil.Error:
        pass
    return None


def flip_byte(path: Path, rng: random.Random) -> int:
    raw = bytearray(path.read_bytes())
    at = rng.randrange(len(raw))
    raw[at] ^= 0xFF
    path.write_bytes(bytes(raw))
    return at


class Run:
    """One run of the study command (a subprocess in its own session, its output in `log`)."""

    def __init__(self, command: list[str], env: dict, log: Path) -> None:
        self.log = log
        self._out = open(log, "w")  # noqa: SIM115 (closed in wait)
        self.proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=self._out, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        self.started = time.time()

    def alive(self) -> bool:
        return self.proc.poll() is None

    def workers(self) -> list[psutil.Process]:
        """The Ray Train worker processes this run started."""
        try:
            family = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []
        found = []
        for proc in family:
            try:
                if "RayTrainWorker" in " ".join(proc.cmdline()):
                    found.append(proc)
            except psutil.Error:
                continue
        return found

    def wait(self, timeout: float) -> int | None:
        try:
            code = self.proc.wait(timeout=max(timeout, 0))
        except subprocess.TimeoutExpired:
            return None
        self._out.close()
        return code

    def kill(self) -> None:
        kill_tree(self.proc.pid)
        self.proc.wait()
        self._out.close()

    def text(self) -> str:
        return self.log.read_text(errors="replace")


class Harness:
    def __init__(self, study: Study, out: Path, seed: int, per_kind: int, log=print) -> None:
        self.study, self.out, self.seed, self.per_kind, self.say = study, out, seed, per_kind, log
        self.rng = random.Random(seed)
        self.faults: list[Fault] = []
        self.began = time.time()
        self.fs = out / "fs"  # the chaos run's study storage: a size-capped tmpfs where mounting is allowed
        self.mounted = self.could_mount = False
        self.server = MlflowServer(out / "mlflow-server")
        self.cache = out / "cache-chaos"
        self.pending_checks: list[Fault] = []  # corruptions whose detection the next run must show
        self.lock = threading.Lock()
        self.current: Run | None = None  # the run of the study command in progress
        self.stopped = threading.Event()  # set when the run in progress has ended: injectors stop waiting
        self.quiet = threading.Event()  # clear while the MLflow server is down
        self.quiet.set()
        self.fired: Counter = Counter()  # (run, kind) -> faults of that kind that fired in the run
        self.runs_started = 0
        self.corrupted: set[str] = set()  # checkpoints already corrupted
        self.reference_folder: Path | None = None

    # --- set-up ---------------------------------------------------------------------------------------------
    def command(self, storage: Path, cache: Path, tracking: str | None) -> list[str]:
        extra = [f"study.tracking_uri={tracking}"] if tracking else []
        return [sys.executable, "-m", "cli.main", "study", str(self.study.sweep), f"study.storage_path={storage}",
                f"data.cache_dir={cache}", *extra, *self.study.args]

    def env(self, failpoint: bool) -> dict:
        env = os.environ | {"PYTHONUNBUFFERED": "1"}
        if failpoint:
            env[PAUSE_FAILPOINT] = "1.0"
        return env

    def mount(self) -> None:
        self.fs.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={self.study.fs_mb}m", "tmpfs", str(self.fs)],
                              capture_output=True, text=True)
        self.mounted = self.could_mount = done.returncode == 0
        if not self.mounted:
            self.say(f"cannot mount a size-capped tmpfs here ({done.stderr.strip()}): disk_full is not injected")

    def unmount(self) -> None:
        if self.mounted:
            subprocess.run(["umount", "-l", str(self.fs)], check=False)
            self.mounted = False

    # --- the reference ----------------------------------------------------------------------------------------
    def reference(self, given: Path | None = None) -> tuple[Path, float]:
        """The fault-free study: `given` (a finished study folder of the same sweep and arguments, as the
        tests' smoke study), or the one from an earlier harness run in `out`, or run now."""
        folder = given or self.out / "reference" / self.study.name
        if (folder / "report" / "headline.json").is_file():
            self.say(f"reference: reusing {folder}")
            wall = json.loads((folder / "report" / "headline.json").read_text())["wall_s"]
            return folder, wall
        if given is not None:
            raise SystemExit(f"--reference {given}: not a finished study folder (no report/headline.json)")
        shutil.rmtree(self.out / "reference", ignore_errors=True)
        self.say("reference: the study without faults ...")
        start = time.time()
        run = Run(self.command(self.out / "reference", self.out / "cache-ref", None), self.env(False),
                  self.out / "reference.log")
        code = run.wait(self.study.episode_timeout)
        if code is None:
            run.kill()
        if code != 0:
            raise SystemExit(f"the fault-free study failed (exit {code}); see {run.log}")
        wall = time.time() - start
        self.say(f"reference: {wall:.0f} s")
        return folder, wall

    # --- faults -------------------------------------------------------------------------------------------------
    def record(self, kind: str, detail: str, **checks) -> Fault:
        fault = Fault(kind, detail, round(time.time() - self.began, 1), checks)
        with self.lock:
            self.faults.append(fault)
        self.say(f"  [{fault.when:7.1f} s] {kind}: {detail}")
        return fault

    def count(self, kind: str) -> int:
        return sum(f.kind == kind for f in self.faults)

    def short(self) -> dict[str, int]:
        """The kinds injected fewer than --per-kind times so far, with how many are missing (disk_full only where
        the harness could mount its filesystem)."""
        wanted = [k for k in KINDS if k != "disk_full" or self.could_mount]
        return {k: self.per_kind - self.count(k) for k in wanted if self.count(k) < self.per_kind}

    def study_folder(self) -> Path:
        return self.fs / self.study.name

    def staging(self) -> list[Path]:
        """Checkpoint writes in progress: staging folders whose writer (the pid in the name) is alive. A killed
        writer's folder stays until its trial restarts; counting it stalled every later kill of the run."""
        return [f for f in self.study_folder().glob("trials/*/checkpoints/.tmp-step-*")
                if psutil.pid_exists(int(f.name.rsplit("-", 1)[1]))]

    def kill_worker(self, run: Run, mode: str) -> bool:
        """SIGKILL one worker: mid-checkpoint-write (the pid in a staging folder's name) or mid-step (once the
        run has a checkpoint to resume from). False if the run ended first."""
        patience = None  # mid-step: until when to wait for a victim that can carry a corrupt checkpoint
        while run.alive() and not self.stopped.is_set():
            if mode == "checkpoint":
                for folder in self.staging():
                    pid = int(folder.name.rsplit("-", 1)[1])
                    published = [c for c in sorted(folder.parent.glob("step-*")) if str(c) not in self.corrupted]
                    if published and self.count("corrupt_checkpoint") < self.per_kind:
                        self.corrupt_checkpoint(published[-1])  # the restart finds neither the new one nor this
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        continue
                    self.record("worker_kill", f"mid-checkpoint-write: pid {pid} writing {folder.parent.parent.name}"
                                f"/{folder.name.split('-')[2]}")
                    time.sleep(5)  # the next kill of this run lands in another write
                    return True
                time.sleep(0.05)
            else:
                workers = [w for w in run.workers() if not self.staging()]
                if workers and any(self.study_folder().glob("trials/*/checkpoints/step-*")):
                    trials = {w.pid: _trial_of(w) for w in workers}
                    newest = {pid: self.newest_uncorrupted(trial) for pid, trial in trials.items()}
                    wanted = self.count("corrupt_checkpoint") < self.per_kind
                    if wanted and any(newest.values()):
                        # a corrupt checkpoint still short: a victim whose trial has one to corrupt
                        workers = [w for w in workers if newest[w.pid]]
                    elif wanted and time.time() < (patience := patience or time.time() + 20):
                        # none yet (a worker names its trial only while its run's metrics file is open,
                        # and a trial's first checkpoint comes a while after its start): wait a little
                        time.sleep(0.5)
                        continue
                    victim = self.rng.choice(workers)
                    trial = trials[victim.pid]
                    if newest[victim.pid] and self.count("corrupt_checkpoint") < self.per_kind:
                        # bit rot found at the restart: the restarted worker must skip it for the previous one
                        self.corrupt_checkpoint(newest[victim.pid])
                    try:
                        victim.kill()
                    except psutil.NoSuchProcess:
                        continue
                    self.record("worker_kill", f"mid-step: pid {victim.pid}" + (f" ({trial.name})" if trial else ""))
                    time.sleep(5)
                    return True
                time.sleep(0.5)
        return False

    def newest_uncorrupted(self, trial: Path | None) -> Path | None:
        """The newest published checkpoint of `trial` (a trial folder, or None), unless already corrupted."""
        newest = sorted(trial.glob("checkpoints/step-*"))[-1:] if trial is not None else []
        return newest[0] if newest and str(newest[0]) not in self.corrupted else None

    def metric_lines(self) -> int:
        total = 0
        for path in self.study_folder().glob("trials/*/metrics.jsonl"):
            try:
                total += path.read_bytes().count(b"\n")
            except OSError:
                pass
        return total

    def mlflow_outage(self, down_s: float) -> None:
        before = self.metric_lines()
        self.server.kill()
        start = time.time()
        time.sleep(down_s)
        self.server.start()
        self.record("mlflow_down", f"down {time.time() - start:.1f} s (SIGKILL, restart on the same store)",
                    metric_lines_while_down=self.metric_lines() - before)

    def disk_full(self, run: Run) -> None:
        """Fill the study's filesystem to the last byte; wait for the study to stop (or ride it out); give the
        space back. Checks: the error names a path on that filesystem, and says the disk is full."""
        filler = self.fs / "chaos-filler"
        stat = os.statvfs(self.fs)
        free = stat.f_bavail * stat.f_frsize
        with open(filler, "wb", buffering=0) as handle:  # unbuffered: nothing left to flush at close
            try:
                os.posix_fallocate(handle.fileno(), 0, free)
            except OSError:
                pass
            while True:  # whatever fallocate left
                try:
                    handle.write(b"\0" * 4096)
                except OSError:
                    break
        code = run.wait(180)
        stopped = code is not None
        filler.unlink()
        tail = run.text().strip().splitlines()[-3:] if stopped else []
        last = tail[-1] if tail else ""
        clear = stopped and last.startswith("circuitscale: error:") and "no space left" in last.lower() \
            and str(self.fs) in last
        self.record("disk_full", f"{free / 1e6:.1f} MB filled; " + (
            f"study stopped (exit {code}): {last[:300]}" if stopped else "study rode it out"),
            # Ray prints its workers' tracebacks as they fail; what counts is the study's own last word
            stopped=stopped, clear_error=clear or not stopped)

    def corrupt(self) -> None:
        """Between runs: a byte of a dataset shard, and of the newest checkpoint of an unfinished trial."""
        if self.count("corrupt_shard") < self.per_kind:
            shards = sorted(self.cache.glob("*/*.arrow"))
            if shards:
                shard = self.rng.choice(shards)
                at = flip_byte(shard, self.rng)
                self.pending_checks.append(self.record("corrupt_shard", f"{shard} byte {at}", path=str(shard)))
        if self.count("corrupt_checkpoint") < self.per_kind:
            unfinished = [t for t in sorted(self.study_folder().glob("trials/*")) if not (t / "trial.json").is_file()]
            saved = [[c for c in sorted(t.glob("checkpoints/step-*")) if str(c) not in self.corrupted]
                     for t in unfinished]
            # the newest of a trial with a previous one to fall back to, else of one that starts over
            newest = [found[-1] for found in saved if len(found) >= 2] or [found[-1] for found in saved if found]
            if newest:
                self.corrupt_checkpoint(self.rng.choice(newest))

    def corrupt_checkpoint(self, checkpoint: Path) -> None:
        state = checkpoint / "state.safetensors"
        at = flip_byte(state, self.rng)
        self.corrupted.add(str(checkpoint))
        self.record("corrupt_checkpoint", f"{state} byte {at}", path=str(checkpoint),
                    trial=checkpoint.parent.parent.name)

    # --- the chaos run ------------------------------------------------------------------------------------------
    def progress(self) -> set[str]:
        """What the study has made so far: checkpoints written and trials finished."""
        folder = self.study_folder()
        return {str(p) for p in folder.glob("trials/*/checkpoints/step-*")} | {
            str(p) for p in folder.glob("trials/*/trial.json")}

    def chaos(self, max_rounds: int = 4) -> list[dict]:
        """Rounds of the study under the fault schedule until every kind fired --per-kind times (a round ends when
        the study finishes, and its invariants are checked then; a kind left short when the study finished gets
        another round, at most max_rounds in all); returns each round's invariants."""
        self.mount()
        terminal = ["driver_kill"] * self.per_kind + (["disk_full"] * self.per_kind if self.mounted else [])
        self.rng.shuffle(terminal)
        inrun = [("worker_kill", "checkpoint" if i % 2 == 0 else "step") for i in range(self.per_kind)]
        inrun += [("mlflow_down", None)] * self.per_kind
        self.rng.shuffle(inrun)
        rounds = []
        for number in range(1, max_rounds + 1):
            if number > 1 and not terminal and not inrun and not self.short():
                break
            if number > 1:  # a kind left short: the next round plans the injections it still needs
                self.say(f"round {number} for what is still short: {json.dumps(self.short())}")
                for kind, missing in self.short().items():
                    if kind in ("driver_kill", "disk_full"):
                        terminal += [kind] * missing
                    elif kind == "mlflow_down":
                        inrun += [(kind, None)] * missing
                    elif kind == "worker_kill":
                        inrun += [(kind, "checkpoint" if i % 2 == 0 else "step") for i in range(missing)]
            shutil.rmtree(self.study_folder(), ignore_errors=True)
            self.corrupted.clear()  # a new study folder: the same paths hold new checkpoints
            self.server.kill()
            self.server.folder = self.out / "mlflow-server" / f"round-{number}"
            self.server.folder.mkdir(parents=True, exist_ok=True)
            self.server.start()
            self.say(f"round {number}")
            runs = self.round(number, terminal, inrun)
            result = check(self.reference_folder, self.study_folder(), self.server.uri, self.cache)
            result["runs"] = runs
            self.say(f"round {number}: {runs} runs; invariants {json.dumps(result)}")
            rounds.append(result)
            if number < max_rounds and (terminal or inrun or self.short()):
                shutil.copytree(self.study_folder(), self.out / f"chaos-study-round-{number}", symlinks=True)
        return rounds

    def round(self, number: int, terminal: list[str], inrun: list) -> int:
        """Run the study command under faults until it finishes; returns how many runs that took. A run gets
        at most one in-run fault of each kind (all that are left when no terminal fault remains; worker
        kills spread so that no more are left than runs to carry them), and ends with its terminal fault: at
        a random moment in the study's window, or a few seconds after the run made progress (a checkpoint
        or a finished trial), whichever comes first, once the run's worker kills fired (or a bounded wait
        for them ran out). Kills a run did not fire wait for the next run."""
        command = self.command(self.fs, self.cache, self.server.uri)
        runs = clean_runs = 0
        lo, hi = self.study.window
        while True:
            runs += 1
            if runs > 1 or number > 1:  # a gap between runs (a later round starts on the earlier rounds' cache)
                self.corrupt()
            end = terminal.pop(0) if terminal else None
            vehicles = sum(k == "worker_kill" and m == "step" for k, m in inrun)
            if end is None and self.count("corrupt_checkpoint") + vehicles < self.per_kind:
                # no gap left between runs: a corrupt checkpoint rides on a mid-step kill, which the restart
                # must survive by skipping it (these kills count as worker kills too)
                inrun += [("worker_kill", "step")] * (self.per_kind - self.count("corrupt_checkpoint") - vehicles)
            mine: dict[str, list] = {}
            kills = sum(k == "worker_kill" for k, _ in inrun)
            cap = {"worker_kill": max(1, -(-kills // (len(terminal) + 1)))}  # ceil over the runs left
            for kind, mode in list(inrun):
                if end is None or len(mine.get(kind, ())) < cap.get(kind, 1):
                    mine.setdefault(kind, []).append(mode)
                    inrun.remove((kind, mode))
            log = self.out / "logs" / f"round-{number}-run-{runs:02d}.log"
            run = self.current = Run(command, self.env(True), log)
            self.runs_started = runs
            planned = [f"{k} x{len(m)}" for k, m in mine.items()] + ([end] if end else [])
            self.say(f"[{time.time() - self.began:7.1f} s] run {runs}: " + ", ".join(planned or ["no faults"]))
            threads = [threading.Thread(target=self.inject, args=(run, kind, modes), daemon=True)
                       for kind, modes in mine.items()]
            for thread in threads:
                thread.start()
            code = None
            if end is not None:
                # the first run waits for progress, so that later gaps have checkpoints to corrupt
                window = self.study.episode_timeout if runs == 1 and number == 1 else self.rng.uniform(lo, hi)
                seen, fire_at = self.progress(), run.started + window
                # Ray Train's workers come up about 30 s into a run here, and the first checkpoint soon after:
                # a terminal fault fired on that progress beat this run's worker kills to it nearly every
                # time. So while the run holds kills not yet fired, the terminal fault waits for them (at
                # most 30 s past the window), then fires within seconds.
                hold_until = run.started + hi + 30
                while run.alive():
                    now = time.time()
                    if self.fired[(runs, "worker_kill")] < len(mine.get("worker_kill", ())) and now < hold_until:
                        seen = self.progress()
                        time.sleep(0.2)
                        continue
                    if now >= fire_at:
                        break
                    if self.progress() - seen:
                        fire_at = min(fire_at, now + self.rng.uniform(0, 5))
                        seen = self.progress()
                    time.sleep(0.2)
                self.quiet.wait()  # an MLflow outage in progress ends before the terminal fault
                code = run.wait(0)
                if code is None and end == "driver_kill":
                    run.kill()
                    self.record("driver_kill", f"after {time.time() - run.started:.0f} s (the driver's "
                                "process group with the local Ray head)")
                    code = "killed"
                elif code is None:
                    self.disk_full(run)
                    code = run.wait(self.study.episode_timeout)
                else:
                    terminal.insert(0, end)  # the study ended first: the fault waits for the next run
            else:
                code = run.wait(self.study.episode_timeout)
            if code is None:
                run.kill()
                self.say(f"run {runs}: hung past {self.study.episode_timeout:.0f} s; killed")
            self.stopped.set()
            for thread in threads:
                thread.join()
            self.stopped.clear()
            for kind, modes in mine.items():  # faults that found no moment in this run wait for the next
                inrun[:0] = [(kind, m) for m in modes[self.fired[(runs, kind)]:]]
            self.fired.clear()
            self._check_detection(run)
            if code == 0:
                return runs
            if not terminal and not inrun:
                clean_runs += 1
                if clean_runs > 3:
                    raise SystemExit("the study did not finish in 3 runs after the last fault")

    def inject(self, run: Run, kind: str, modes: list) -> None:
        """On a thread: this run's faults of one kind, one after the other, while the run lasts."""
        key = (self.runs_started, kind)
        for mode in modes:
            if kind == "worker_kill":
                if not self.kill_worker(run, mode):
                    return
            else:
                lo, _ = self.study.window
                if self.stopped.wait(self.rng.uniform(lo / 4, lo)) or not run.alive():
                    return
                self.quiet.clear()
                try:
                    self.mlflow_outage(self.rng.uniform(2, 8))
                finally:
                    self.quiet.set()
            self.fired[key] += 1

    def _check_detection(self, run: Run) -> None:
        """A corrupt shard must be named by the run that followed it."""
        text = run.text()
        for fault in list(self.pending_checks):
            fault.checks["named"] = any(fault.checks["path"] in line and "rebuilding" in line
                                        for line in text.splitlines())
            self.pending_checks.remove(fault)

    def stop(self) -> None:
        if self.current is not None and self.current.alive():  # the harness itself failed mid-run
            self.current.kill()
        self.server.kill()
        if self.study_folder().is_dir():  # kept for inspection, off the tmpfs
            shutil.rmtree(self.out / "chaos-study", ignore_errors=True)
            shutil.copytree(self.study_folder(), self.out / "chaos-study", symlinks=True)
        self.unmount()


# --- invariants ---------------------------------------------------------------------------------------------------

def report_view(folder: Path) -> tuple[dict, list[str]]:
    """headline.json and report.md without their wall-clock figures."""
    headline = json.loads((folder / "report" / "headline.json").read_text())
    for key in TIMING_KEYS:
        headline.pop(key, None)
    lines, blank = [], []
    for line in (folder / "report" / "report.md").read_text().splitlines():
        if line.startswith("- wall time"):
            continue
        cells = line.split("|")
        if line.startswith("|") and any(c.strip() in TIMING_COLUMNS for c in cells):
            blank = [i for i, c in enumerate(cells) if c.strip() in TIMING_COLUMNS]
        elif line.startswith("|") and blank and len(cells) > max(blank):
            cells = ["" if i in blank else c for i, c in enumerate(cells)]
        elif not line.startswith("|"):
            blank = []
        lines.append("|".join(cells) if line.startswith("|") else line)
    return headline, lines


def check(reference: Path, chaos: Path, uri: str, cache: Path) -> dict:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name(chaos.name)
    runs = client.search_runs([experiment.experiment_id], max_results=10_000) if experiment else []
    per_trial = Counter(r.data.tags.get("trial") for r in runs if r.data.tags.get("kind") == "trial")
    parents = [r for r in runs if r.data.tags.get("kind") == "study"]
    trials = sorted(p.name for p in (reference / "trials").iterdir())
    finished = Counter(r.data.tags.get("trial") for r in runs
                       if r.data.tags.get("kind") == "trial" and r.info.status == "FINISHED")
    result = {
        "trials": len(trials),
        "trials_finished_once": sum(per_trial[t] == 1 and finished[t] == 1 for t in trials),
        "duplicated_runs": sum(max(n - 1, 0) for n in per_trial.values()) + max(len(parents) - 1, 0),
        "running_runs": sum(r.info.status == "RUNNING" for r in runs),
        "not_finished_runs": sum(r.info.status != "FINISHED" for r in runs),
    }
    unequal, missing_metrics = [], 0
    by_trial = {r.data.tags.get("trial"): r for r in runs if r.data.tags.get("kind") == "trial"}
    for name in trials:
        mine, theirs = chaos / "trials" / name / "export" / "model.safetensors", \
            reference / "trials" / name / "export" / "model.safetensors"
        if not mine.is_file():
            unequal.append(name)
        else:
            a, b = load_file(str(mine)), load_file(str(theirs))
            if a.keys() != b.keys() or any(not (a[k] == b[k]).all() or a[k].dtype != b[k].dtype for k in a):
                unequal.append(name)
        run = by_trial.get(name)
        logged = set()
        jsonl = chaos / "trials" / name / "metrics.jsonl"
        for line in jsonl.read_text().splitlines() if jsonl.is_file() else []:
            try:
                row = json.loads(line)
            except ValueError:
                continue
            step = row.pop("step")
            row.pop("time", None)
            logged |= {(k, step) for k, v in row.items() if isinstance(v, int | float) and math.isfinite(v)}
        if run is None:
            missing_metrics += len(logged)
            continue
        stored = set()
        for key in {k for k, _ in logged}:
            stored |= {(key, m.step) for m in client.get_metric_history(run.info.run_id, key)}
        missing_metrics += len(logged - stored)
    result |= {"weights_unequal": unequal, "metrics_missing": missing_metrics,
               "lost": len(unequal) + missing_metrics}
    result["report_equal"] = report_view(reference) == report_view(chaos)
    result["temp_left"] = [str(p) for root in (chaos, cache) for p in root.rglob(".tmp-*")]
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--study", choices=("smoke", "cpu"), default="smoke")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--per-kind", type=int, default=5, help="injections of each fault kind (default 5)")
    parser.add_argument("--out", type=Path, help="working folder (default runs/chaos/<study>-seed<N>)")
    parser.add_argument("--reference", type=Path, help="a finished fault-free study folder of the same sweep and "
                        "arguments to compare against (default: run one in the working folder)")
    args = parser.parse_args(argv)
    if args.per_kind < 1:
        parser.error("--per-kind must be at least 1")
    out = (args.out or ROOT / "runs" / "chaos" / f"{args.study}-seed{args.seed}").resolve()
    if os.path.ismount(out / "fs"):
        subprocess.run(["umount", "-l", str(out / "fs")], check=False)
    for stale in [*out.glob("chaos-study*"), *(out / s for s in ("fs", "cache-chaos", "mlflow-server", "logs"))]:
        shutil.rmtree(stale, ignore_errors=True)
    (out / "logs").mkdir(parents=True)
    study = study_setup(args.study, out)
    harness = Harness(study, out, args.seed, args.per_kind)
    reference, reference_wall = harness.reference(args.reference and args.reference.resolve())
    harness.reference_folder = reference
    start = time.time()
    harness.began = start
    try:
        rounds = harness.chaos()
    finally:
        harness.stop()
    wall = time.time() - start
    faults = harness.faults
    named = _checkpoints_named([out / "chaos-study", *sorted(out.glob("chaos-study-round-*"))], faults)
    ok = all(r["lost"] == 0 and r["duplicated_runs"] == 0 and r["running_runs"] == 0 and not r["temp_left"]
             and r["trials_finished_once"] == r["trials"] and r["report_equal"] for r in rounds)

    def recovered(fault: Fault) -> bool:
        if not ok:
            return False
        if fault.kind == "corrupt_shard":
            return fault.checks.get("named") is True
        if fault.kind == "corrupt_checkpoint":
            return named.get(fault.checks["path"], False)
        if fault.kind == "disk_full":
            return fault.checks["clear_error"]
        return True

    runs = sum(r["runs"] for r in rounds)
    print(f"\nchaos table ({args.study} study, seed {args.seed}; {len(rounds)} round(s), {runs} runs of the "
          f"command; fault-free study {reference_wall:.0f} s, the chaos rounds {wall:.0f} s):")
    print(f"{'fault':<20} {'injected':>8} {'recovered':>9}")
    for kind in KINDS:
        mine = [f for f in faults if f.kind == kind]
        print(f"{kind:<20} {len(mine):>8} {sum(map(recovered, mine)):>9}")
    summary = {"study": args.study, "seed": args.seed, "rounds": len(rounds), "runs": runs,
               "faults_injected": len(faults), "recovered": sum(map(recovered, faults)),
               "per_kind": {k: sum(f.kind == k for f in faults) for k in KINDS},
               "lost": sum(r["lost"] for r in rounds), "duplicated_runs": sum(r["duplicated_runs"] for r in rounds),
               "running_runs": sum(r["running_runs"] for r in rounds),
               "report_equal": all(r["report_equal"] for r in rounds),
               "temp_left": sum(len(r["temp_left"]) for r in rounds), "disk_full_mounted": harness.could_mount,
               "wall_s": round(wall, 1),
               "reference_wall_s": round(reference_wall, 1),
               "fault_cost_s": round(wall - len(rounds) * reference_wall, 1),
               "short": harness.short()}  # kinds still below --per-kind after the last round (empty when none)
    (out / "faults.json").write_text(json.dumps({"faults": [f.__dict__ for f in faults], "rounds": rounds},
                                                indent=1))
    if summary["short"]:
        print(f"chaos: {len(rounds)} round(s) ran out with kinds below --per-kind {args.per_kind}: "
              f"{json.dumps(summary['short'])}")
    print(json.dumps(summary))
    return 0 if ok and summary["recovered"] == summary["faults_injected"] and not summary["short"] else 1


def _checkpoints_named(folders: list[Path], faults: list[Fault]) -> dict[str, bool]:
    """Whether each corrupted checkpoint is named in its trial's trial.log as skipped (in any round's copy)."""
    out = {}
    for fault in faults:
        if fault.kind == "corrupt_checkpoint":
            logs = [f / "trials" / fault.checks["trial"] / "trial.log" for f in folders]
            text = "\n".join(log.read_text() for log in logs if log.is_file())
            path = fault.checks["path"]
            out[path] = any(path in line and "falling back" in line for line in text.splitlines()) or bool(
                re.search(re.escape(Path(path).name) + r".*unusable", text))
    return out


if __name__ == "__main__":
    sys.exit(main())
