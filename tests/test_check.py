"""``autoshard check`` and the command-line specs it shares with ``viz``.

``check`` plans a model on a virtual mesh and reports op coverage, parameter placements and
fallbacks. Exit codes: 0 no fallbacks, 1 fallbacks (listed with their source line), 2 usage or plan
errors (one ``autoshard: error:`` line on stderr). The specs (model, inputs, mesh) are parsed by
``autoshard.modelspec``, whose errors say what was expected.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

from autoshard import modelspec
from autoshard.cli import main

GPT = "autoshard.examples.gpt:make_model"

_CUMSUM = '''
import torch
import torch.nn as nn


class CumHead(nn.Module):
    """A vocab-parallel embedding and a column-parallel head whose output features are cumsum'd."""

    def __init__(self, vocab: int = 64, d: int = 16) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.head = nn.Linear(d, vocab)

    def forward(self, x):
        return torch.cumsum(self.head(self.emb(x)), dim=-1)
'''


@pytest.fixture()
def cumsum_model(tmp_path):
    path = tmp_path / "cumhead.py"
    path.write_text(textwrap.dedent(_CUMSUM))
    line = next(i for i, text in enumerate(path.read_text().splitlines(), 1) if "torch.cumsum" in text)
    return path, line


def test_gpt_at_tp2_is_clean_and_lists_its_parameters(capsys):
    assert main(["check", GPT, "--mesh", "tp=2", "--input", "int64[4,64]"]) == 0
    out = capsys.readouterr().out
    assert "Ops in the rewritten graph" in out and "aten.linear" in out and "sharded" in out
    for name, role in (("blocks.0.attn.qkv.weight", "column"), ("blocks.0.mlp.out.weight", "row"),
                       ("head.weight", "vocab"), ("blocks.1.ln1.weight", "replicated")):
        row = next((ln for ln in out.splitlines() if f" {name} " in ln), None)
        assert row is not None and role in row, f"{name} should be listed as {role}"
    assert "collectives inserted:" in out and "all_reduce" in out
    assert "fallbacks: none" in out


def test_op_coverage_counts_every_block():
    from autoshard import viz
    from autoshard.examples.gpt import lm_loss, make_model

    low = viz.lower(make_model(n_layers=3), {"tp": 2}, (torch.zeros(2, 64, dtype=torch.long),), loss_fn=lm_loss)
    cov = viz.op_coverage(low)
    assert cov["aten.scaled_dot_product_attention"] == {"sharded": 3, "replicated": 0, "fallback": 0}
    assert cov["aten.linear"]["sharded"] == 3 * 4 + 1  # four per block, and the LM head
    assert cov["aten.layer_norm"] == {"sharded": 0, "replicated": 3 * 2 + 1, "fallback": 0}
    assert not any(op.startswith("autoshard.all_") for op in cov), "collectives are not the model's ops"


def test_a_fallback_exits_1_with_its_source_line(cumsum_model):
    path, line = cumsum_model
    proc = subprocess.run([sys.executable, "-m", "autoshard", "check", f"{path}:CumHead", "--mesh", "tp=2",
                           "--input", "int64[2,8]"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr
    assert "Fallbacks (1)" in proc.stdout
    row = next(ln for ln in proc.stdout.splitlines() if "cumsum" in ln and "sharded dim" in ln)
    assert f"cumhead.py:{line}" in row
    cov = next(ln for ln in proc.stdout.splitlines() if "aten.cumsum" in ln)
    assert cov.rstrip(" │").endswith("1"), "counted as a fallback in the op table"


def test_pipeline_mesh_is_checked_over_every_stage(capsys):
    assert main(["check", f"{GPT}(n_layers=4)", "--mesh", "pp=2,tp=2", "--input", "int64[8,64]"]) == 0
    out = capsys.readouterr().out
    sdpa = next(ln for ln in out.splitlines() if "scaled_dot_product_attention" in ln)
    assert " 4 " in sdpa, "all four blocks are counted, not just rank 0's stage"


@pytest.mark.parametrize("argv, message", [
    (["--mesh", "dp=2,xx=2", "--input", "int64[8,64]"], "'xx=2' is not DIM=N"),
    (["--mesh", "tp=two", "--input", "int64[8,64]"], "is not an integer"),
    (["--mesh", "tp=2", "--input", "int64(8,64)"], "is not DTYPE[d0,d1,...]"),
    (["--mesh", "tp=2", "--input", "complex[8,64]"], "'complex' is not a torch dtype"),
    (["--mesh", "tp=2", "--input", "int64[8,x]"], "the shape must be integers"),
    (["--mesh", "tp=3", "--input", "int64[8,64]"], "cannot be split over tp=3"),
    (["--mesh", "tp=2", "--input", "float32[8,64]"], "torch.export could not capture"),
])
def test_usage_and_plan_errors_exit_2(argv, message, capsys):
    assert main(["check", GPT, *argv]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("autoshard: error: ") and message in captured.err
    assert captured.out == ""


@pytest.mark.parametrize("model, message", [
    ("no_such_package.models:Net", "cannot import 'no_such_package.models'"),
    ("autoshard.examples.gpt:NoSuchThing", "has no attribute 'NoSuchThing'"),
    ("/no/such/file.py:Net", "no such file"),
    ("justaname", "is not a model spec"),
    ("autoshard.examples.gpt:GPTConfig", "not a torch.nn.Module"),
    ("autoshard.examples.gpt:make_model(n_layers=x)", "must be Python literals"),
])
def test_bad_model_exits_2(model, message, capsys):
    assert main(["check", model, "--input", "int64[2,64]"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("autoshard: error: ") and message in err


def test_missing_input_is_a_usage_error():
    proc = subprocess.run([sys.executable, "-m", "autoshard", "check", GPT], capture_output=True, text=True)
    assert proc.returncode == 2 and "--input" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "autoshard", "check", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "exit codes: 0 no fallbacks, 1" in proc.stdout


# ====================================================================================== the specs
def test_input_specs():
    specs = modelspec.parse_input_specs("int64[2,16], float32[2,16],mask=bool[2,16]")
    assert specs == [(None, torch.int64, (2, 16)), (None, torch.float32, (2, 16)), ("mask", torch.bool, (2, 16))]
    assert modelspec.split_top_level("a[1,2],b[3]") == ["a[1,2]", "b[3]"]
    for bad, message in (("", "empty"), ("int64[2,16", "unbalanced"), ("x=int64[2],int64[2]", "before named"),
                         ("a=int64[2],a=int64[2]", "given twice"), ("int64[0,2]", ">= 1"),
                         ("nope[2]", "not a torch dtype")):
        with pytest.raises(ValueError, match=message):
            modelspec.parse_input_specs(bad)


def test_example_inputs_index_the_vocabulary():
    from autoshard.examples.gpt import make_model

    model = make_model(vocab_size=50)
    args, kwargs = modelspec.make_inputs("int64[64,64],float32[2,3]", model)
    assert kwargs == {} and args[0].dtype == torch.int64 and args[1].dtype == torch.float32
    assert int(args[0].max()) < 50 and int(args[0].max()) > 1, "ids span [0, cfg.vocab_size)"
    args, kwargs = modelspec.make_inputs("ids=int32[4,4]", torch.nn.Linear(2, 2))
    assert args == () and kwargs["ids"].dtype == torch.int32 and set(kwargs["ids"].unique().tolist()) <= {0, 1}
    again = modelspec.make_inputs("ids=int32[4,4]", torch.nn.Linear(2, 2))[1]["ids"]
    assert torch.equal(again, kwargs["ids"]), "seeded"


def test_mesh_specs():
    assert modelspec.parse_mesh("dp=2, tp=2,pp=2") == {"dp": 2, "tp": 2, "pp": 2}
    for bad, message in (("", "empty"), ("tp", "not DIM=N"), ("tp=0", ">= 1"), ("tp=2,tp=2", "given twice")):
        with pytest.raises(ValueError, match=message):
            modelspec.parse_mesh(bad)


def test_model_specs(tmp_path):
    gpt = modelspec.load_model("autoshard.examples.gpt:make_model(n_layers=3, d_model=32)")
    assert len(gpt.blocks) == 3 and gpt.cfg.d_model == 32
    path = tmp_path / "mymodel.py"
    path.write_text(textwrap.dedent('''
        from dataclasses import dataclass
        import torch.nn as nn

        @dataclass
        class Cfg:
            width: int = 4

        class Net(nn.Module):
            def __init__(self, width: int = 4):
                super().__init__()
                self.lin = nn.Linear(width, width)

        def build():
            return Net(Cfg().width)

        instance = Net(2)
        not_a_module = 3
    '''))
    assert isinstance(modelspec.load_model(f"{path}:Net"), torch.nn.Module)
    assert modelspec.load_model(f"{path}:Net(8)").lin.in_features == 8
    assert modelspec.load_model(f"{path}:build").lin.in_features == 4
    assert modelspec.load_model(f"{path}:instance").lin.in_features == 2
    with pytest.raises(ValueError, match="not a nn.Module class"):
        modelspec.load_model(f"{path}:not_a_module")
    with pytest.raises(ValueError, match="cannot be called"):
        modelspec.load_model(f"{path}:instance(1)")
