"""Data-parallel pass: the order in which parameter gradients become ready in backward.

Backward visits the graph in reverse, so a parameter whose first use is late in the forward gets its
gradient early. Buckets packed in this order fill, and can be all-reduced, while backward is still
running (see :mod:`autoshard.runtime.data_parallel`).
"""

from __future__ import annotations

from torch.fx import GraphModule


def gradient_order(gm: GraphModule, names: list[str]) -> list[str]:
    """``names`` sorted by the reverse position of their first use in ``gm``'s graph."""
    position = {n: i for i, n in enumerate(gm.graph.nodes)}
    first_use: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "get_attr" and node.target in names and node.users:
            first_use[node.target] = min(position[u] for u in node.users)
    unused = [n for n in names if n not in first_use]
    return sorted(first_use, key=lambda n: -first_use[n]) + unused
