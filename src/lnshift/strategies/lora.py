"""`lora`: low-rank adapters on the attention projections through peft, plus the head."""

from __future__ import annotations

from torch import nn

from ..errors import ConfigError
from .base import Strategy, StrategyOptions, head_names

ATTENTION_SCOPES = ("attn", "attention", "self_attn")


def attention_linears(model: nn.Module) -> list[str]:
    """Names of the Linear layers inside attention blocks, for any of the supported families."""
    names = []
    for name, module in model.named_modules():
        parts = name.split(".")
        if type(module) is nn.Linear and any(p in ATTENTION_SCOPES for p in parts[:-1]):
            names.append(name)
    return names


class LoraStrategy(Strategy):
    name = "lora"

    def prepare(self, model: nn.Module, options: StrategyOptions) -> None:
        from peft import LoraConfig, inject_adapter_in_model

        if any("lora_A" in n for n, _ in model.backbone.named_parameters()):
            return
        targets = attention_linears(model.backbone.model)
        if not targets:
            raise ConfigError("--method lora: no Linear layers found inside attention blocks of this backbone")
        config = LoraConfig(
            r=options.lora_rank,
            lora_alpha=options.lora_alpha,
            lora_dropout=options.lora_dropout,
            target_modules=targets,
        )
        inject_adapter_in_model(config, model.backbone.model)

    def select(self, model: nn.Module, options: StrategyOptions) -> list[str]:
        lora = [f"backbone.{n}" for n, _ in model.backbone.named_parameters() if ".lora_" in n]
        return lora + head_names(model)
