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
