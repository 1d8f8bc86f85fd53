"""Where run records go: a local `metrics.jsonl` always, and MLflow (a SQLite file in the run folder
by default, any tracking URI by config; DESIGN.md).

`RunTracker` talks to MLflow through an `MlflowClient` bound to its URI, so there is no global active
run. A resumed run finds its MLflow run id in `mlflow_run.json` and continues that run. Every run ends
with a status: FINISHED, FAILED (reason in the `failure_reason` tag) or KILLED.

A tracking server that goes away never stalls training: metrics go to `metrics.jsonl` first, then to MLflow
from one background thread (in order; MLflow's client retries a refused request for about two minutes); a
batch that still fails is kept and sent again with the next one and at `finish`. A run resumed after a
crash sends whatever `metrics.jsonl` holds that the store lacks (batches that were waiting when the
process died), so the store ends with every metric the run logged.
"""

import json
import math
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from infra.checkpoint import write_atomic

RUN_FILE, METRICS_FILE = "mlflow_run.json", "metrics.jsonl"
_TOKEN_TAG = "circuitscale.token"  # on each run: the token its folder's mlflow_run.json held while creating it
_MAX_PARAM_LEN = 6000  # MLflow's limit on a param value
Status = Literal["FINISHED", "FAILED", "KILLED"]


@dataclass(kw_only=True, frozen=True)
class TrackingConfig:
    # None: sqlite:///<run folder>/mlflow.db. MLflow 3 refuses the old ./mlruns file store; use SQLite
    # locally and a server with a database on clusters.
    uri: str | None = None
    experiment: str = "circuitscale"
    parent_run_id: str | None = None  # a study's trials are nested under the study's run
    tags: dict[str, str] = field(default_factory=dict)  # set on the run when it is created


def check_tracking_config(cfg: TrackingConfig) -> None:
    if cfg.uri is not None and "://" not in cfg.uri:
        raise ValueError(
            f"tracking.uri: must be a URI such as sqlite:///runs/mlflow.db or http://host:5000, got {cfg.uri!r}"
        )
    if not cfg.experiment.strip():
        raise ValueError("tracking.experiment: must not be empty")


def tracking_uri(cfg: TrackingConfig, run_dir: Path) -> str:
    return cfg.uri or f"sqlite:///{run_dir.resolve() / 'mlflow.db'}"


class RunTracker:
    def __init__(self, cfg: TrackingConfig, run_dir: Path, run_name: str, params: dict[str, object]) -> None:
        self.run_dir = run_dir
        self.uri = tracking_uri(cfg, run_dir)
        # imported on use: MLflow takes seconds to import, and every config imports this module
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=self.uri)
        jsonl = run_dir / METRICS_FILE
        torn = jsonl.is_file() and jsonl.stat().st_size > 0 and not jsonl.read_bytes().endswith(b"\n")
        self._jsonl = open(jsonl, "a", encoding="utf-8")  # noqa: SIM115 (closed in finish)
        if torn:  # a process killed mid-line: the next record starts on a line of its own
            self._jsonl.write("\n")
        self.run_id, self.resumed = self._open_run(cfg, run_name, params)
        self._sender = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mlflow-metrics")
        self._unsent: list = []  # metrics the store refused (a server away past the client's retries)
        self._lock = threading.Lock()
        if self.resumed:
            self._backfill()

    def _open_run(self, cfg: TrackingConfig, run_name: str, params: dict[str, object]) -> tuple[str, bool]:
        """The folder's run: resumed when `mlflow_run.json` names one this store holds, else created. Creating
        is crash-safe: a token goes to `mlflow_run.json` first and onto the run as a tag, so a process killed
        between creating the run and recording its id (or a disk that filled there) leaves a run that the
        next start adopts, never a second run beside a RUNNING orphan."""
        from mlflow.entities import Param  # on use, as MlflowClient above

        record = self.run_dir / RUN_FILE
        saved = self._record()
        previous = None
        if saved.get("run_id"):
            if self._holds(saved["run_id"]):
                self.client.update_run(saved["run_id"], status="RUNNING")
                return saved["run_id"], True
            # the folder names a run this store does not hold (a copied run folder, or another tracking.uri):
            # a new run here, tagged with the one it continues
            previous = f"{saved['run_id']} at {saved.get('uri', '?')}"
        experiment_id = self._experiment_id(cfg.experiment)
        token = saved.get("token") if saved.get("uri") == self.uri and not saved.get("run_id") else None
        # MlflowClient.log_batch splits a batch into the server's limits itself
        param_list = [Param(k, str(v)[:_MAX_PARAM_LEN]) for k, v in params.items()]
        if token:
            adopted = self.client.search_runs([experiment_id], filter_string=f"tags.`{_TOKEN_TAG}` = '{token}'",
                                              max_results=1)
            if adopted:
                run_id = adopted[0].info.run_id
                self.client.update_run(run_id, status="RUNNING")
                self.client.log_batch(run_id, params=[p for p in param_list
                                                      if p.key not in adopted[0].data.params])
                write_atomic(record, json.dumps({"run_id": run_id, "uri": self.uri}))
                return run_id, True
        else:
            token = uuid.uuid4().hex
            write_atomic(record, json.dumps({"token": token, "uri": self.uri} | (
                {"continues": previous} if previous else {})))
        previous = previous or saved.get("continues")
        tags = dict(cfg.tags) | ({"mlflow.parentRunId": cfg.parent_run_id} if cfg.parent_run_id else {})
        tags |= ({"circuitscale.continues": previous} if previous else {}) | {_TOKEN_TAG: token}
        run = self.client.create_run(experiment_id, run_name=run_name, tags=tags)
        self.client.log_batch(run.info.run_id, params=param_list)
        write_atomic(record, json.dumps({"run_id": run.info.run_id, "uri": self.uri}))
        return run.info.run_id, False

    def _record(self) -> dict:
        """`mlflow_run.json` ({} when absent; a record that does not parse is an error naming the file)."""
        record = self.run_dir / RUN_FILE
        if not record.is_file():
            return {}
        try:
            saved = json.loads(record.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as err:
            raise ValueError(f"{record} is not a run record ({err}); delete it to start a new MLflow run") from None
        if not isinstance(saved, dict):
            raise ValueError(f"{record} is not a run record; delete it to start a new MLflow run")
        return saved

    def _experiment_id(self, experiment: str) -> str:
        found = self.client.get_experiment_by_name(experiment)
        if found is not None:
            return found.experiment_id
        # a local store keeps artifacts beside it; a tracking server uses its own artifact root
        local = self.uri.startswith("sqlite:")
        artifacts = (self.run_dir.resolve() / "mlartifacts").as_uri() if local else None
        return self.client.create_experiment(experiment, artifact_location=artifacts)

    def _holds(self, run_id: str) -> bool:
        """Whether this store has the run (any other failure, a server that is down say, propagates)."""
        from mlflow.exceptions import MlflowException  # on use, as MlflowClient above

        try:
            self.client.get_run(run_id)
        except MlflowException as err:
            if err.error_code == "RESOURCE_DOES_NOT_EXIST":
                return False
            raise
        return True

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        stamp = int(time.time() * 1000)
        self._jsonl.write(json.dumps({"step": step, "time": stamp / 1000, **metrics}) + "\n")
        self._jsonl.flush()
        from mlflow.entities import Metric  # on use, as MlflowClient above

        finite = [Metric(k, float(v), stamp, step) for k, v in metrics.items() if math.isfinite(float(v))]
        if finite:
            self._sender.submit(self._send, finite)

    def _send(self, metrics: list) -> None:
        """On the sender thread: this batch and any the store refused before, in order; kept if refused."""
        with self._lock:
            batch, self._unsent = self._unsent + metrics, []
        try:
            for start in range(0, len(batch), 1000):  # MLflow's limit on metrics per batch
                self.client.log_batch(self.run_id, metrics=batch[start:start + 1000])
        except Exception as err:  # the server away beyond its client's retries: sent again later
            with self._lock:
                self._unsent = batch + self._unsent
            print(f"MLflow at {self.uri} refused {len(batch)} metrics ({type(err).__name__}); they are kept "
                  f"and sent again (they are in {self.run_dir / METRICS_FILE})", file=sys.stderr, flush=True)

    def flush(self) -> int:
        """Wait until every logged metric has been sent; the number the store still refuses (0: all there)."""
        self._sender.submit(lambda: None).result()
        if self._unsent:
            self._sender.submit(self._send, []).result()
        return len(self._unsent)

    def _backfill(self) -> None:
        """Send the metrics `metrics.jsonl` holds that the store lacks (the run's process died while they
        waited to be sent). Each (key, step) the store has is left alone."""
        from mlflow.entities import Metric  # on use, as MlflowClient above

        wanted: dict[str, dict[int, tuple[float, int]]] = {}
        for line in (self.run_dir / METRICS_FILE).read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
                step, stamp = int(row.pop("step")), int(float(row.pop("time")) * 1000)
            except (ValueError, KeyError, TypeError, AttributeError):
                continue  # a line torn by a kill
            for key, value in row.items():
                if isinstance(value, int | float) and math.isfinite(value):
                    wanted.setdefault(key, {})[step] = (float(value), stamp)
        missing = []
        for key, steps in wanted.items():
            have = {m.step for m in self.client.get_metric_history(self.run_id, key)}
            missing += [Metric(key, v, t, s) for s, (v, t) in steps.items() if s not in have]
        if missing:
            self._send(missing)

    def log_artifact(self, path: Path) -> None:
        self.client.log_artifact(self.run_id, str(path))

    def log_artifacts(self, folder: Path, under: str) -> None:
        self.client.log_artifacts(self.run_id, str(folder), under)

    def set_tags(self, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag  # on use, as MlflowClient above

        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def finish(self, status: Status, reason: str | None = None) -> None:
        """End the run with its status. An interrupt may have landed inside an MLflow call and left its
        session unusable, so a failed attempt is retried once with a fresh client."""
        unsent = self.flush()
        self._sender.shutdown(wait=True)
        if unsent:
            print(f"{unsent} metrics did not reach MLflow at {self.uri}; they are in {self.run_dir / METRICS_FILE} "
                  "and are sent when the run is resumed", file=sys.stderr, flush=True)
        for attempt in range(2):
            try:
                if reason:
                    self.set_tags({"failure_reason": reason[:5000]})
                self.client.set_terminated(self.run_id, status=status)
                break
            except Exception:
                if attempt:
                    raise
                self.client = type(self.client)(tracking_uri=self.uri)
        self._jsonl.close()


@contextmanager
def tracked_run(cfg: TrackingConfig, run_dir: Path, *, run_name: str | None = None,
                params: dict[str, object] | None = None) -> Iterator[RunTracker]:
    """The run of `run_dir` (created, or continued when the folder names one) for the block, which owns
    its status: FINISHED when the block completes, KILLED on an interrupt (Ctrl-C, or SIGTERM turned into
    one), FAILED with the exception as its `failure_reason` on anything else. The exception propagates."""
    run_dir.mkdir(parents=True, exist_ok=True)
    tracker = RunTracker(cfg, run_dir, run_name=run_name or run_dir.name, params=params or {})
    try:
        yield tracker
    except KeyboardInterrupt:
        tracker.finish("KILLED", "interrupted")
        raise
    except BaseException as err:
        tracker.finish("FAILED", f"{type(err).__name__}: {err}")
        raise
    tracker.finish("FINISHED")


class NullTracker:
    """What ranks other than 0 log to: nothing."""

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass


def download_run_artifacts(uri: str, experiment: str, artifact: str) -> list[str]:
    """The text of `artifact` from every finished run of `experiment` that has it (a study's trials)."""
    from mlflow.tracking import MlflowClient  # imported on use: see RunTracker

    client = MlflowClient(tracking_uri=uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise ValueError(f"no MLflow experiment {experiment!r} at {uri}")
    texts = []
    runs = client.search_runs([found.experiment_id], filter_string="attributes.status = 'FINISHED'",
                              order_by=["attributes.start_time ASC"], max_results=10_000)
    for run in runs:
        if "trial" not in run.data.tags:
            continue  # the study's parent run
        with tempfile.TemporaryDirectory() as tmp:
            try:
                path = client.download_artifacts(run.info.run_id, artifact, tmp)
            except Exception:  # a trial run without the record (pruning off before records existed)
                continue
            texts.append(Path(path).read_text(encoding="utf-8"))
    return texts
