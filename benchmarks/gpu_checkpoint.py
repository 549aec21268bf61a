"""Checkpoints under NCCL: save under one plan, load under another, compare with the straight run.

    torchrun --nproc-per-node 4 benchmarks/gpu_checkpoint.py /tmp/ckpt
"""

import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
import autoshard  # noqa: E402
from parity import batch, check, inputs, make_model, make_optimizer, reference  # noqa: E402


def train(sm, kind, mesh, steps):
    per = 8 // mesh.data_size
    lo = mesh.data_rank * per
    out = []
    for s in steps:
        inp, target, _ = inputs(kind, batch(s)[lo:lo + per])
        out.append(sm.train_step(inp, target))
    return out


if __name__ == "__main__":
    path = sys.argv[1]
    kind, opt = "gpt2", "adamw"
    first = autoshard.Mesh(dp=2, tp=2)
    inp0, _, loss_fn = inputs(kind, batch(0)[:4])
    sm = autoshard.autoshard(make_model(kind), first, example_inputs=inp0, loss_fn=loss_fn,
                             optimizer=make_optimizer(opt), zero=1)
    losses = train(sm, kind, first, range(0, 2))
    sm.save(path)
    second = autoshard.Mesh(dp=4)
    inp1, _, _ = inputs(kind, batch(0)[:2])
    sm2 = autoshard.autoshard(make_model(kind), second, example_inputs=inp1, loss_fn=loss_fn,
                              optimizer=make_optimizer(opt), zero=2)
    autoshard.load(path, sm2)
    losses += train(sm2, kind, second, range(2, 5))
    sd = sm2.full_state_dict()
    if int(os.environ["RANK"]) == 0:
        wl, wp = check({"losses": losses, "state": sd}, reference(kind, opt), opt)
        print(f"CHECKPOINT nccl: dp2xtp2 zero1 -> save -> dp4 zero2 load: ok, worst loss {wl:.2e}, worst param {wp:.2e}")
    torch.distributed.destroy_process_group()
