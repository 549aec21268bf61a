"""A small GPT (pre-norm transformer decoder with tied embeddings), written as plain PyTorch.

Nothing in it knows about autoshard: it is the kind of model people bring. Run it sharded with::

    torchrun --nproc-per-node 4 examples/gpt.py          # dp=2 × tp=2 on 4 ranks
    python examples/gpt.py                                # or 4 local CPU ranks via autoshard.launch
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class GPTConfig:
    vocab_size: int = 256
    seq_len: int = 64
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    d_ff: int = 256
    dropout: float = 0.0


class Attention(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)  # fused, as in GPT-2 / nanoGPT
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.dropout = cfg.dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        h = self.n_heads
        q, k, v = (z.view(b, t, h, d // h).transpose(1, 2) for z in self.qkv(x).split(d, dim=2))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(cfg.d_model, cfg.d_ff)
        self.out = nn.Linear(cfg.d_ff, cfg.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(F.gelu(self.fc(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.attn = Attention(cfg)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    block: type[nn.Module] = Block  # a subclass swaps the block (examples/moe_gpt.py)
    tied = True  # the LM head shares the token embedding

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos = nn.Embedding(cfg.seq_len, cfg.d_model)
        self.blocks = nn.ModuleList(self.block(cfg) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if self.tied:
            self.head.weight = self.tok.weight
        self.apply(self._init)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        pos = torch.arange(t, device=idx.device)
        x = self.tok(idx) + self.pos(pos)
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.ln_f(x))


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def make_model(seed: int = 0, **overrides) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(**overrides))


def synthetic_batch(step: int, batch: int, cfg: GPTConfig, seed: int = 1234) -> tuple[torch.Tensor, torch.Tensor]:
    """A deterministic global batch of token sequences with a learnable pattern."""
    g = torch.Generator().manual_seed(seed + step)
    start = torch.randint(0, cfg.vocab_size, (batch, 1), generator=g)
    stride = torch.randint(1, 4, (batch, 1), generator=g)
    seq = (start + stride * torch.arange(cfg.seq_len + 1)) % cfg.vocab_size
    noise = torch.rand(seq.shape, generator=g) < 0.1
    seq = torch.where(noise, torch.randint(0, cfg.vocab_size, seq.shape, generator=g), seq)
    return seq[:, :-1].contiguous(), seq[:, 1:].contiguous()


def _train(steps: int = 20, global_batch: int = 8) -> list[float]:
    import autoshard

    mesh = autoshard.Mesh(dp=2, tp=2)
    model = make_model()
    per = global_batch // mesh.data_size
    x, y = synthetic_batch(0, global_batch, model.cfg)
    lo = mesh.data_rank * per
    sm = autoshard.autoshard(model, mesh, example_inputs=(x[lo:lo + per],), loss_fn=lm_loss,
                             optimizer=lambda ps: torch.optim.AdamW(ps, lr=3e-3))
    if mesh.rank == 0:
        print(sm.plan.explain())
    losses = []
    for step in range(steps):
        x, y = synthetic_batch(step, global_batch, model.cfg)
        losses.append(sm.train_step((x[lo:lo + per],), y[lo:lo + per]))
    if mesh.rank == 0:
        print(f"loss {losses[0]:.4f} -> {losses[-1]:.4f}")
    return losses


if __name__ == "__main__":
    import os

    if "RANK" in os.environ:
        _train()
    else:
        import autoshard

        autoshard.launch(_train, 4)
