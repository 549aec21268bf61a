"""Sparse-attention pass: ``aten.scaled_dot_product_attention`` nodes become block-sparse attention calls.

Problem. A model written with dense ``F.scaled_dot_product_attention`` pays ``O(T²)`` per head; the
user asks (``attention="block_sparse(block=64, local=4, global=1)"``) for it to attend only within a
layout of blocks (:class:`~autoshard.runtime.kernels.block_sparse.Layout`) without editing the model.
This pass swaps each eligible node for :func:`~autoshard.runtime.kernels.block_sparse.sdpa_block_sparse`
with the layout's spec and the node's ``is_causal`` and ``scale``; every other node is untouched.

Eligible: self-attention with ``q``, ``k``, ``v`` of one shape (after any GQA ``expand``), no explicit
``attn_mask``, no dropout, no ``enable_gqa``. Anything else is left dense and recorded with the reason
(never silently changed: an explicit mask or dropout has a meaning the layout would drop).

Runs after the tensor-parallel pass: the kernel is per (batch, head), so a head-sharded node is
replaced the same way and sees only its local heads. The pass is pure and reports
``{"spec", "layout", "replaced": [...], "rejected": [...]}`` for :attr:`Plan.attention`.
"""

from __future__ import annotations

import torch
from torch.fx import GraphModule, Node

from autoshard.runtime.kernels.block_sparse import Layout, parse_attention, sdpa_block_sparse

from .tensor_parallel import module_path, source_line

aten = torch.ops.aten
_SDPA = aten.scaled_dot_product_attention.default
_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal")


def _arguments(node: Node) -> dict:
    """The sdpa call's arguments by name, defaults filled in."""
    a = dict(zip(_ARGS, node.args))
    a.update(node.kwargs)
    a.setdefault("attn_mask", None)
    a.setdefault("dropout_p", 0.0)
    a.setdefault("is_causal", False)
    a.setdefault("scale", None)
    a.setdefault("enable_gqa", False)
    return a


def _shape(n) -> tuple[int, ...] | None:
    v = n.meta.get("val") if isinstance(n, Node) else None
    return tuple(int(s) for s in v.shape) if isinstance(v, torch.Tensor) else None


def _why_not(a: dict) -> str | None:
    if a["attn_mask"] is not None:
        return "explicit attn_mask (the layout would replace its meaning)"
    if not isinstance(a["dropout_p"], (int, float)) or a["dropout_p"] != 0.0:
        return f"attention dropout (dropout_p={a['dropout_p']})"
    if a["enable_gqa"]:
        return "enable_gqa=True (key/value heads differ from query heads)"
    if not isinstance(a["is_causal"], bool):
        return "is_causal is not a constant"
    shapes = [_shape(a[k]) for k in ("query", "key", "value")]
    if None in shapes:
        return "unknown shapes"
    if len(set(shapes)) != 1 or len(shapes[0]) < 2:
        return f"q, k, v shapes differ ({', '.join(map(str, shapes))}): not self-attention of one head size"
    if shapes[0][-1] > 256:
        return f"head dim {shapes[0][-1]} > 256"
    return None


def sparse_attention_graph(gm: GraphModule, attention: str | Layout) -> tuple[GraphModule, dict]:
    """Replace eligible sdpa nodes of ``gm`` (in place) by block-sparse attention with layout ``attention``."""
    layout = parse_attention(attention)
    spec = layout.spec()
    replaced, rejected = [], []
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target != _SDPA:
            continue
        a = _arguments(node)
        where = {"node": node.name, "module": module_path(node), "source": source_line(node)}
        reason = _why_not(a)
        if reason is not None:
            rejected.append({**where, "reason": reason})
            continue
        with gm.graph.inserting_before(node):
            new = gm.graph.call_function(sdpa_block_sparse, (a["query"], a["key"], a["value"], spec, a["is_causal"]),
                                         {"scale": a["scale"]})
        new.meta.update(node.meta)
        new.meta["autoshard_sparse_attention"] = spec
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        shp = _shape(a["query"])
        t = shp[-2]
        csr = layout.csr(t, a["is_causal"])
        placement = (node.meta.get("autoshard") or {}).get("placement", "R")  # S(1): heads sharded over tp
        replaced.append({**where, "causal": a["is_causal"], "shape": list(shp), "placement": placement,
                         "blocks": csr.n_blocks,
                         "nnz_blocks": csr.nnz, "density": round(csr.density(a["is_causal"]), 6)})
    gm.graph.lint()
    gm.recompile()
    report = {"spec": spec, "layout": layout.to_dict(), "replaced": replaced, "rejected": rejected}
    report["grid"] = layout_grid(report)
    return gm, report


def layout_grid(report: dict, max_blocks: int = 32) -> list[str]:
    """The first replaced node's block layout as text rows (``#`` visited, ``.`` skipped), for explain and viz."""
    if not report.get("replaced"):
        return []
    r = report["replaced"][0]
    layout = Layout(**report["layout"])
    m = layout.csr(r["shape"][-2], r["causal"]).mask
    n = min(m.shape[0], max_blocks)
    return ["".join("#" if x else "." for x in row[:n].tolist()) for row in m[:n]]


__all__ = ["layout_grid", "sparse_attention_graph"]
