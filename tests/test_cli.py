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


# ====================================================================================== bad plan files
_MODEL = "autoshard.examples.gpt:make_model(vocab_size=512, seq_len=64, d_model=64, n_heads=4, d_ff=128, n_layers=2)"
# (file name, how the good plan's JSON is spoiled, what the one-line message must say)
BAD_PLAN_FILES = [
    ("no-pp.json", lambda d: d["mesh"].pop("pp"), "mesh.pp: missing"),
    ("zero-one.json", lambda d: d.update(zero="one"), "zero: expected an integer, got a string 'one'"),
    ("zero-9.json", lambda d: d.update(zero=9), "zero: expected an integer between 0 and 3, got 9"),
    ("mesh-text.json", lambda d: d.update(mesh="dp=8"), "mesh: expected a JSON object"),
    ("tp-0.json", lambda d: d["mesh"].update(tp=0), "mesh.tp: expected an integer >= 1, got 0"),
    ("schedule.json", lambda d: d.update(schedule="zigzag"), "schedule: expected one of"),
    ("no-binding.json", lambda d: d.pop("binding"), "binding: missing"),
]


def test_plan_diff_bad_files_exit_2_naming_the_key(tmp_path, capsys):
    import json

    good = tmp_path / "good.json"
    assert main(["plan", _MODEL, "--gpus", "8", "--input", "int64[16,64]", "--json", "-o", str(good)]) == 0
    d = json.loads(good.read_text())
    files = []
    for name, change, message in BAD_PLAN_FILES:
        bad = json.loads(json.dumps(d))
        change(bad)
        (tmp_path / name).write_text(json.dumps(bad))
        files.append((name, message))
    (tmp_path / "cut.json").write_text(good.read_text()[:80])
    (tmp_path / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    (tmp_path / "binary.json").write_bytes(b"\xff\xfe\x00{")
    files += [("cut.json", "not valid JSON"), ("deep.json", "nested too deeply"), ("binary.json", "binary.json:"),
              ("absent.json", "absent.json")]
    capsys.readouterr()
    for name, message in files:
        for a, b in ((good, tmp_path / name), (tmp_path / name, good)):
            assert main(["plan", "--diff", str(a), str(b)]) == 2, name
            out = capsys.readouterr()
            err = out.err.strip()
            assert err.startswith(f"autoshard: error: --diff {tmp_path / name}") and "\n" not in err, err
            assert message in err, err
            assert out.out == ""
    # the real exit code of the command, and no traceback
    proc = subprocess.run([sys.executable, "-m", "autoshard", "plan", "--diff", str(good), str(tmp_path / "no-pp.json")],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [f"autoshard: error: --diff {tmp_path / 'no-pp.json'}: invalid autoshard "
                                                "plan: mesh.pp: missing"]
