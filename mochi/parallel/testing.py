"""Run a function on N real processes joined by a gloo group (tests and benchmarks, CPU only).

`run_ranks(fn, world_size, *args)` spawns one process per rank (one thread each), initialises a
gloo default group over a FileStore with a finite collective timeout, calls `fn(*args)` on every
rank and returns the per-rank results. A failure on any rank raises with that rank's traceback; a
hung rank is killed at the deadline, so nothing blocks a test run for long.

`fn` must be a module-level function. It is found in the child by module name when it lives in
this package and by file path otherwise (test files are not importable as modules).
"""

import importlib
import importlib.util
import inspect
import os
import sys
import tempfile
import time
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _load_target(module_name: str, file_path: str, qualname: str):
    if module_name.startswith("mochi_xdit."):
        module = importlib.import_module(module_name)
    else:
        spec = importlib.util.spec_from_file_location(f"_rank_target_{abs(hash(file_path))}", file_path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    target = module
    for part in qualname.split("."):
        target = getattr(target, part)
    return target


def _child(rank, world_size, target, store_path, result_path, args, collective_timeout_s, threads):
    torch.set_num_threads(threads)
    if sys.platform.startswith("linux"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # keep gloo on loopback
    try:
        fn = _load_target(*target)
        store = dist.FileStore(store_path, world_size)
        dist.init_process_group(
            "gloo", store=store, rank=rank, world_size=world_size, timeout=timedelta(seconds=collective_timeout_s)
        )
        try:
            result = {"ok": fn(*args)}
        finally:
            dist.destroy_process_group()
    except BaseException:  # reported to the parent, which raises it
        result = {"error": traceback.format_exc()}
    torch.save(result, result_path)


def run_ranks(fn, world_size: int, *args, timeout_s: float = 300.0, collective_timeout_s: float = 60.0, threads: int = 1) -> list:
    """Call `fn(*args)` on `world_size` gloo ranks and return [result of rank 0, rank 1, ...].

    Args:
        fn: module-level function; it runs after `init_process_group`, so it may build
            ParallelContexts and call collectives. Its return value must be picklable.
        world_size: number of processes.
        timeout_s: wall-clock deadline for the whole launch; stragglers are killed.
        collective_timeout_s: gloo timeout of every collective (a bug fails instead of hanging).
        threads: torch threads per rank.

    Raises:
        RuntimeError naming the failed rank with its traceback, or the ranks that missed the deadline.
    """
    target = (fn.__module__, inspect.getfile(sys.modules[fn.__module__]), fn.__qualname__)
    spawn = mp.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="mochi_ranks_") as tmp:
        store_path = os.path.join(tmp, "store")
        paths = [os.path.join(tmp, f"rank{r}.pt") for r in range(world_size)]
        processes = []
        for rank in range(world_size):
            process = spawn.Process(
                target=_child,
                args=(rank, world_size, target, store_path, paths[rank], args, collective_timeout_s, threads),
                daemon=True,
            )
            process.start()
            processes.append(process)
        deadline = time.monotonic() + timeout_s
        try:
            for process in processes:
                process.join(max(0.0, deadline - time.monotonic()))
        finally:  # also when the caller is interrupted (e.g. by pytest-timeout): leave no rank behind
            hung = [rank for rank, process in enumerate(processes) if process.is_alive()]
            for rank in hung:
                processes[rank].kill()
                processes[rank].join()
        results, errors = [], []
        for rank, path in enumerate(paths):
            if not os.path.exists(path):
                errors.append(f"rank {rank}: no result ({'killed at the deadline' if rank in hung else 'crashed'})")
                results.append(None)
                continue
            result = torch.load(path, weights_only=False)
            if "error" in result:
                errors.append(f"rank {rank} failed:\n{result['error']}")
                results.append(None)
            else:
                results.append(result["ok"])
        if errors:
            raise RuntimeError(f"{len(errors)} of {world_size} ranks failed:\n" + "\n".join(errors))
        return results
