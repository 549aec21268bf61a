"""Graph passes: capture, sharding rules, tensor parallel, data parallel.

Each pass maps a graph (and a plan) to a graph or a decision record and runs on a virtual mesh.
"""

from .capture import capture
from .data_parallel import gradient_order
from .tensor_parallel import apply_tensor_parallel, plan_tensor_parallel

__all__ = ["capture", "gradient_order", "apply_tensor_parallel", "plan_tensor_parallel"]
