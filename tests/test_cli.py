"""The command line: help, exit codes, and a short demo run end to end."""

from __future__ import annotations

import subprocess
import sys

import pytest

from autoshard.cli import main


def test_help_lists_demo():
    proc = subprocess.run([sys.executable, "-m", "autoshard", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0
    assert "demo" in proc.stdout


_NO_TORCH = """
import sys
from autoshard.cli import main
for argv in (["--help"], {cmds}):
    try:
        main(argv)
    except SystemExit as e:
        assert e.code == 0, (argv, e.code)
loaded = sorted(m for m in sys.modules if m == "torch" or m.startswith("torch."))
assert not loaded, loaded
"""


def test_help_imports_no_torch():
    """``autoshard --help`` and every command's ``--help`` build the parser without importing torch."""
    cmds = ", ".join(f"[{c!r}, '--help']" for c in ("demo", "viz", "check", "plan", "calibrate", "bench"))
    proc = subprocess.run([sys.executable, "-c", _NO_TORCH.format(cmds=cmds)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "usage: autoshard bench" in proc.stdout


def test_import_autoshard_is_lazy():
    code = ("import sys, autoshard; assert 'torch' not in sys.modules; "
            "import autoshard.launch; from autoshard import launch; "
            "assert callable(autoshard.launch) and autoshard.launch is launch and launch.__module__ == 'autoshard.launch'; "
            "import autoshard.backend; assert callable(autoshard.backend); "
            "assert autoshard.Mesh.__name__ == 'Mesh' and autoshard.autoshard.__name__ == 'autoshard'; "
            "assert issubclass(autoshard.PlanError, autoshard.AutoshardError); "
            "assert set(autoshard.__all__) <= set(dir(autoshard))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_cli_schedule_names_match_the_runtime():
    from autoshard.cli import SCHEDULES
    from autoshard.runtime.schedules import SCHEDULES as RUNTIME

    assert SCHEDULES == RUNTIME


def test_no_command_is_a_usage_error(capsys):
    assert main([]) == 2
    assert "usage" in capsys.readouterr().err


def test_unknown_option_exits_non_zero():
    proc = subprocess.run([sys.executable, "-m", "autoshard", "demo", "--bogus"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "unrecognized arguments" in proc.stderr


@pytest.mark.slow
def test_demo_runs_and_checks_parity(capsys):
    assert main(["demo", "--steps", "3", "--batch", "4"]) == 0
    out = capsys.readouterr().out
    assert "PARITY OK" in out
    assert "dp=2, tp=2" in out
