"""Run a function in N real gloo processes (TP/PP tests, the CPU demo at TP>1).

Each worker gets RANK/WORLD_SIZE/MASTER_* in its environment exactly as torchrun would
set them, so the code under test uses the same `init_parallel` path as production.
Results come back through pickles in a temp dir; a worker's exception is re-raised in
the parent with the worker's traceback.
"""

from __future__ import annotations

import os
import pickle
import tempfile
import traceback
from pathlib import Path

import torch.multiprocessing as mp

from gazal_nemo.parallel import free_port, shutdown_parallel

__all__ = ["free_port", "run_distributed"]


def _worker(rank, world_size, port, out_dir, fn, args, kwargs):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    path = Path(out_dir) / f"rank{rank}.pkl"
    try:
        result = ("ok", fn(*args, **kwargs))
    except BaseException:  # noqa: BLE001 - reported to the parent verbatim
        result = ("error", traceback.format_exc())
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        pickle.dump(result, f)
    os.replace(tmp, path)
    try:
        shutdown_parallel()
    except Exception:
        pass


def run_distributed(fn, world_size: int, *args, **kwargs) -> list:
    """Run fn(*args, **kwargs) on `world_size` processes; returns each rank's result."""
    with tempfile.TemporaryDirectory() as out_dir:
        mp.start_processes(_worker, args=(world_size, free_port(), out_dir, fn, args, kwargs),
                           nprocs=world_size, join=True, start_method="spawn")
        results, errors = [], []
        for rank in range(world_size):
            path = Path(out_dir) / f"rank{rank}.pkl"
            if not path.exists():
                errors.append(f"rank {rank} wrote no result")
                continue
            status, value = pickle.loads(path.read_bytes())
            if status == "error":
                errors.append(f"rank {rank} failed:\n{value}")
            results.append(value)
        if errors:
            # A crash on one rank shows up as "connection closed" on the others: list every rank.
            raise RuntimeError("\n".join(errors))
        return results
