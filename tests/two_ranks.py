"""One launch of 2 gloo ranks on CPU for the distributed test files (tests/test_sharding.py,
tests/test_deepspeed.py): every scenario of a worker module runs in the same two processes, and
each rank writes {scenario: "ok" | traceback} to rank<r>.json under ``out``."""
from __future__ import annotations

import json
import os
import socket
import time

import pytest


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(worker, out, timeout_s: float, what: str) -> dict:
    """Runs ``worker.main(rank, 2, port, out, scenarios)`` in 2 spawned ranks (OMP_NUM_THREADS=1,
    inherited); kills them and fails the test after ``timeout_s``; returns {rank: results}."""
    import torch.multiprocessing as mp
    saved = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        ctx = mp.start_processes(worker.main, args=(2, free_port(), str(out), list(worker.SCENARIOS)),
                                 nprocs=2, join=False, start_method="spawn")
        deadline = time.monotonic() + timeout_s
        while not ctx.join(timeout=5):
            if time.monotonic() > deadline:
                for p in ctx.processes:
                    if p.is_alive():
                        p.kill()
                pytest.fail(f"2-rank {what} scenarios did not finish within {timeout_s} s")
    finally:
        if saved is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = saved
    return {r: json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)}
