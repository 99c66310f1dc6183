"""QuACK epilogues behind `hopper_gemm`'s fused MLP (imported only where QuACK is installed).

The epilogue functions are module globals because QuACK keys its compiled kernels by their source
and what they reference, and finds them again by import; QuACK traces them with its per-element
float32 values as arguments.
"""

from __future__ import annotations

from quack.activation import act_fn_map, dact_fn_map
from quack.epilogue import gemm_epilogue
from torch import Tensor

GELU = act_fn_map["gelu_erf"]
GELU_SLOPE = dact_fn_map["gelu_erf"]


@gemm_epilogue(outputs=("postact",))
def fc1_gelu(acc, bias):
    """D = acc + bias (fc1's output, kept for the backward), postact = GELU of it in float32."""
    a = acc + bias
    return {"D": a, "postact": GELU(a)}


@gemm_epilogue()
def fc2_dgelu(acc, c):
    """acc = dY W2 in float32, c = fc1's output A: D = acc * GELU'(A)."""
    da, _ = GELU_SLOPE(c, acc)
    return {"D": da}


def gemm_gelu(x: Tensor, w1: Tensor, b1: Tensor) -> tuple[Tensor, Tensor]:
    """(A = x w1^T + b1, GELU(A)) from one product."""
    out = fc1_gelu(x, w1.t(), bias=b1.view(1, -1), tuned=False)
    return out["D"], out["postact"]


def gemm_dgelu(dy: Tensor, w2: Tensor, a: Tensor) -> Tensor:
    """(dY w2) * GELU'(A) from one product."""
    return fc2_dgelu(dy, w2, a, tuned=False)["D"]
