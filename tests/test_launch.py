"""autoshard.launch under failure: what listens, who died, signals, hangs (docs/reliability.md)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
import torch.distributed as dist

import autoshard

pytestmark = pytest.mark.slow


# =============================================================================== workers
def _listening_worker() -> list[tuple[str, int]]:
    """Each rank: after a collective, the addresses that this rank and the launcher listen on."""
    autoshard.Mesh(dp=2)
    t = torch.ones(1)
    dist.all_reduce(t)
    inodes: set[str] = set()
    for pid in (os.getpid(), os.getppid()):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    listening = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            next(f)
            for line in f:
                cols = line.split()
                local, state, inode = cols[1], cols[3], cols[9]
                if state == "0A" and inode in inodes:  # 0A: LISTEN
                    addr, port = local.split(":")
                    listening.append((addr, int(port, 16)))
    return listening


def _sigkill_worker() -> None:
    autoshard.Mesh(dp=2)
    if dist.get_rank() == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    t = torch.ones(1)
    dist.all_reduce(t)  # rank 0: "Connection reset by peer" (or closed) once rank 1 is gone
    dist.all_reduce(t)


def _hang_worker() -> None:
    autoshard.Mesh(dp=2)
    if dist.get_rank() == 1:
        time.sleep(60)  # never joins the collective
    dist.all_reduce(torch.ones(1))


# =============================================================================== tests
def test_launch_listens_on_loopback_only():
    per_rank = autoshard.launch(_listening_worker, 2, device="cpu", timeout=120)
    loopback = {"0100007F", "00000000000000000000000001000000", "0000000000000000FFFF00000100007F"}
    found = [a for rank in per_rank for a in rank]
    assert found, "expected the rendezvous store and Gloo to be listening"
    assert all(addr in loopback for addr, _ in found), found


def test_launch_names_the_rank_killed_by_a_signal():
    t0 = time.monotonic()
    with pytest.raises(RuntimeError) as ei:
        autoshard.launch(_sigkill_worker, 2, device="cpu", timeout=120, collective_timeout=30)
    msg = str(ei.value)
    assert msg.startswith("autoshard.launch: rank 1 was killed by SIGKILL"), msg
    assert time.monotonic() - t0 < 60


def test_collective_timeout_turns_a_hang_into_an_error():
    t0 = time.monotonic()
    with pytest.raises(RuntimeError) as ei:
        autoshard.launch(_hang_worker, 2, device="cpu", timeout=120, collective_timeout=3)
    assert "rank 0 failed" in str(ei.value)
    assert "timed out" in str(ei.value).lower() or "timeout" in str(ei.value).lower()
    assert time.monotonic() - t0 < 45  # not the 60 s sleep, nor torch's 30 minutes


def test_collective_timeout_must_be_positive():
    with pytest.raises(ValueError, match="collective_timeout"):
        autoshard.launch(_hang_worker, 2, device="cpu", collective_timeout=0)


_LAUNCHER = textwrap.dedent("""
    import sys
    sys.path.insert(0, {here!r})
    import autoshard

    if __name__ == "__main__":
        import test_launch
        autoshard.launch(test_launch._sleeper, 2, device="cpu", timeout=300)
""")


def _sleeper() -> None:
    with open(os.path.join(os.environ["AUTOSHARD_TEST_PIDS"], str(os.getpid())), "w"):
        pass
    time.sleep(120)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_signal_to_the_launcher_ends_the_ranks(sig, tmp_path):
    """SIGTERM is forwarded and the ranks reaped; after SIGKILL the kernel ends them (PDEATHSIG)."""
    script = tmp_path / "launcher.py"
    script.write_text(_LAUNCHER.format(here=os.path.dirname(os.path.abspath(__file__))))
    pids_dir = tmp_path / "pids"
    pids_dir.mkdir()
    env = dict(os.environ, AUTOSHARD_TEST_PIDS=str(pids_dir))
    proc = subprocess.Popen([sys.executable, str(script)], env=env)
    try:
        end = time.monotonic() + 90
        while len(os.listdir(pids_dir)) < 2 and time.monotonic() < end:
            time.sleep(0.2)
        pids = [int(p) for p in os.listdir(pids_dir)]
        assert len(pids) == 2 and all(_alive(p) for p in pids)
        proc.send_signal(sig)
        rc = proc.wait(timeout=20)
        assert rc == -sig  # the launcher ends the way the signal says
        end = time.monotonic() + 10
        while any(_alive(p) for p in pids) and time.monotonic() < end:
            time.sleep(0.1)
        assert not [p for p in pids if _alive(p)], "ranks outlived the launcher"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for p in os.listdir(pids_dir):
            try:
                os.kill(int(p), signal.SIGKILL)
            except ProcessLookupError:
                pass
