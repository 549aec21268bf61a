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
    cases = [(k, o, {"dp": 2, "tp": 2}, {}) for k in ("gpt", "llama", "gpt2") for o in ("sgd", "adamw")]
    cases += [(k, "adamw", {"pp": 4}, {"schedule": s, "microbatches": 4}) for k in ("llama_ex", "gpt2")
              for s in ("1f1b", "zero_bubble")]
    cases += [("llama_ex", "adamw", {"pp": 2, "tp": 2}, {"schedule": "interleaved_1f1b", "virtual_stages": 2,
                                                        "microbatches": 4}),
              ("gpt2", "sgd", {"pp": 2, "dp": 2}, {"schedule": "gpipe", "microbatches": 2})]
    cases += [("gpt", "sgd", {"dp": 4}, {"zero": 3}), ("llama", "adamw", {"dp": 2, "tp": 2}, {"zero": 3}),
              ("gpt2", "adamw", {"dp": 4}, {"zero": 3, "offload": "params"}),
              ("gpt", "adamw", {"pp": 2, "dp": 2}, {"zero": 3, "microbatches": 4})]
    if len(sys.argv) > 1 and sys.argv[1] == "--zero3-only":
        cases = [c for c in cases if c[3].get("zero") == 3]
    if len(sys.argv) > 1 and sys.argv[1] == "--experts":  # expert parallelism, with ZeRO (4 GPUs; 2 with --two)
        cases = [("moe_gpt", "sgd", {"ep": 4}, {}), ("moe_gpt", "adamw", {"ep": 4}, {"zero": 2}),
                 ("mixtral", "adamw", {"dp": 2, "ep": 2}, {"zero": 3}), ("moe_gpt", "sgd", {"dp": 2, "ep": 2}, {"zero": 1})]
        if "--two" in sys.argv:
            cases = [("moe_gpt", "sgd", {"ep": 2}, {}), ("moe_gpt", "adamw", {"ep": 2}, {"zero": 2}),
                     ("mixtral", "adamw", {"ep": 2}, {"zero": 3}), ("moe_gpt", "sgd", {"ep": 2}, {"zero": 1})]
    failures = 0
    for kind, opt, degrees, options in cases:
        result = sharded(kind, opt, degrees, **options)
        name = "x".join(f"{k}{v}" for k, v in degrees.items()) + " " + options.get("schedule", "") + \
            (f" zero{options['zero']}" if "zero" in options else "") + (" offload" if "offload" in options else "")
        if int(os.environ.get("RANK", "0")) == 0:
            try:
                wl, wp = check(result, reference(kind, opt), opt)
                print(f"PARITY {kind:8s} {opt:6s} {name:22s} nccl: ok   worst loss {wl:.2e}  worst param {wp:.2e}",
                      flush=True)
            except AssertionError as e:
                failures += 1
                print(f"PARITY {kind:8s} {opt:6s} {name:22s} nccl: FAIL {e}", flush=True)
    sys.exit(1 if failures else 0)
