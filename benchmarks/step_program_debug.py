"""Debug: the joint export of an HF Llama on CUDA in bf16 and fp32 (2 layers)."""
import sys
import traceback

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from autoshard.bench import lm_loss
from autoshard.passes.capture import capture
from autoshard.passes.compile import compile_step, make_state

dev = torch.device("cuda")
torch.autograd.set_detect_anomaly(True)
for dtype in (torch.bfloat16, None):
    for attn in ("sdpa",):
        try:
            cfg = LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=2,
                              num_attention_heads=16, num_key_value_heads=16, use_cache=False, attn_implementation=attn)
            m = LlamaForCausalLM(cfg).to(dev)
            x = torch.randint(0, 32000, (2, 256), device=dev)
            gm = capture(m, (x,), {}, param_dtype=dtype)
            params = dict(m.named_parameters())
            for n, p in params.items():
                owner, _, leaf = n.rpartition(".")
                gm.get_submodule(owner)._parameters[leaf] = p
            st = make_state(list(params), params, dtype, lambda ps: torch.optim.AdamW(ps, lr=1e-4), dev)
            for n, p in zip(st.names, st.params):  # the bf16 compute copies in the graph
                owner, _, leaf = n.rpartition(".")
                gm.get_submodule(owner)._parameters[leaf] = p
            prog, rep = compile_step(gm, lambda o, t: lm_loss(o.logits, t), st, (x,), {}, x, dp_group=None,
                                     dp_size=1, buckets=[], grad_clip=None, device=dev, compile=False)
            print(dtype, attn, "OK", prog([x, x]).tolist(), flush=True)
        except Exception:
            print(dtype, attn, "FAILED", flush=True)
            tb = traceback.format_exc()
            lines = tb.splitlines()
            print("\n".join(lines[-8:]), file=sys.stdout, flush=True)
