"""Item-wise stages on a Dask cluster (`project.executor: dask`): the same jobs, scheduled and retried by Dask.

`items.run_jobs` keeps everything that decides what an item's outcome means (the index, the report, deterministic
vs transient failures); this module only swaps the process pool for a `distributed.Client`.

Why Dask's `distributed` and not Ray, nor Prefect's `DaskTaskRunner`:
- the driver already hands out picklable `Job`s and consumes results as they complete: `Client.submit` +
  `as_completed` is the process pool's own shape, so nothing else in the stages changes;
- the per-process set-up (a transcription model, a tokenizer) is a `WorkerPlugin`: run once in every worker,
  and again in a worker that joins later or replaces one that died. Ray would hold the model in an actor pool,
  a different shape from the pool for every stage;
- a worker that dies mid-item: the scheduler reschedules its items on other workers, up to
  `distributed.scheduler.allowed-failures` (3) times, then fails it with `KilledWorker`; the retries are counted
  from the scheduler's own record (`TaskState.suspicious`);
- pure-Python wheels (no raylet, object store or second runtime beside torch), and a local cluster on loopback
  starts in seconds on a laptop;
- `DaskTaskRunner` runs *Prefect tasks* on Dask, and here a Prefect task is a whole stage (stages are plain
  functions); one Prefect task per item would put thousands of task runs on the API and move the per-item
  bookkeeping out of `run_jobs`.

Workers of an existing cluster must run this project's code and see its files at the same paths: start them in the
project folder on a shared filesystem (`dask worker tcp://HOST:8786 --nthreads 1`). Both are checked before any
item is sent.
"""

from __future__ import annotations

import contextlib
import logging
import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

CONNECT_TIMEOUT_S = 10  # seconds to reach the scheduler of `project.cluster_address`
WORKERS_TIMEOUT_S = 30  # seconds an existing cluster gets to show at least one worker


class ClusterError(RuntimeError):
    """The cluster cannot take the stage's items (no scheduler answers, no workers, workers blind to the files)."""


def connect(address: str):
    """A `distributed.Client` of the scheduler at `address`.

    Raises:
        ClusterError: nothing answers there within CONNECT_TIMEOUT_S, or the address is malformed.
    """
    from distributed import Client

    try:
        return Client(address, timeout=CONNECT_TIMEOUT_S, set_as_default=False)
    except (OSError, ValueError, TypeError) as err:  # TimeoutError is an OSError
        raise ClusterError(
            f"project.cluster_address: no Dask scheduler answers at {address} ({type(err).__name__}: {err}); "
            "start one (`dask scheduler`) or unset the address for a local cluster"
        ) from None


def unreachable(project) -> list[str]:
    """One line naming `project.cluster_address` when the profile points at a scheduler that does not answer."""
    if project.executor != "dask" or not project.cluster_address:
        return []
    try:
        connect(project.cluster_address).close()
    except ClusterError as err:
        return [str(err)]
    return []


@contextlib.contextmanager
def client_for(project, n_workers: int) -> Iterator[Any]:
    """The client of `project.cluster_address`, or of a local cluster of `n_workers` processes on 127.0.0.1."""
    if project.cluster_address:
        client = connect(project.cluster_address)
        try:
            client.wait_for_workers(1, timeout=WORKERS_TIMEOUT_S)
        except (TimeoutError, OSError):
            client.close()
            raise ClusterError(
                f"project.cluster_address: the scheduler at {project.cluster_address} has no workers; "
                "start some in the project folder (`dask worker ADDRESS --nthreads 1`)"
            ) from None
        with client:
            yield client
        return
    import dask
    from distributed import Client, LocalCluster

    # One thread per worker: an item at a time per process, like the pool (the set-up's model is not shared
    # between threads). Saturation 1.0: a worker holds only the item it runs, so one that dies takes (and
    # retries) only that one. Loopback only, no dashboard.
    with dask.config.set({"distributed.scheduler.worker-saturation": 1.0}):
        cluster = LocalCluster(
            n_workers=n_workers, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=None,
            silence_logs=logging.ERROR,
        )  # fmt: skip
    with cluster, Client(cluster, set_as_default=False) as client:
        yield client


def _plugin(initializer: Callable[..., None] | None, threads: int | None, initargs: tuple[Any, ...]):
    """Every worker's set-up as a `WorkerPlugin` (the class is built here: `distributed` is imported only when used)."""
    from distributed.diagnostics.plugin import WorkerPlugin

    class SetUp(WorkerPlugin):
        def __init__(self):
            self.initializer, self.threads, self.initargs = initializer, threads, initargs

        def setup(self, worker) -> None:
            os.environ.setdefault("TQDM_DISABLE", "1")  # one bar, in the driver
            if self.initializer is not None:
                self.initializer(self.threads, *self.initargs)

    return SetUp()


def _reads(path: str, token: str) -> bool:
    """On a worker: does `path` (as the driver names it, maybe relative) hold `token`?"""
    try:
        return Path(path).read_text() == token
    except OSError:
        return False


def check_files(client, out_dir: Path) -> None:
    """Raise `ClusterError` unless every worker imports this project and sees `out_dir` at the same path."""
    token = uuid.uuid4().hex
    probe = Path(out_dir) / f".cluster-probe-{token}"
    probe.parent.mkdir(parents=True, exist_ok=True)
    probe.write_text(token)
    try:
        seen = client.run(_reads, str(probe), token)  # {worker address: bool}
    except Exception as err:  # ModuleNotFoundError from the worker: it runs other code than ours
        raise ClusterError(
            f"the cluster's workers cannot run this project's code: {type(err).__name__}: {err}"
        ) from None
    finally:
        probe.unlink(missing_ok=True)
    blind = sorted(w for w, ok in seen.items() if not ok)
    if blind:
        raise ClusterError(
            f"workers {', '.join(blind)} do not see {out_dir}: start them in the project folder on a shared filesystem"
        )


def retries(client, keys: list[str]) -> int:
    """How many times the scheduler rescheduled these tasks because the worker running them died."""

    def count(dask_scheduler, keys):  # a nested function is pickled by value: the scheduler needs no project code
        tasks = [dask_scheduler.tasks.get(k) for k in keys]
        return sum(max(0, t.suspicious - (t.state == "erred")) for t in tasks if t is not None)

    return int(client.run_on_scheduler(count, keys=keys))


def results(
    jobs: list,
    project,
    n_workers: int,
    call: Callable[[Any], Any],
    initializer: Callable[..., None] | None,
    initargs: tuple[Any, ...],
    out_dir: Path,
    report,
) -> Iterator[tuple[Any, Any]]:
    """Run `call(job)` for every job on the cluster; yields (job, result or the exception that ended it).

    `report.retries` gains the scheduler's reschedules (items whose worker died) once all are done.
    """
    from distributed import as_completed

    with client_for(project, n_workers) as client:
        check_files(client, out_dir)
        threads = None if project.cluster_address else max(1, (os.cpu_count() or 1) // n_workers)
        client.register_plugin(_plugin(initializer, threads, initargs), name=f"jam-setup-{report.stage}")
        futures = {client.submit(call, job, pure=False): job for job in jobs}
        try:
            for fut in as_completed(futures, loop=client.loop):
                try:
                    yield futures[fut], fut.result()
                except Exception as err:  # KilledWorker: its workers kept dying; the driver reports it transient
                    yield futures[fut], err
        finally:
            report.retries += retries(client, [f.key for f in futures])
