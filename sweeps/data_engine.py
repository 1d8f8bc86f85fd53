"""The data build's `ray` engine (`data.engine=ray`): each stage's tasks as Ray Data tasks, one per CPU of
the cluster. The tasks read and write the build's work folder (pipeline/build.py), which must be storage
every node mounts; importing this module registers the engine."""

import functools
import json
import logging
from collections.abc import Callable

import ray.data
from tqdm.auto import tqdm

from pipeline.build import register_engine
from pipeline.errors import DataError
from sweeps.ray_session import init_ray


def run_ray(fn: Callable[[dict], dict], tasks: list[dict], *, desc: str, unit: str, progress: bool) -> list[dict]:
    init_ray(verbose=0)
    logging.getLogger("ray.data").setLevel(logging.WARNING)  # not two INFO lines per stage
    ray.data.DataContext.get_current().enable_progress_bars = False  # ours counts tasks, with the stage's name
    rows = [{"index": i, "task": json.dumps(task)} for i, task in enumerate(tasks)]
    dataset = ray.data.from_items(rows, override_num_blocks=len(rows)).map(
        functools.partial(_task, fn), num_cpus=1,
        # one tokenizer thread per task: Ray runs a task per CPU, and Rayon would start a thread per core
        runtime_env={"env_vars": {"RAYON_RS_NUM_CPUS": "1"}},
    )
    results: list[dict | None] = [None] * len(tasks)
    with tqdm(total=len(tasks), desc=f"{desc} (ray)", unit=unit, disable=not progress) as bar:
        for row in dataset.iter_rows():
            out = json.loads(row["result"])
            if "data_error" in out:
                raise DataError(out["data_error"])
            results[row["index"]] = out
            bar.update(1)
    return results  # type: ignore[return-value]


def _task(fn: Callable[[dict], dict], row: dict) -> dict:
    try:
        result = fn(json.loads(row["task"]))
    except DataError as err:  # the user's input: carried back as data, raised on the driver as itself
        result = {"data_error": str(err)}
    return {"index": row["index"], "result": json.dumps(result)}


register_engine("ray", run_ray)
