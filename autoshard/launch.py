"""``launch(fn, nprocs, *args)``: run ``fn`` on ``nprocs`` local ranks and collect the results.

For the demo, tests and notebooks; ``torchrun`` remains the launcher for real jobs. Each rank gets
``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` (loopback) and ``MASTER_PORT`` set, so
``autoshard.Mesh(...)`` inside ``fn`` initialises the process group (NCCL when each rank has a
GPU, Gloo otherwise). A rank that raises makes ``launch`` raise with that rank's traceback; a rank
that dies or a run that exceeds ``timeout`` kills the others instead of hanging.

Reliability (docs/reliability.md):

* Nothing listens beyond loopback. The launching process hosts the rendezvous store on a socket
  bound to 127.0.0.1 (the ranks connect to it as clients, ``TORCHELASTIC_USE_AGENT_STORE``), and
  Gloo/NCCL are pointed at the loopback interface (``GLOO_SOCKET_IFNAME``/``NCCL_SOCKET_IFNAME``
  default to ``lo`` unless already set).
* A rank that dies without reporting (a signal, ``os._exit``) is named with its exit signal or code,
  ahead of the errors the survivors then raise ("Connection reset by peer").
* SIGTERM (or SIGINT) to the launching process is passed on to the ranks, which are reaped before the
  signal takes its ordinary effect on the launcher; each rank also asks the kernel for SIGTERM if the
  launcher dies without a chance to clean up (``PR_SET_PDEATHSIG``).
* Collective timeout: a collective that waits longer than ``collective_timeout`` seconds fails
  instead of hanging. Default 300 s, or ``AUTOSHARD_COLLECTIVE_TIMEOUT`` (seconds) when set; the
  ranks inherit it through that variable, which ``Mesh`` reads when it creates the process group
  (so it applies under ``torchrun`` too). torch's own default is 30 minutes (10 for NCCL).
"""

from __future__ import annotations

import os
import pickle
import queue
import signal
import socket
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch.multiprocessing as mp

DEFAULT_COLLECTIVE_TIMEOUT = 300.0  # seconds; AUTOSHARD_COLLECTIVE_TIMEOUT overrides it


def _loopback_store(nprocs: int):
    """The rendezvous store, hosted here on a socket bound to 127.0.0.1 only; returns (store, port).

    TCPStore's own server listens on every interface, unauthenticated: it is given a socket that
    is already bound and listening instead (``master_listen_fd``).
    """
    import torch.distributed as dist

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    port = sock.getsockname()[1]
    store = dist.TCPStore("127.0.0.1", port, nprocs, True, wait_for_workers=False, master_listen_fd=sock.detach())
    return store, port


def _die_with_parent() -> None:
    """Ask Linux to send this process SIGTERM when the launcher dies (even by SIGKILL)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the launcher's signal handler still reaps the ranks
        pass


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"was killed by {name} (exit code {code})"
    return f"exited with code {code} without reporting a result"


def _worker(rank: int, nprocs: int, port: int, device: str, fn: Callable, args: tuple, results,
            collective_timeout: float) -> None:
    _die_with_parent()
    os.environ.update({
        "RANK": str(rank), "WORLD_SIZE": str(nprocs), "LOCAL_RANK": str(rank),
        "LOCAL_WORLD_SIZE": str(nprocs), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
        "TORCHELASTIC_USE_AGENT_STORE": "True",  # the launcher hosts the store (on loopback only)
        "AUTOSHARD_COLLECTIVE_TIMEOUT": str(collective_timeout),
    })
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    os.environ.setdefault("NCCL_SOCKET_IFNAME", "lo")
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


_PEER_GONE = ("Connection reset", "Connection closed", "closed by peer", "Broken pipe", "remote process")


class _Signalled(BaseException):
    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _dead_without_report(procs, reported: set[int], wait: float) -> list[tuple[int, int]]:
    """Ranks that exited non-zero (or by a signal) and sent no report, waiting up to ``wait`` s."""
    end = time.monotonic() + wait
    while True:
        dead = [(r, p.exitcode) for r, p in enumerate(procs)
                if r not in reported and p.exitcode not in (None, 0)]
        if dead or time.monotonic() > end:
            return dead
        time.sleep(0.05)


def launch(fn: Callable[..., Any], nprocs: int, *args: Any, device: str | None = None,
           timeout: float | None = 1800.0, collective_timeout: float | None = None) -> list[Any]:
    """Run ``fn(*args)`` on ``nprocs`` local ranks; return their results in rank order.

    ``device``: ``"cpu"`` (Gloo) or ``"cuda"`` (NCCL, one GPU per rank); default: CUDA when enough
    GPUs are visible. ``fn`` and its arguments must be picklable (a module-level function).
    ``timeout``: seconds for the whole run. ``collective_timeout``: seconds one collective may wait
    for its peers before it fails (default ``AUTOSHARD_COLLECTIVE_TIMEOUT`` or 300).
    """
    import torch

    if nprocs < 1:
        raise ValueError("nprocs must be at least 1")
    if collective_timeout is None:
        collective_timeout = float(os.environ.get("AUTOSHARD_COLLECTIVE_TIMEOUT", DEFAULT_COLLECTIVE_TIMEOUT))
    if not collective_timeout > 0:
        raise ValueError(f"collective_timeout={collective_timeout!r} must be a positive number of seconds")
    if device is None:
        device = "cuda" if torch.cuda.is_available() and torch.cuda.device_count() >= nprocs else "cpu"
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    store, port = _loopback_store(nprocs)
    procs = [ctx.Process(target=_worker, args=(r, nprocs, port, device, fn, args, results, collective_timeout),
                         daemon=False) for r in range(nprocs)]

    def on_signal(signum, frame):
        raise _Signalled(signum)

    previous = {}
    try:
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, on_signal)
    except ValueError:  # not the main thread: no handlers (the ranks still die with the launcher)
        pass
    for p in procs:
        p.start()
    out: dict[int, Any] = {}
    errors: list[str] = []
    signalled: _Signalled | None = None
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
                        errors.append(f"rank {procs.index(dead[0])} {_describe_exit(dead[0].exitcode)}")
                        break
                elif deadline is not None and time.monotonic() > deadline:
                    errors.append(f"timed out after {timeout:.0f}s")
                    break
                else:
                    continue
            if ok:
                out[rank] = pickle.loads(value)
            else:
                # a rank that died (SIGKILL, out of memory) makes its peers fail with "Connection reset
                # by peer": name the dead rank first, it is the cause
                peer_gone = any(m in value for m in _PEER_GONE)  # then give the dead rank's exit code time to show
                dead = _dead_without_report(procs, set(out) | {rank}, wait=3.0 if peer_gone else 0.0)
                errors += [f"rank {r} {_describe_exit(code)}" for r, code in dead]
                errors.append(f"rank {rank} failed:\n{value}")
                break
    except _Signalled as e:
        signalled = e
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if errors or signalled is not None or len(out) < nprocs:
            for p in procs:
                if p.is_alive():
                    p.terminate()
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        del store
    if signalled is not None:  # the ranks are gone: let the signal do what it would have done
        os.kill(os.getpid(), signalled.signum)
        raise KeyboardInterrupt if signalled.signum == signal.SIGINT else SystemExit(128 + signalled.signum)
    if errors:
        msg = errors[0] if len(errors) == 1 else errors[0] + "\n(then) " + "\n(then) ".join(errors[1:])
        raise RuntimeError("autoshard.launch: " + msg)
    return [out[r] for r in range(nprocs)]
