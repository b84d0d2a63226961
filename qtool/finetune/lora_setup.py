"""The one place a model gets its LoRA adapter: PEFT's LoraConfig on a float base; on a GPTQ/EXL2 base the
config comes from qtool.finetune.quantized_lora (which registers qtool's LoRA layer for quantized linears with
PEFT)."""

from __future__ import annotations

from typing import Any

import torch

from qtool.config.finetune_schema import ALL_LINEAR, FinetuneConfig
from qtool.core.errors import QtoolError
from qtool.kernels.exl2_linear import Exl2Linear
from qtool.kernels.quant_linear import QuantLinear

def quantized_format(model: torch.nn.Module) -> str | None:
    """"gptq" or "exl2" when the model holds qtool's quantized linears, else None."""
    for module in model.modules():
        if isinstance(module, QuantLinear):
            return "gptq"
        if isinstance(module, Exl2Linear):
            return "exl2"
    return None


def _targets(config: FinetuneConfig) -> str | list[str]:
    return ALL_LINEAR if config.target_modules == [ALL_LINEAR] else list(config.target_modules)


def lora_config(model: torch.nn.Module, config: FinetuneConfig) -> Any:
    """PEFT's LoraConfig for `model` (float base) or the quantized-LoRA module's (GPTQ/EXL2 base)."""
    from peft import LoraConfig

    kind = quantized_format(model)
    if kind is not None:
        from qtool.finetune import quantized_lora

        return quantized_lora.lora_config_for(model, config.rank, config.alpha, config.dropout, _targets(config),
                                              config.use_rslora, config.use_dora)
    return LoraConfig(r=config.rank, lora_alpha=config.alpha, lora_dropout=config.dropout, target_modules=_targets(config),
                      use_rslora=config.use_rslora, use_dora=config.use_dora, bias="none", task_type="CAUSAL_LM")


def make_lora_model(model: torch.nn.Module, config: FinetuneConfig, float_reference: torch.nn.Module | None = None,
                    resumed: bool = False) -> Any:
    """`model` wrapped by PEFT with a trainable LoRA adapter (A/B in float32); the base weights frozen. With
    lora_init loftq, `float_reference` is the float model the quantized base came from: each adapter starts as its
    layer's quantization error at rank r (finetune/loftq_init.py). resumed: the adapters' values will be loaded
    from a checkpoint, so lora_init is not applied (and needs no float model)."""
    from peft import get_peft_model

    lora = lora_config(model, config)
    if quantized_format(model) == "gptq":
        from qtool.finetune.quantized_lora import use_training_backend

        use_training_backend(model)  # dequantize + cuBLAS on CUDA; the Triton backend's repacked copies dropped
    try:
        peft_model = get_peft_model(model, lora)
    except ValueError as exc:  # PEFT: no module matched the targets, or a target of a type it cannot adapt
        linears = sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)})
        raise QtoolError(f"target_modules {config.target_modules}: {str(exc).splitlines()[0]}",
                         f"name linears of this model ({', '.join(linears)}) or {ALL_LINEAR}") from exc
    if config.lora_init == "loftq" and not resumed:
        if float_reference is None:
            raise QtoolError("lora_init loftq needs the float model the quantized base was made from", "pass --loftq-float MODEL")
        from qtool.finetune.loftq_init import loftq_initialize

        loftq_initialize(peft_model, float_reference)
    return peft_model
