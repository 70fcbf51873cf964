"""Run independent reproduction tasks on Ray (docs/reproducing.md, "Running on a cluster"); Ray is an optional
dependency (``requirements-distributed.txt``), imported only here and only when ``--engine ray`` is asked for.

Each task is one class of one configuration (method, modality or fusion variant, seed): it trains (resumably) and
evaluates the class and stores its metrics itself, so the driver only collects results. Tasks request
``--cpus_per_task`` CPUs and ``--gpus_per_task`` GPUs; Ray retries a failed task once (a crash, a killed worker, an
exception), after which its error is reported and the other tasks go on.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

REPOSITORY = Path(__file__).resolve().parents[2]
RETRIES = 1


def _missing_ray() -> ImportError:
    return ImportError("--engine ray needs Ray: pip install -r requirements-distributed.txt")


def run_tasks(function: Callable[[Any], dict], tasks: Sequence[Any], *, address: str | None, cpus_per_task: float,
              gpus_per_task: float, on_result: Callable[[Any, dict | None, BaseException | None], None]) -> None:
    """Run ``function(task)`` for every task as a Ray task; ``on_result(task, result, error)`` as each finishes.

    Args:
        address: a running cluster (``auto``, ``HOST:PORT``); None starts a local Ray instance unless this process
            is connected already (``ray.init`` called before, e.g. by a test).
    """
    try:
        import ray
    except ImportError:
        raise _missing_ray() from None
    # the workers import this repository's modules: its root on their path (on a cluster: the same path on every
    # node, e.g. a shared filesystem)
    runtime_env = {"env_vars": {"PYTHONPATH": os.pathsep.join(filter(None, [str(REPOSITORY),
                                                                            os.environ.get("PYTHONPATH")]))}}
    if not ray.is_initialized():
        ray.init(address=address, runtime_env=runtime_env, include_dashboard=False, log_to_driver=False)
    remote = ray.remote(function).options(num_cpus=cpus_per_task, num_gpus=gpus_per_task, max_retries=RETRIES,
                                          retry_exceptions=True, runtime_env=runtime_env)
    pending = {remote.remote(task): task for task in tasks}
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1)
        task = pending.pop(done[0])
        try:
            on_result(task, ray.get(done[0]), None)
        except ray.exceptions.RayError as err:  # the task's own exception (after the retry), or a lost worker
            cause = getattr(err, "cause", None)
            on_result(task, None, cause if isinstance(cause, BaseException) else err)
