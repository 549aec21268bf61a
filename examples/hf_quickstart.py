"""Train a Hugging Face model with autoshard (dp=2 x tp=2). Replace make_model() and batch() with your own.

    python examples/hf_quickstart.py [model|logits] [STEPS]      # 4 CPU ranks (Gloo), a tiny random Llama
    torchrun --nproc-per-node 4 examples/hf_quickstart.py       # one rank per GPU (NCCL)
"""

import os
import sys

import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

import autoshard

GLOBAL_BATCH, SEQ, VOCAB = 8, 32, 256


def make_model():  # or LlamaForCausalLM.from_pretrained(...), AutoModelForCausalLM.from_config(...)
    torch.manual_seed(0)  # the same initial weights on every rank
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))


def batch(step):  # the global batch of one step, the same on every rank (your data loader here)
    return torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ), generator=torch.Generator().manual_seed(step))


def logits_loss(out, tokens):  # loss_fn(output, target): next-token cross-entropy over out.logits
    return F.cross_entropy(out.logits[:, :-1].float().flatten(0, 1), tokens[:, 1:].flatten())


def train(loss="model", steps=5):  # one rank; module level, so that autoshard.launch can start it
    mesh = autoshard.Mesh(dp=int(os.environ["WORLD_SIZE"]) // 2, tp=2)  # checks dp x tp == world size
    per = GLOBAL_BATCH // mesh.data_size  # this rank's slice: ranks differing only in tp share one
    lo = mesh.data_rank * per
    x = batch(0)[lo:lo + per]
    opt = lambda params: torch.optim.AdamW(params, lr=1e-3)  # noqa: E731 - gets this rank's shards
    if loss == "model":   # the model's own loss: Hugging Face models given labels return out.loss
        sm = autoshard.autoshard(make_model(), mesh, example_inputs={"input_ids": x, "labels": x}, optimizer=opt)
    else:                 # your loss over the model's output
        sm = autoshard.autoshard(make_model(), mesh, example_inputs=(x,), loss_fn=logits_loss, optimizer=opt)
    if mesh.rank == 0:
        print(sm.plan.summary(), flush=True)
    for step in range(steps):
        x = batch(step)[lo:lo + per]
        inputs, target = ({"input_ids": x, "labels": x}, None) if loss == "model" else ((x,), x)
        mean_loss = sm.train_step(inputs, target)  # fwd + bwd + step; the mean loss over the global batch
        if mesh.rank == 0:
            print(f"step {step}: loss {mean_loss:.4f}", flush=True)
    return mean_loss


if __name__ == "__main__":  # the guard matters: autoshard.launch starts new processes that import this file
    loss, steps = (sys.argv[1:] + ["model"])[0], int((sys.argv[2:] + ["5"])[0])
    if "RANK" in os.environ:  # under torchrun: this process is one rank
        train(loss, steps)
    else:                     # start 4 CPU ranks here
        print("final loss", autoshard.launch(train, 4, loss, steps, device="cpu")[0])
