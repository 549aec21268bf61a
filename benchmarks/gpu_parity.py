"""Contract 1 on GPUs: the parity cases of tests/test_parity.py under NCCL.

    torchrun --nproc-per-node 4 benchmarks/gpu_parity.py      # dp=2 × tp=2
Prints one line per case: worst loss and parameter deviation from the single-process CPU reference.
"""

import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from parity import check, reference, sharded  # noqa: E402

if __name__ == "__main__":
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    degrees = {"dp": 2, "tp": 2}
    failures = 0
    for kind in ("gpt", "llama", "gpt2"):
        for opt in ("sgd", "adamw"):
            result = sharded(kind, opt, degrees)
            if int(os.environ.get("RANK", "0")) == 0:
                try:
                    wl, wp = check(result, reference(kind, opt), opt)
                    print(f"PARITY {kind:6s} {opt:6s} dp2xtp2 nccl: ok   worst loss {wl:.2e}  worst param {wp:.2e}", flush=True)
                except AssertionError as e:
                    failures += 1
                    print(f"PARITY {kind:6s} {opt:6s} dp2xtp2 nccl: FAIL {e}", flush=True)
    sys.exit(1 if failures else 0)
