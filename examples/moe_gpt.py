"""A small mixture-of-experts GPT: every block's MLP is top-2 of 8 experts, written as plain PyTorch.

The experts are a ``ModuleList`` that the block loops over, picking each expert's tokens with
``torch.where`` (the way most hand-written MoE layers look). Nothing in it knows about autoshard.
Train it with its experts spread over ranks::

    torchrun --nproc-per-node 4 examples/moe_gpt.py      # dp=2 × ep=2 on 4 ranks
    python examples/moe_gpt.py                            # or 4 local CPU ranks via autoshard.launch
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from autoshard.examples.gpt import GPT, Attention, GPTConfig, lm_loss, synthetic_batch


@dataclass
class MoEGPTConfig(GPTConfig):
    n_experts: int = 8
    top_k: int = 2


class Expert(nn.Module):
    def __init__(self, d_model: int, d_ff: int) -> None:
        super().__init__()
        self.fc = nn.Linear(d_model, d_ff)
        self.out = nn.Linear(d_ff, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(F.gelu(self.fc(x), approximate="tanh"))


class MoE(nn.Module):
    """Top-k routing with renormalised weights; experts looped over, tokens gathered per expert."""

    def __init__(self, cfg: MoEGPTConfig) -> None:
        super().__init__()
        self.top_k = cfg.top_k
        self.router = nn.Linear(cfg.d_model, cfg.n_experts, bias=False)
        self.experts = nn.ModuleList(Expert(cfg.d_model, cfg.d_ff) for _ in range(cfg.n_experts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        x = x.reshape(-1, d)
        probs = F.softmax(self.router(x), dim=-1)
        weights, index = probs.topk(self.top_k, dim=-1)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            token, slot = torch.where(index == e)
            out = out.index_add(0, token, expert(x[token]) * weights[token, slot, None])
        return out.view(b, t, d)


class MoEBlock(nn.Module):
    def __init__(self, cfg: MoEGPTConfig) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.attn = Attention(cfg)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.moe = MoE(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.moe(self.ln2(x))


class MoEGPT(GPT):
    """The GPT example with an MoE block in place of the MLP, and an untied head."""

    block = MoEBlock
    tied = False


def make_model(seed: int = 0, **overrides) -> MoEGPT:
    torch.manual_seed(seed)
    return MoEGPT(MoEGPTConfig(**overrides))


def _train(steps: int = 20, global_batch: int = 8) -> list[float]:
    import autoshard

    mesh = autoshard.Mesh(dp=2, ep=2)
    model = make_model()
    per = global_batch // mesh.data_size
    lo = mesh.data_rank * per
    x, y = synthetic_batch(0, global_batch, model.cfg)
    sm = autoshard.autoshard(model, mesh, example_inputs=(x[lo:lo + per],), loss_fn=lm_loss,
                             optimizer=lambda ps: torch.optim.AdamW(ps, lr=3e-3))
    if mesh.rank == 0:
        print(sm.plan.explain())
    losses = []
    for step in range(steps):
        x, y = synthetic_batch(step, global_batch, model.cfg)
        losses.append(sm.train_step((x[lo:lo + per],), y[lo:lo + per]))
    if mesh.rank == 0:
        print(f"loss {losses[0]:.4f} -> {losses[-1]:.4f}; tokens per expert in the last step: "
              f"{sm.stats()['expert_tokens']}")
    return losses


if __name__ == "__main__":
    import os

    if "RANK" in os.environ:
        _train()
    else:
        import autoshard

        autoshard.launch(_train, 4)
