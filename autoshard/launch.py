"""``launch(fn, nprocs, *args)``: run ``fn`` on ``nprocs`` local ranks and collect the results.

For the demo, tests and notebooks; ``torchrun`` remains the launcher for real jobs. Each rank gets
``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` (loopback) and ``MASTER_PORT`` set, so
``autoshard.Mesh(...)`` inside ``fn`` initialises the process group (NCCL when each rank has a
GPU, Gloo otherwise). A rank that raises makes ``launch`` raise with that rank's traceback; a rank
that dies or a run that exceeds ``timeout`` kills the others instead of hanging.
"""

from __future__ import annotations

import os
import pickle
import queue
import socket
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, nprocs: int, port: int, device: str, fn: Callable, args: tuple, results) -> None:
    os.environ.update({
        "RANK": str(rank), "WORLD_SIZE": str(nprocs), "LOCAL_RANK": str(rank),
        "LOCAL_WORLD_SIZE": str(nprocs), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
    })
    if device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    try:
        out = fn(*args)
        results.put((rank, True, pickle.dumps(out)))
    except BaseException:  # noqa: BLE001 - reported to the parent
        results.put((rank, False, traceback.format_exc()))
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:  # noqa: BLE001
                pass


def launch(fn: Callable[..., Any], nprocs: int, *args: Any, device: str | None = None,
           timeout: float | None = 1800.0) -> list[Any]:
    """Run ``fn(*args)`` on ``nprocs`` local ranks; return their results in rank order.

    ``device``: ``"cpu"`` (Gloo) or ``"cuda"`` (NCCL, one GPU per rank); default: CUDA when enough
    GPUs are visible. ``fn`` and its arguments must be picklable (a module-level function).
    """
    import torch

    if nprocs < 1:
        raise ValueError("nprocs must be at least 1")
    if device is None:
        device = "cuda" if torch.cuda.is_available() and torch.cuda.device_count() >= nprocs else "cpu"
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, nprocs, port, device, fn, args, results), daemon=False)
             for r in range(nprocs)]
    for p in procs:
        p.start()
    out: dict[int, Any] = {}
    errors: list[str] = []
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        while len(out) + len(errors) < nprocs:
            try:
                rank, ok, value = results.get(timeout=1.0)
            except queue.Empty:
                dead = [p for p in procs if p.exitcode not in (None, 0)]
                if dead and len(out) + len(errors) < nprocs:
                    # give a crashing rank's report a moment to arrive
                    try:
                        rank, ok, value = results.get(timeout=5.0)
                    except queue.Empty:
                        errors.append(f"rank {procs.index(dead[0])} died with exit code {dead[0].exitcode}")
                        break
                elif deadline is not None and time.monotonic() > deadline:
                    errors.append(f"timed out after {timeout:.0f}s")
                    break
                else:
                    continue
            if ok:
                out[rank] = pickle.loads(value)
            else:
                errors.append(f"rank {rank} failed:\n{value}")
                break
    finally:
        if errors:
            for p in procs:
                if p.is_alive():
                    p.terminate()
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    if errors:
        raise RuntimeError("autoshard.launch: " + errors[0])
    return [out[r] for r in range(nprocs)]
