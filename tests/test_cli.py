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
    # progress from the start, the plan (with what its words mean) before training, a loss plot after it
    for line in ("· starting 4 ranks", "✓ 4 ranks started", "✓ process group joined", "✓ model captured",
                 "reduce_grad    forward: nothing", "dp buckets", "✓ trained 3 steps", "loss per step"):
        assert line in out, line
    assert out.index("reading the plan") < out.index("✓ trained 3 steps") < out.index("loss per step")


def test_loss_plot():
    from autoshard.demo import loss_plot

    text = loss_plot([5.0 - 0.1 * i for i in range(100)], width=50, height=6)
    lines = text.splitlines()
    assert len(lines) == 8 and "4.950" in lines[0] and "-4.850" in lines[5]  # means of pairs of steps
    assert lines[0].split("│")[1].startswith("•") and lines[5].split("│")[1].endswith("•")
    assert sum(line.count("•") for line in lines) == 50
    assert loss_plot([]) == "" and "•" in loss_plot([1.0])


def test_check_exit_code_of_an_explained_fallback(capsys):
    """A model's own loss over vocab-sharded logits gathers them, as a loss_fn at the output would: check lists
    that fallback as explained and exits 0 (an unexplained one exits 1: tests/test_check.py)."""
    argv = ["check", "examples/hf_quickstart.py:make_model", "--mesh", "tp=2", "--input",
            "input_ids=int64[2,32],labels=int64[2,32]", "--loss", "model"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "Fallbacks (1)" in out and "1 explained fallback(s)" in out and "nothing unexplained" in out


def _records(device: str, peak) -> list[dict]:
    base = {"date": "2026-12-07", "device": device, "torch": "2.13.0", "commit": "abc1234", "model": "tiny",
            "gpus": 2, "batch": 2, "seq": 64, "step_s": 0.01, "mfu": 0.0001, "peak_gib": peak}
    return [{**base, "system": "ddp", "plan": "dp=2", "tok_s_gpu": 1000.0, "loss_step1": 5.0},
            {**base, "system": "autoshard", "plan": "dp=2", "tok_s_gpu": 2160.0, "loss_step1": 5.0}]


def test_bench_on_cpu_ranks_ranks_nothing(monkeypatch, capsys):
    from autoshard import bench

    monkeypatch.setattr(bench, "run", lambda cfg, nproc: _records("cpu (2 cores, Gloo)", None))
    assert main(["bench", "--model", "tiny", "--device", "cpu", "--systems", "ddp,autoshard"]) == 0
    out = capsys.readouterr().out
    assert "not performance figures" in out and "tok/s/rank" in out
    assert "tok/s/GPU" not in out and "best peer" not in out and "2.16" not in out


def test_bench_on_gpus_keeps_the_ratio(monkeypatch, capsys):
    from autoshard import bench

    monkeypatch.setattr(bench, "run", lambda cfg, nproc: _records("NVIDIA H100", 10.0))
    assert main(["bench", "--model", "tiny", "--device", "cpu", "--systems", "ddp,autoshard"]) == 0
    out = capsys.readouterr().out
    assert "tok/s/GPU" in out and "= 2.16x the best peer (ddp)" in out and "not performance figures" not in out


@pytest.mark.parametrize("device,peak,panels", [("cpu (2 cores, Gloo)", None, 1), ("NVIDIA H100", 10.0, 2)])
def test_bench_plot_has_a_memory_panel_only_with_memory_data(tmp_path, device, peak, panels):
    import matplotlib.image

    from autoshard import bench

    png = bench.plot(_records(device, peak), str(tmp_path / "p.png"))
    width = matplotlib.image.imread(png).shape[1]
    assert width == 7 * panels * 110  # 7 inches per panel at 110 dpi


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
