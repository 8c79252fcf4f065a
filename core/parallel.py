"""Run a function over many items in a process pool, with a progress bar and errors that reach the parent.

CPU stages (evaluation, CRF, label making) share :func:`parallel_map`. Its contract:

* results come back in input order, all of them or none: the first failing item stops the pool and raises in the
  parent, with the item named (never a total computed from partial results); a worker killed by the system
  raises too, instead of hanging;
* the function (often a ``functools.partial`` holding a dataset source) is sent to each worker once, not once per
  item;
* ``num_workers <= 1`` runs in the calling process (simplest to debug, and what tests use).

Training data loaders on CPU take their worker processes from :func:`training_workers_context`.
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.forkserver
import os
import traceback
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, TypeVar

from tqdm import tqdm

from core.errors import WSSSError

logger = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

_worker_fn: Callable[[Any], Any] | None = None


class WorkerError(RuntimeError):
    """An unexpected exception in a worker, re-raised in the parent with the failing item and the worker traceback."""


def default_num_workers(limit: int = 8) -> int:
    """``min(limit, usable CPUs)``, at least 1."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return max(1, min(limit, cpus))


def _init_worker(fn: Callable[[Any], Any]) -> None:
    global _worker_fn
    _worker_fn = fn


def _describe(item: Any, limit: int = 200) -> str:
    text = repr(item)
    return text if len(text) <= limit else text[:limit] + "..."


def _call(fn: Callable[[Any], Any], item: Any) -> tuple[bool, Any]:
    """(True, result) or (False, exception to raise in the parent); user errors keep their own message."""
    try:
        return True, fn(item)
    except WSSSError as e:
        return False, WSSSError(str(e))
    except Exception as e:  # noqa: BLE001 - any failure must reach the parent, named
        details = "".join(traceback.format_exception(type(e), e, e.__traceback__))
        return False, WorkerError(f"failed on {_describe(item)}: {type(e).__name__}: {e}\n{details}")


def _call_in_worker(item: Any) -> tuple[bool, Any]:
    assert _worker_fn is not None, "worker not initialised"
    return _call(_worker_fn, item)


def _start_method() -> str:
    # fork starts workers in milliseconds and shares the parent's imports; elsewhere use the platform default.
    return "fork" if "fork" in multiprocessing.get_all_start_methods() else multiprocessing.get_start_method()


#: What a loader forkserver imports once, so that the workers it forks start with them loaded. Each worker still
#: re-imports the script (``__main__``, as multiprocessing does for every non-fork start method: about 0.1 s with
#: these loaded), so a script that trains on CPU must guard its entry point with ``if __name__ == "__main__"``.
FORKSERVER_PRELOAD = ("torch", "numpy", "cv2", "core.datasets")


def training_workers_context(device_type: str, num_workers: int) -> multiprocessing.context.BaseContext | None:
    """The start method of a training process's DataLoader workers: a forkserver context on CPU, else None (the
    platform's default).

    A training process rewrites its weights, gradients and optimizer state at every step. On CPU that memory lives
    in the process, and DataLoader workers forked from it (once per epoch) share it copy-on-write, so the first
    steps of every epoch pay for copying every page the step writes: 1.3-2 s per epoch with P-NOC's two
    ResNet-50s on 2 cores. Workers forked from a forkserver, a fresh process that holds no network, share nothing
    with the trainer. They get the same seeds from the DataLoader, so the batches are the same. On CUDA the
    networks live on the device and the default is kept (fork up to Python 3.13: a worker starts in milliseconds).

    The server is started at once: the stages build their loaders before their networks, so its imports overlap
    with building them. It serves every later loader of the process.
    """
    if num_workers <= 0 or device_type != "cpu" or "forkserver" not in multiprocessing.get_all_start_methods():
        return None
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(list(FORKSERVER_PRELOAD))  # no effect once the server runs
    multiprocessing.forkserver.ensure_running()
    return context


def parallel_map(
    fn: Callable[[T], R],
    items: Iterable[T],
    num_workers: int,
    desc: str | None = None,
    chunksize: int = 1,
    progress: bool | None = None,
) -> list[R]:
    """``[fn(item) for item in items]`` over a process pool, in input order.

    Args:
        fn: picklable callable (module-level function or ``functools.partial`` of one).
        items: the work items (ids, paths, chunks of ids).
        num_workers: processes; <= 1 runs serially in this process.
        desc: progress-bar label; also names the stage in error messages.
        chunksize: items sent to a worker at a time.
        progress: show a tqdm bar (default: only when stderr is a terminal).

    Raises:
        WSSSError: an item raised a user-fixable error (message unchanged).
        WorkerError: an item raised anything else; the message names the item and carries the worker traceback.
    """
    items = list(items)
    disable = None if progress is None else not progress
    bar = tqdm(total=len(items), desc=desc, disable=disable, leave=False)
    results: list[Any] = []
    try:
        if num_workers <= 1 or len(items) <= 1:
            outcomes: Iterable[tuple[bool, Any]] = (_call(fn, item) for item in items)
            results = _collect(outcomes, bar, desc)
        else:
            results = _map_in_pool(fn, items, num_workers, chunksize, bar, desc)
    finally:
        bar.close()
    return results


def _map_in_pool(
    fn: Callable[[Any], Any], items: list[Any], num_workers: int, chunksize: int, bar: tqdm, desc: str | None
) -> list[Any]:
    # ProcessPoolExecutor rather than multiprocessing.Pool: a worker killed by the OS (out of memory, a crash in a
    # native library) raises BrokenProcessPool here instead of leaving the parent waiting forever.
    context = multiprocessing.get_context(_start_method())
    processes = min(num_workers, len(items))
    with ProcessPoolExecutor(processes, mp_context=context, initializer=_init_worker, initargs=(fn,)) as pool:
        try:
            return _collect(pool.map(_call_in_worker, items, chunksize=max(1, chunksize)), bar, desc)
        except BrokenProcessPool as e:
            stage = f"{desc}: " if desc else ""
            raise WorkerError(f"{stage}a worker process died (killed by the system, e.g. out of memory?): {e}") from e
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)  # no more items start once one has failed
            raise


def _collect(outcomes: Iterable[tuple[bool, Any]], bar: tqdm, desc: str | None) -> list[Any]:
    results = []
    for ok, value in outcomes:
        if not ok:
            if isinstance(value, WorkerError) and desc:
                raise WorkerError(f"{desc}: {value}")
            raise value
        results.append(value)
        bar.update(1)
    return results


def chunked(items: Sequence[T], num_chunks: int) -> list[list[T]]:
    """Split ``items`` into at most ``num_chunks`` contiguous, near-equal, non-empty lists (order kept)."""
    num_chunks = max(1, min(num_chunks, len(items)))
    size, extra = divmod(len(items), num_chunks)
    chunks, start = [], 0
    for i in range(num_chunks):
        end = start + size + (1 if i < extra else 0)
        chunks.append(list(items[start:end]))
        start = end
    return [c for c in chunks if c]
