"""Model zoo: unmodified ``transformers`` models from tiny random configs (no downloads), for contract 1.

Every model here is built by ``transformers`` itself from a small config (2 blocks, hidden 32, 4
heads) with dropout off, and trained with its own loss (``labels`` given), so the sharded step and
the single-process reference compute the same function: each data-parallel rank's mean loss covers
the same number of labelled positions, so the mean over ranks is the global mean.

``python tests/zoo.py --table`` runs every case (one 4-rank Gloo launch), checks it against the
single-process reference and writes the coverage table to ``docs/coverage.md``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(__file__))

from parity import rel  # noqa: E402

STEPS = 3
GLOBAL_BATCH = 8
SEQ = 8
VOCAB = 128
IMAGE = 16
LABELS = 10
DP2TP2 = {"dp": 2, "tp": 2}
PP2DP2 = {"pp": 2, "dp": 2}
DP2 = {"dp": 2}
# An attention key bias has an identically zero gradient (softmax ignores a shift shared by all keys), so
# from its zero initialisation it only collects reduction-order noise (~1e-12). A relative error against
# noise means nothing: such parameters (reference norm below NOISE) must agree to within NOISE absolutely.
NOISE = 1e-8


def _hf(config_cls: str, model_cls: str, **cfg: Any) -> torch.nn.Module:
    import transformers

    attn = cfg.pop("attn_implementation", "sdpa")
    config = getattr(transformers, config_cls)(**cfg)
    return getattr(transformers, model_cls)._from_config(config, attn_implementation=attn)


_DEC = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=64, use_cache=False)


def gpt2() -> torch.nn.Module:
    """GPT-2: Conv1D projections, fused qkv with biases, learned positions, tied embeddings."""
    return _hf("GPT2Config", "GPT2LMHeadModel", vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
               use_cache=False, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)


def llama() -> torch.nn.Module:
    """Llama: rotary, GQA (4 query heads, 2 kv heads), SwiGLU, RMSNorm, untied head, sdpa."""
    return _hf("LlamaConfig", "LlamaForCausalLM", num_key_value_heads=2, **_DEC)


def llama_eager_mqa_tied() -> torch.nn.Module:
    """Llama with eager attention, MQA (one kv head), attention biases and tied embeddings."""
    return _hf("LlamaConfig", "LlamaForCausalLM", num_key_value_heads=1, attention_bias=True,
               tie_word_embeddings=True, attn_implementation="eager", **_DEC)


def mixtral() -> torch.nn.Module:
    """Mixtral: top-2 of 4 experts (fused 3-D expert weights), GQA, rotary."""
    return _hf("MixtralConfig", "MixtralForCausalLM", num_key_value_heads=2, num_local_experts=4,
               num_experts_per_tok=2, **_DEC)


def qwen2_moe() -> torch.nn.Module:
    """Qwen2-MoE: routed experts plus a gated shared expert, qkv biases."""
    cfg = dict(_DEC, intermediate_size=64)
    return _hf("Qwen2MoeConfig", "Qwen2MoeForCausalLM", num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
               moe_intermediate_size=32, shared_expert_intermediate_size=64, decoder_sparse_step=1,
               mlp_only_layers=[], **cfg)


def gpt_neox() -> torch.nn.Module:
    """GPT-NeoX: parallel attention + MLP residual, partial rotary (half the head dim), biases."""
    return _hf("GPTNeoXConfig", "GPTNeoXForCausalLM", vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
               num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64, rotary_pct=0.5,
               use_parallel_residual=True, hidden_dropout=0.0, attention_dropout=0.0, use_cache=False)


def bert() -> torch.nn.Module:
    """BERT masked LM: post-norm encoder, GELU MLP, learned positions, tied decoder."""
    return _hf("BertConfig", "BertForMaskedLM", vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
               num_attention_heads=4, intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0.0,
               attention_probs_dropout_prob=0.0)


def t5() -> torch.nn.Module:
    """T5: encoder-decoder, relative position buckets, cross-attention, tied embeddings."""
    return _hf("T5Config", "T5ForConditionalGeneration", vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2,
               num_decoder_layers=2, num_heads=4, dropout_rate=0.0, use_cache=False, decoder_start_token_id=0,
               pad_token_id=0, attn_implementation="eager")


def vit() -> torch.nn.Module:
    """ViT image classification: conv patch embedding, CLS token, pre-norm encoder, linear classifier."""
    return _hf("ViTConfig", "ViTForImageClassification", image_size=IMAGE, patch_size=4, num_channels=3,
               hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
               hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=LABELS)


class DataDependent(torch.nn.Module):
    """An MLP whose forward branches in Python on a tensor *value*: torch.export cannot capture it."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(VOCAB, 32)
        self.up = torch.nn.Linear(32, 64)
        self.down = torch.nn.Linear(64, VOCAB)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        h = self.up(self.emb(input_ids))
        # data-dependent Python control flow (true for every batch, so local and global batches agree)
        h = torch.relu(h) if bool((input_ids >= 0).all()) else torch.tanh(h)
        logits = self.down(h)
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten())


def data_dependent() -> torch.nn.Module:
    """The capture-failure model (graceful degradation to eager data parallelism)."""
    return DataDependent()


BUILDERS: dict[str, Callable[[], torch.nn.Module]] = {
    f.__name__: f for f in (gpt2, llama, llama_eager_mqa_tied, mixtral, qwen2_moe, gpt_neox, bert, t5, vit,
                            data_dependent)
}
# models built of repeated blocks (pipeline cuts between them; T5's cut falls between its two stacks)
STACKS = {"gpt2", "llama", "llama_eager_mqa_tied", "mixtral", "qwen2_moe", "gpt_neox", "bert", "t5", "vit"}
# what each model exercises, for the coverage table
FEATURES = {
    "gpt2": "Conv1D, fused qkv + biases, tied embeddings, sdpa",
    "llama": "rotary, GQA 4:2, SwiGLU, RMSNorm, untied head, sdpa",
    "llama_eager_mqa_tied": "eager attention, MQA 4:1, qkv/o biases, tied embeddings",
    "mixtral": "MoE top-2 of 4 (fused 3-D experts), GQA",
    "qwen2_moe": "MoE top-2 of 4 + gated shared expert, qkv biases",
    "gpt_neox": "parallel attention + MLP, partial rotary (50%), biases",
    "bert": "masked LM, post-norm, GELU, tied decoder",
    "t5": "encoder-decoder, relative position buckets, cross-attention, eager",
    "vit": "image classification, conv patch embedding, CLS token",
    "data_dependent": "uncapturable (Python branch on a tensor): eager data-parallel fallback",
}


def make_model(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return BUILDERS[kind]()


def batch(kind: str, step: int) -> dict[str, torch.Tensor]:
    """The global batch of one step, as the model's keyword inputs (labels included)."""
    g = torch.Generator().manual_seed(1000 + step)
    if kind == "vit":
        return {"pixel_values": torch.randn(GLOBAL_BATCH, 3, IMAGE, IMAGE, generator=g),
                "labels": torch.randint(0, LABELS, (GLOBAL_BATCH,), generator=g)}
    tokens = torch.randint(1, VOCAB, (GLOBAL_BATCH, SEQ), generator=g)
    if kind == "t5":
        return {"input_ids": tokens, "labels": torch.randint(1, VOCAB, (GLOBAL_BATCH, SEQ), generator=g)}
    return {"input_ids": tokens, "labels": tokens}


def _loss(out: Any) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out.loss


def make_optimizer(name: str) -> Callable[[list], torch.optim.Optimizer]:
    if name == "sgd":
        return lambda ps: torch.optim.SGD(ps, lr=0.5)
    return lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.01, eps=1e-6)


def reference(kind: str, opt: str) -> tuple[list[float], dict[str, torch.Tensor]]:
    """The unmodified model on one process on the global batch."""
    model = make_model(kind)
    model.train()
    optim = make_optimizer(opt)(list(model.parameters()))
    losses = []
    for step in range(STEPS):
        loss = _loss(model(**batch(kind, step)))
        optim.zero_grad()
        loss.backward()
        optim.step()
        losses.append(loss.item())
    return losses, {k: v.detach().clone() for k, v in model.state_dict().items()}


def sharded(kind: str, opt: str, degrees: dict[str, int], options: dict | None = None) -> dict | None:
    """Run in every rank of a launch; rank 0 returns losses, state dict, plan facts (or the error)."""
    import autoshard

    mesh = autoshard.Mesh(**degrees)
    model = make_model(kind)
    per = GLOBAL_BATCH // mesh.data_size
    lo = mesh.data_rank * per

    def local(step: int) -> dict[str, torch.Tensor]:
        return {k: v[lo:lo + per] for k, v in batch(kind, step).items()}

    t0 = time.perf_counter()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            sm = autoshard.autoshard(model, mesh, example_inputs=local(0), optimizer=make_optimizer(opt),
                                     **(options or {}))
        losses = [sm.train_step(local(step)) for step in range(STEPS)]
        sd = sm.full_state_dict()
    except Exception as e:  # noqa: BLE001 - reported per case; plan-time errors are the same on every rank
        return {"error": "".join(traceback.format_exception_only(type(e), e)).strip()[-1500:]} if mesh.rank == 0 \
            else None
    if mesh.rank != 0:
        return None
    plan = sm.plan.to_dict()
    return {"losses": losses, "state": sd, "fallbacks": plan.get("fallbacks", []), "notes": plan.get("notes", []),
            "fallback_mode": getattr(sm, "fallback", None), "warnings": [str(w.message) for w in caught],
            "stats": sm.stats(), "seconds": time.perf_counter() - t0}


def run_cases(cases: list[tuple]) -> list[dict | None]:
    """Each case: (model kind, optimizer, mesh degrees[, autoshard options]); run one after another in one launch."""
    return [sharded(*c) for c in cases]


def compare(result: dict, ref: tuple[list[float], dict[str, torch.Tensor]]) -> tuple[float, float]:
    """(worst relative loss error over the steps, worst relative parameter error)."""
    ref_losses, ref_state = ref
    worst_loss = max(abs(a - b) / abs(b) for a, b in zip(result["losses"], ref_losses))
    assert set(result["state"]) == set(ref_state), set(result["state"]) ^ set(ref_state)
    errors = {}
    for k, v in ref_state.items():
        if not v.is_floating_point() or v.norm() == 0:
            continue
        if v.norm() < NOISE:  # exact gradient zero (attention key bias): compared absolutely, in units of NOISE
            errors[k] = float((result["state"][k].double() - v.double()).norm()) / NOISE * tolerance("sgd")
        else:
            errors[k] = rel(result["state"][k], v)
    worst = max(errors, key=errors.get)
    result["worst_param"] = worst
    return worst_loss, errors[worst]


def tolerance(opt: str) -> float:
    return 1e-5 if opt == "sgd" else 1e-3


def mesh_id(d: dict[str, int]) -> str:
    return "x".join(f"{k}{v}" for k, v in d.items())


def cases() -> list[tuple[str, str, dict[str, int]]]:
    """Every 4-rank case of the suite: dp=2×tp=2 for each model, pp=2×dp=2 for each stack, one AdamW case."""
    out: list[tuple[str, str, dict[str, int]]] = []
    for kind in BUILDERS:
        if kind == "data_dependent":
            continue
        out.append((kind, "sgd", DP2TP2))
        if kind in STACKS:
            out.append((kind, "sgd", PP2DP2))
    out.append(("llama", "adamw", DP2TP2))
    return out


# the capture-failure model, under data parallelism over all four ranks, plain and with ZeRO-2
FALLBACK_CASE = ("data_dependent", "sgd", {"dp": 4})
FALLBACK_ZERO_CASE = ("data_dependent", "adamw", {"dp": 4}, {"zero": 2})


def virtual_fallbacks(kind: str, degrees: dict[str, int]) -> list[dict]:
    """What ``autoshard check`` reports: the plan's fallbacks on a virtual mesh (no processes)."""
    import autoshard

    per = GLOBAL_BATCH // max(1, degrees.get("dp", 1))
    example = {k: v[:per] for k, v in batch(kind, 0).items()}
    sm = autoshard.autoshard(make_model(kind), autoshard.Mesh.virtual(**degrees), example_inputs=example)
    return list(sm.plan.fallbacks)


def table(rows: list[dict]) -> str:
    """The README coverage table: one row per model, its meshes and worst deviations."""
    by_model: dict[str, list[dict]] = {}
    for r in rows:
        by_model.setdefault(r["model"], []).append(r)
    lines = ["| model | exercises | meshes (4 CPU ranks, Gloo; optimizer) | worst loss rel. err. | "
             "worst param rel. err. | status |", "|---|---|---|---|---|---|"]
    for model, rs in by_model.items():
        ok = [r for r in rs if r["status"] == "pass"]
        meshes = ", ".join(f"{r['mesh']} ({r['opt']})" + ("" if r["status"] == "pass" else f" ✗ {r['status']}")
                           for r in rs)
        wl = max((r["loss_err"] for r in ok), default=float("nan"))
        wp = max((r["param_err"] for r in ok), default=float("nan"))
        status = "pass" if len(ok) == len(rs) else f"{len(ok)}/{len(rs)} pass"
        lines.append(f"| {model} | {FEATURES.get(model, '')} | {meshes} | {wl:.1e} | {wp:.1e} | {status} |")
    return "\n".join(lines)


def coverage_markdown(text: str) -> str:
    """docs/coverage.md: the table with what it measures."""
    return ("# Model coverage\n\nGenerated by `pytest tests/test_zoo.py` or `python tests/zoo.py --table`: unmodified "
            "`transformers` models from tiny random configs (2 blocks, hidden 32), trained sharded on 4 CPU ranks and "
            f"on one process on the same global batch of {GLOBAL_BATCH} for {STEPS} steps. Contract 1: every loss "
            "within 1e-5 relative, every parameter within 1e-5 relative under SGD (1e-3 under AdamW); a parameter "
            f"whose exact gradient is zero (attention key biases) must agree to {NOISE:g} absolutely.\n\n"
            + text + "\n")


def evaluate(results: list[dict | None], case_list: list[tuple]) -> list[dict]:
    """Compare each case with its reference; one row per case (status: pass, parity or the error)."""
    refs: dict[tuple[str, str], Any] = {}
    rows = []
    for case, res in zip(case_list, results):
        kind, opt, deg = case[:3]
        extra = "".join(f", {k}={v}" for k, v in (case[3] if len(case) > 3 else {}).items())
        row = {"model": kind, "opt": opt + extra, "mesh": mesh_id(deg), "loss_err": float("nan"), "param_err": float("nan")}
        if res is None or "error" in res:
            row["status"] = "error: " + (res or {}).get("error", "no result").splitlines()[-1][:160]
        else:
            if (kind, opt) not in refs:
                refs[kind, opt] = reference(kind, opt)
            row["loss_err"], row["param_err"] = compare(res, refs[kind, opt])
            good = row["loss_err"] <= 1e-5 and row["param_err"] <= tolerance(opt)
            row["status"] = "pass" if good else f"parity ({res['worst_param']})"
            row["fallbacks"] = len(res["fallbacks"])
            if res.get("fallback_mode"):
                row["mesh"] += f" [{res['fallback_mode']}]"
            row["seconds"] = res["seconds"]
        rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--table", action="store_true", help="write docs/coverage.md")
    ap.add_argument("--only", nargs="*", help="model kinds to run (default: all)")
    args = ap.parse_args()
    import autoshard

    case_list = [c for c in [*cases(), FALLBACK_CASE, FALLBACK_ZERO_CASE] if not args.only or c[0] in args.only]
    t0 = time.perf_counter()
    results = autoshard.launch(run_cases, 4, case_list, device="cpu")[0]
    print(f"launch: {time.perf_counter() - t0:.0f}s", flush=True)
    rows = evaluate(results, case_list)
    for r in rows:
        print(r, flush=True)
    text = table(rows)
    print(text)
    if args.table:
        path = os.path.join(os.path.dirname(__file__), "..", "docs", "coverage.md")
        with open(path, "w", encoding="utf-8") as f:
            f.write(coverage_markdown(text))


if __name__ == "__main__":
    main()
