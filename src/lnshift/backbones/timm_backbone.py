"""timm ViTs: any `timm.create_model` name, with weights from the hub cache, a file or a folder."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import timm
import timm.data
import torch.nn.functional as F
from timm.layers import Attention
from timm.models.vision_transformer import Block, VisionTransformer
from torch import Tensor, nn

from ..errors import ModelError
from .base import Backbone, load_state_dict_strict, merge_data_config, read_weights


def reads_class_token(model: nn.Module) -> bool:
    """A plain timm ViT whose pooling reads only the class token (index 0) of the final tokens."""
    return (
        type(model) is VisionTransformer
        and model.global_pool == "token"
        and model.attn_pool is None
        and model.cls_token is not None
        and len(model.blocks) > 0
        and all(type(block) is Block for block in model.blocks)
    )


def hooked(module: nn.Module) -> bool:
    """Whether a forward, forward-pre, backward or backward-pre hook is registered on `module` itself."""
    return bool(
        module._forward_hooks or module._forward_pre_hooks or module._backward_hooks or module._backward_pre_hooks
    )


def takes_shortcut(model: nn.Module) -> bool:
    """Whether `class_token_features` may stand in for `forward_features` at this call.

    Checked at every call, so that what a user changes after loading is honoured: the pooling must
    still read only the class token (changing `global_pool` would otherwise pool one token: NaN for
    avg), no gradient checkpointing, and no hook on a module whose forward the shortcut skips (a
    Block, its Attention, its qkv; the ViT's own too, though neither path calls it), so feature
    extractors and wrappers that hook them (FSDP's `fully_shard`) see timm's forward. Global hooks
    (`register_module_forward_hook`, which torch's FLOP counter uses) do not count.
    """
    if not reads_class_token(model) or model.grad_checkpointing:
        return False
    skipped = [model, *model.blocks]
    skipped += [m for b in model.blocks for m in (b.attn, getattr(b.attn, "qkv", None)) if m is not None]
    return not any(hooked(m) for m in skipped)


def attention(attn: nn.Module, x: Tensor, class_only: bool = False) -> Tensor:
    """timm `Attention.forward(x)` with q, k and v from three matrix products; `class_only`: for x[:, :1] only.

    Why three products: the attention backward returns dq, dk and dv as separate (B, N, H, D)
    tensors; timm's single qkv product then needs them interleaved into one (B, N, 3HD) gradient, a
    copy of three activations per block (its cost: benchmarks/results/README.md). Apart, each
    one's input gradient is a product of its own. `class_only` computes queries, attention and
    projection for the class token alone (keys and values still span every token). Modules timm
    built differently (a LoRA-wrapped qkv, a gate, the non-fused path) run their own forward.
    """
    plain = type(attn) is Attention and type(attn.qkv) is nn.Linear and attn.fused_attn
    if not plain or getattr(attn, "gate", None) is not None:  # `gate`: timm >= 1.0.30 only
        return attn(x)[:, :1] if class_only else attn(x)
    weights = attn.qkv.weight.chunk(3)
    biases = attn.qkv.bias.chunk(3) if attn.qkv.bias is not None else (None, None, None)

    def heads(t: Tensor) -> Tensor:  # (B, N, H*D) -> (B, H, N, D), a view
        return t.unflatten(-1, (attn.num_heads, attn.head_dim)).transpose(1, 2)

    q = heads(F.linear(x[:, :1] if class_only else x, weights[0], biases[0]))
    k, v = (heads(F.linear(x, w, b)) for w, b in zip(weights[1:], biases[1:], strict=True))
    q, k = attn.q_norm(q), attn.k_norm(k)
    out = F.scaled_dot_product_attention(q, k, v, dropout_p=attn.attn_drop.p if attn.training else 0.0)
    return attn.proj_drop(attn.proj(attn.norm(out.transpose(1, 2).flatten(2))))


def class_token_features(model: VisionTransformer, x: Tensor) -> Tensor:
    """`forward_features` for the class token only: (B, 1, D), equal to forward_features(x)[:, :1].

    Why: with class-token pooling nothing reads the other tokens' outputs of the last block, so its
    queries, attention output, projection, residual, norm2 and MLP run on one token instead of N
    (its keys and values still span every token). Exact, gradients included. What it saves:
    benchmarks/results/README.md.
    """
    x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x))))
    for block in model.blocks[:-1]:
        x = x + block.drop_path1(block.ls1(attention(block.attn, block.norm1(x))))
        x = x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))
    last = model.blocks[-1]
    x = x[:, :1] + last.drop_path1(last.ls1(attention(last.attn, last.norm1(x), class_only=True)))
    x = x + last.drop_path2(last.ls2(last.mlp(last.norm2(x))))
    return model.norm(x)


class TimmBackbone(Backbone):
    """Pooled = `forward_head(pre_logits=True)`, so each model keeps its own pooling (CLS, avg, MAP).

    `class_token_only` (the fast path `class_token`, backbones/fastpath.py; off by default): pooled
    features come from `class_token_features` at each call where `takes_shortcut` allows it.
    """

    family = "timm"
    patch_convs = ("patch_embed.proj",)

    def __init__(self, model: nn.Module, name: str, *, timm_kwargs: dict[str, Any], **kwargs: Any) -> None:
        super().__init__(model, name, **kwargs)
        self.class_token_only = False
        # `model` is timm.create_model(model.pretrained_cfg["architecture"], **timm_kwargs, num_classes=0):
        # what a merged state dict records so that plain timm can rebuild it
        self.timm_kwargs = timm_kwargs

    def forward(self, x: Tensor) -> Tensor:
        if self.class_token_only and takes_shortcut(self.model):
            return self.model.forward_head(class_token_features(self.model, x), pre_logits=True)
        return self.model.forward_head(self.model.forward_features(x), pre_logits=True)

    def forward_tokens(self, x: Tensor) -> Tensor:
        tokens = self.model.forward_features(x)
        if tokens.ndim != 3:
            raise ModelError(
                f"timm model {self.name!r} gives features of shape {tuple(tokens.shape)}, not a token sequence"
            )
        return tokens


def _folder_config(folder: Path) -> dict[str, Any]:
    """A timm hub style `config.json` ({"architecture", "model_args", "pretrained_cfg"})."""
    file = folder / "config.json"
    try:
        cfg = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ModelError(f"cannot read timm model config {file}: {err}") from err
    if not isinstance(cfg, dict) or "architecture" not in cfg:
        raise ModelError(f"{file} has no 'architecture' key, so it is not a timm model folder")
    return cfg


def _filter_checkpoint(model: nn.Module, state_dict: dict[str, Tensor], source: str, what: str) -> dict[str, Tensor]:
    """Apply the model module's own `checkpoint_filter_fn`, as timm does for pretrained weights.

    This converts original-format checkpoints (DINOv2, OpenAI CLIP, ...) and resamples position
    embeddings when `img_size` differs from the size the weights were trained at.
    """
    filter_fn = getattr(sys.modules[type(model).__module__], "checkpoint_filter_fn", None)
    if filter_fn is None:
        return state_dict
    try:
        return filter_fn(state_dict, model)
    except (KeyError, RuntimeError, ValueError) as err:
        # weights of another architecture usually fail here (resampling position embeddings of another
        # shape): the keys and shapes that do not fit say why, where timm's message does not
        load_state_dict_strict(model, state_dict, what, source)
        raise ModelError(f"weights {source} could not be converted for {type(model).__name__}: {err}") from err


def load_timm(
    name: str,
    weights: str | Path | None = None,
    *,
    pretrained: bool = True,
    model_kwargs: dict[str, Any] | None = None,
    data_config: dict[str, Any] | None = None,
) -> TimmBackbone:
    """Build `name` (a timm name or a timm-format folder) without a classifier and load its weights.

    `data_config` overrides what timm reports; preprocessing stored with the weights overrides both.
    """
    kwargs = dict(model_kwargs or {})
    arch = name
    if Path(name).is_dir():
        cfg = _folder_config(Path(name))
        arch = cfg["architecture"]
        kwargs = {**cfg.get("model_args", {}), **kwargs}
        weights = weights if weights is not None else name
    from_hub = pretrained and weights is None
    try:
        model = timm.create_model(arch, pretrained=from_hub, **{**kwargs, "num_classes": 0})
    except TypeError as err:
        raise ModelError(f"timm model {arch!r} does not accept model_kwargs {kwargs}: {err}") from err
    except Exception as err:
        if not from_hub:
            raise ModelError(f"could not build timm model {arch!r}: {err}") from err
        raise ModelError(
            f"could not load pretrained weights for timm model {arch!r} offline ({err}); "
            "pass a weights file (--weights FILE) or pretrained=False for random init"
        ) from err

    resolved = timm.data.resolve_data_config({}, model=model)
    if "img_size" in kwargs:
        size = kwargs["img_size"]
        resolved["input_size"] = (3, *((size, size) if isinstance(size, int) else size))
    weights_config: dict[str, Any] = {}
    if weights is not None:
        state_dict, weights_config = read_weights(weights)
        what = f"timm model {arch!r}"
        state_dict = _filter_checkpoint(model, state_dict, str(weights), what)
        load_state_dict_strict(model, state_dict, what, str(weights))
    return TimmBackbone(
        model,
        name,
        timm_kwargs=kwargs,
        feature_dim=getattr(model, "head_hidden_size", None) or model.num_features,
        token_dim=model.num_features,
        data_config=merge_data_config(resolved, data_config, weights_config),
    )
