"""autoshard.plan(): the Plan autoshard() follows, made without processes; on the meta device, without memory."""

from __future__ import annotations

import resource

import pytest
import torch
import transformers

import autoshard


def _llama(hidden=64, layers=2, vocab=128):
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                                   num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                   use_cache=False)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg), cfg


@pytest.mark.parametrize("options", [{}, {"zero": 2}, {"zero": 3, "precision": "bf16"},
                                     {"activation_checkpointing": "all"}, {"zero": 3, "offload": "params"}])
def test_meta_model_plans_like_the_real_one(options):
    real, cfg = _llama()
    with torch.device("meta"):
        meta = transformers.LlamaForCausalLM(cfg)
    ids = torch.zeros(2, 16, dtype=torch.long)
    batch = {"input_ids": ids, "labels": ids}
    opt = lambda ps: torch.optim.AdamW(ps)  # noqa: E731
    want = autoshard.autoshard(real, autoshard.Mesh.virtual(dp=2, tp=2), example_inputs=batch, optimizer=opt,
                               **options).plan
    got = autoshard.plan(meta, {"dp": 2, "tp": 2}, batch, optimizer=opt, **options)
    # the same decisions, parameter by parameter (meta tensors' strides can add a `contiguous` node to
    # a block's graph, so op counts, and with them the fingerprint, may differ)
    assert got.params == want.params and got.dp_buckets == want.dp_buckets and got.zero == want.zero
    assert got.collectives == want.collectives and got.fallbacks == want.fallbacks
    assert got.checkpointing.get("stages") == want.checkpointing.get("stages")
    assert got.memory == want.memory
    assert got.estimates["predicted_device_bytes"] > 0
    assert autoshard.Choices.from_dict(got.choices) == autoshard.Choices(**options)


def test_a_model_larger_than_this_process_plans_without_allocating():
    """Llama-3-8B-wide blocks (d 4096, vocab 128256), 4 layers: 1.9 G parameters, 7.7 GB in fp32."""
    cfg = transformers.LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                                   num_hidden_layers=4, num_attention_heads=32, num_key_value_heads=8,
                                   use_cache=False)
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(cfg)
    n = sum(p.numel() for p in model.parameters())
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    ids = torch.zeros(1, 64, dtype=torch.long)
    p = autoshard.plan(model, autoshard.Mesh.virtual(dp=2, tp=4), {"input_ids": ids, "labels": ids}, zero=3,
                       precision="bf16")
    grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024
    assert n > 1.9e9 and grown < 0.05 * n * 4, (n, grown)  # far less than the fp32 model
    assert p.mesh["tp"] == 4 and p.zero["stage"] == 3
    q = p.params["model.layers.0.self_attn.q_proj.weight"]
    assert q.local_shape == [1024, 4096] and q.placement == "S(0)"
    assert p.estimates["predicted_device_bytes"] > 0


def test_bad_options_fail_before_capture():
    with torch.device("meta"):
        model = _llama()[0].to("meta")
    with pytest.raises(autoshard.PlanError, match="unknown option"):
        autoshard.plan(model, {"dp": 2}, (torch.zeros(1, 4, dtype=torch.long),), zer0=1)
