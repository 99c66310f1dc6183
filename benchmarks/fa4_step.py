# ruff: noqa  (a one-off probe of issue 7, kept as it ran on the H200; removed in the next commit)
"""throughput.py with one more variant, compiled-bf16-fa4: the class-token shortcut's attention through
FlashAttention-4's SM90 kernels (torch custom ops, opaque to inductor) instead of cuDNN SDPA."""

import sys

import torch
import torch.nn.functional as F
from torch import Tensor

sys.path.insert(0, "benchmarks")
import flash_attn.cute.interface as fi  # noqa: E402
import throughput as tp  # noqa: E402

import lnshift.backbones.timm_backbone as tb  # noqa: E402


@torch.library.custom_op("lnshift_try::fa4_fwd", mutates_args=())
def fa4_fwd(q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    out, lse, *_ = fi._flash_attn_fwd(q, k, v, softmax_scale=scale, return_lse=True)
    return out, lse


@fa4_fwd.register_fake
def _(q, k, v, scale):
    b, n, h, _ = q.shape
    return q.new_empty(b, n, h, v.shape[-1]), q.new_empty(b, h, n, dtype=torch.float32)


@torch.library.custom_op("lnshift_try::fa4_bwd", mutates_args=())
def fa4_bwd(
    q: Tensor, k: Tensor, v: Tensor, out: Tensor, dout: Tensor, lse: Tensor, scale: float
) -> tuple[Tensor, Tensor, Tensor]:
    dq, dk, dv = fi._flash_attn_bwd(q, k, v, out, dout, lse, scale)
    return dq, dk, dv


@fa4_bwd.register_fake
def _(q, k, v, out, dout, lse, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def setup_context(ctx, inputs, output):
    q, k, v, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.scale = scale


def backward(ctx, dout, dlse):
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = torch.ops.lnshift_try.fa4_bwd(q, k, v, out, dout.contiguous(), lse, ctx.scale)
    return dq, dk, dv, None


fa4_fwd.register_autograd(backward, setup_context=setup_context)


def fa4_attention(attn, x: Tensor, class_only: bool = False) -> Tensor:
    if class_only:
        return ORIGINAL(attn, x, class_only=True)
    weights = attn.qkv.weight.chunk(3)
    biases = attn.qkv.bias.chunk(3) if attn.qkv.bias is not None else (None, None, None)
    q, k, v = (F.linear(x, w, b).unflatten(-1, (attn.num_heads, attn.head_dim)) for w, b in zip(weights, biases))
    q, k = attn.q_norm(q), attn.k_norm(k)
    out, _ = torch.ops.lnshift_try.fa4_fwd(q, k, v, attn.scale)
    return attn.proj_drop(attn.proj(attn.norm(out.flatten(2))))


ORIGINAL = tb.attention

# eager check of the fake's shapes and of the gradients against SDPA
q, k, v = (torch.randn(4, 197, 12, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
out, lse = torch.ops.lnshift_try.fa4_fwd(q, k, v, 0.125)
print("real out", out.shape, out.stride(), "lse", lse.shape, lse.stride(), flush=True)
ref = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)), scale=0.125).transpose(1, 2)
g = torch.randn_like(out)
a = torch.autograd.grad(out, (q, k, v), g)
b = torch.autograd.grad(ref, (q, k, v), g)
print(
    "eager max diff out %.2e grads %s"
    % ((out - ref).abs().max().item(), ["%.2e" % (x - y).abs().max().item() for x, y in zip(a, b)]),
    flush=True,
)

tp.ABLATIONS["fa4"] = (tb, "attention", fa4_attention)
tp.TRAIN_VARIANTS = (*tp.TRAIN_VARIANTS, "compiled-bf16-fa4")
tp.VARIANTS = ("reference", *tp.TRAIN_VARIANTS, "eval", "eval-compiled")
sys.exit(tp.main(sys.argv[1:]))
