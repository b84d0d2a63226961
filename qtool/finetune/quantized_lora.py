"""LoRA over qtool's quantized linears with PEFT: a LoRA layer for QuantLinear (GPTQ) and Exl2Linear (EXL2)
registered through PEFT's custom-module mechanism, so get_peft_model, save_pretrained and PeftModel.from_pretrained
work unchanged and adapters are PEFT's own files (adapter_config.json + adapter_model.safetensors, PEFT's key
names), loadable onto the dequantized float base. The base stays packed and frozen: its forward is the layer's
routed matmul and its backward the grad-input kernel (kernels/quantized_autograd.py); only A and B train."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

import torch
from peft import LoraConfig, PeftModel
from peft.tuners.lora.layer import LoraLayer
from safetensors import safe_open
from torch import nn

from qtool.core.errors import QtoolError
from qtool.kernels.exl2_linear import Exl2Linear
from qtool.kernels.low_rank_autograd import dequant_linear_plus_low_rank
from qtool.kernels.quant_linear import QuantLinear
from qtool.kernels.registry import BackendRegistry

QUANTIZED_LINEARS = (QuantLinear, Exl2Linear)
ALL_LINEAR = "all-linear"  # every linear of the model but its output head (PEFT's spelling)
LORA_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
OUTPUT_HEADS = ("lm_head",)


class QuantizedLoraLinear(nn.Module, LoraLayer):
    """y = base(x) + B(A(dropout(x))) * scaling over a frozen QuantLinear or Exl2Linear. A and B are kept in
    lora_dtype (float32 unless a subclass says otherwise: see lora_layer_class) on the base's device; the input
    is cast to it for the adapter branch and the branch's output back to the base's output dtype."""

    lora_dtype: torch.dtype = torch.float32

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: LoraConfig, r: int = 0, lora_alpha: int = 1,
                 **kwargs: Any):
        super().__init__()
        LoraLayer.__init__(self, base_layer)
        if config.use_dora:
            raise QtoolError("use_dora is not available on a quantized base: DoRA needs the dense weight's norms every step",
                             "train plain LoRA or rsLoRA (use_rslora) on GPTQ/EXL2 bases")
        self.fan_in_fan_out = False
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, target_name=kwargs.get("target_name", ""))

    def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
        return module.in_features, module.out_features  # PEFT's generic lookup would warn about an unknown type

    def _get_base_layer_device_and_dtype(self, base_layer: nn.Module) -> tuple[torch.device, torch.dtype]:
        # PEFT would take the packed int32 codes' dtype; the adapters keep their own
        return getattr(base_layer, base_layer.weight_buffer).device, self.lora_dtype

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """scaling * B @ A [out_features, in_features] in the adapter's dtype: what merging adds to the float weight."""
        return (self.lora_B[adapter].weight @ self.lora_A[adapter].weight) * self.scaling[adapter]

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        raise QtoolError("a LoRA adapter cannot be merged into packed quantized weights in place",
                         "merge onto the dequantized float base and quantize again")

    def _fused_forward(self, x: torch.Tensor) -> torch.Tensor | None:
        """The base matmul and the one active adapter in one function (kernels/low_rank_autograd.py), where the base
        runs on the dequant backend, dropout is off and x is in the adapter's dtype (or autocast's); else None."""
        if self.disable_adapters or not isinstance(self.base_layer, QuantLinear):
            return None
        active = [name for name in self.active_adapters if name in self.lora_A]
        if len(active) != 1 or not isinstance(self.lora_dropout[active[0]], nn.Identity):
            return None
        name = active[0]
        a, b = self.lora_A[name].weight, self.lora_B[name].weight
        if a.dtype != x.dtype and torch.is_autocast_enabled(x.device.type):
            # what autocast does to a linear's weight: the adapters' gradients flow back through the cast
            a, b = a.to(x.dtype), b.to(x.dtype)
        return dequant_linear_plus_low_rank(self.base_layer, x, a, b, self.scaling[name])

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        fused = self._fused_forward(x)
        if fused is not None:
            return fused
        result = self.base_layer(x)
        if self.disable_adapters:
            return result
        for active_adapter in self.active_adapters:
            if active_adapter not in self.lora_A:
                continue
            lora_A = self.lora_A[active_adapter]
            lora_B = self.lora_B[active_adapter]
            dropout = self.lora_dropout[active_adapter]
            # under autocast the adapters' linears compute in autocast's dtype whatever x's is: casting x to their
            # weights' dtype first would be a copy of x that autocast casts straight back
            autocast = torch.is_autocast_enabled(x.device.type)
            branch = lora_B(lora_A(dropout(x if autocast else self._cast_input_dtype(x, lora_A.weight.dtype))))
            # the scaling as add's alpha: one pass over [M, N] where a product, then the sum, took two
            result = torch.add(result, branch.to(result.dtype), alpha=self.scaling[active_adapter])
        return result

    def __repr__(self) -> str:
        return "lora." + super().__repr__()


class QuantizedLoraLinearBf16(QuantizedLoraLinear):
    """QuantizedLoraLinear with A and B in bfloat16."""

    lora_dtype = torch.bfloat16


def lora_layer_class(lora_dtype: str = "float32") -> type[QuantizedLoraLinear]:
    """The LoRA layer class keeping A and B in `lora_dtype` (float32 or bfloat16)."""
    if lora_dtype not in LORA_DTYPES:
        raise QtoolError(f"lora_dtype {lora_dtype!r} is not supported", f"use one of {', '.join(LORA_DTYPES)}")
    return QuantizedLoraLinearBf16 if lora_dtype == "bfloat16" else QuantizedLoraLinear


def register_quantized_layers(config: LoraConfig, lora_dtype: str = "float32") -> LoraConfig:
    """Register the LoRA layer of QuantLinear and Exl2Linear on `config` (PEFT's custom-module mapping, which is
    not saved with the adapter: a config read back from disk needs it again); returns config."""
    cls = lora_layer_class(lora_dtype)
    config._register_custom_module({layer_type: cls for layer_type in QUANTIZED_LINEARS})
    return config


def linear_leaf_names(model: nn.Module) -> list[str]:
    """The last name component of every linear (nn.Linear, QuantLinear, Exl2Linear) of the model but its output
    head, in module order, once each: what all-linear targets."""
    names: dict[str, None] = {}
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if isinstance(module, (nn.Linear, *QUANTIZED_LINEARS)) and leaf not in OUTPUT_HEADS:
            names.setdefault(leaf, None)
    return list(names)


def resolve_target_modules(model: nn.Module, target_modules: str | Iterable[str]) -> list[str]:
    """`target_modules` as a list of linear leaf names: all-linear expanded, each name checked against the model."""
    available = linear_leaf_names(model)
    if isinstance(target_modules, str):
        if target_modules == ALL_LINEAR:
            if not available:
                raise QtoolError("the model has no linear layers to put LoRA adapters on")
            return available
        target_modules = [part.strip() for part in target_modules.split(",") if part.strip()]
    targets = list(target_modules)
    unknown = [name for name in targets if name not in available]
    if not targets or unknown:
        what = f"target module(s) {', '.join(unknown)} not found in the model" if unknown else "no target modules given"
        raise QtoolError(f"target_modules: {what}", f"use {ALL_LINEAR} or names among {', '.join(available)}")
    return targets


def _check_numbers(rank: int, alpha: float, dropout: float) -> None:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise QtoolError(f"rank {rank!r} is not valid", "use a positive integer such as 8 or 16")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not alpha > 0:
        raise QtoolError(f"alpha {alpha!r} is not valid", "use a positive number, e.g. twice the rank")
    if not isinstance(dropout, (int, float)) or isinstance(dropout, bool) or not 0 <= dropout < 1:
        raise QtoolError(f"dropout {dropout!r} is not valid", "use a number in [0, 1)")


def lora_config_for(model: nn.Module, rank: int, alpha: float, dropout: float, target_modules: str | Iterable[str],
                    use_rslora: bool = False, use_dora: bool = False, lora_dtype: str = "float32",
                    task_type: str | None = "CAUSAL_LM") -> LoraConfig:
    """A PEFT LoraConfig for `model` (float, GPTQ or EXL2 linears) with qtool's quantized layers registered:
    pass it to peft.get_peft_model. target_modules: all-linear or linear leaf names (q_proj, ...). use_dora only
    on float targets (DoRA needs a dense weight). lora_dtype: float32 or bfloat16 for A and B on quantized
    targets (float targets follow PEFT: the base weight's dtype); bfloat16 adapters stay so only with
    get_peft_model(..., autocast_adapter_dtype=False), as PEFT otherwise upcasts them to float32."""
    _check_numbers(rank, alpha, dropout)
    targets = resolve_target_modules(model, target_modules)
    if use_dora:
        quantized = sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                            if isinstance(module, QUANTIZED_LINEARS) and name.rsplit(".", 1)[-1] in targets})
        if quantized:
            raise QtoolError(f"use_dora is not available on quantized linears ({', '.join(quantized)})",
                             "train plain LoRA or rsLoRA on a GPTQ/EXL2 base, or DoRA on a float base")
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=float(dropout), target_modules=targets,
                        use_rslora=use_rslora, use_dora=use_dora, bias="none", task_type=task_type)
    return register_quantized_layers(config, lora_dtype)


TRAINING_BACKEND = "dequant"  # kernels/dequant_backend.py: dequantize + cuBLAS, one packed copy of the weights


def use_training_backend(model: nn.Module, registry: BackendRegistry | None = None) -> int:
    """Route every GPTQ linear of `model` that sits on a CUDA device through the dequant backend (a training step's
    thousands of rows run at cuBLAS's speed, forward and dX, and the Triton backend's repacked copy of each weight
    is dropped: one packed copy stays). Layers elsewhere keep their backend. Returns how many moved."""
    moved = 0
    for module in model.modules():
        if isinstance(module, QuantLinear) and module.qweight.device.type == "cuda":
            module.set_backend(TRAINING_BACKEND, registry)
            moved += 1
    return moved


def _adapter_dtype(adapter_dir: Path) -> str:
    """float32 or bfloat16: the dtype the adapter's tensors were saved in (from the safetensors header)."""
    with safe_open(str(adapter_dir / "adapter_model.safetensors"), framework="pt") as tensors:
        dtypes = {tensors.get_slice(name).get_dtype() for name in tensors.keys()}
    return "bfloat16" if dtypes == {"BF16"} else "float32"


def load_adapter_onto(model: nn.Module, adapter_dir: str | Path, is_trainable: bool = False) -> PeftModel:
    """The PEFT adapter saved in `adapter_dir` (adapter_config.json + adapter_model.safetensors) put onto `model`,
    a float, GPTQ or EXL2 model of the architecture it was trained on; returns the PeftModel."""
    adapter_dir = Path(adapter_dir)
    for needed in ("adapter_config.json", "adapter_model.safetensors"):
        if not (adapter_dir / needed).is_file():
            raise QtoolError(f"{adapter_dir}: no {needed}", "pass a directory written by a LoRA fine-tune (PEFT's adapter format)")
    try:
        config = LoraConfig.from_pretrained(str(adapter_dir))
    except (ValueError, TypeError, json.JSONDecodeError) as exc:
        raise QtoolError(f"{adapter_dir / 'adapter_config.json'}: not a LoRA adapter config ({exc})",
                         "pass a directory written by a LoRA fine-tune (PEFT's adapter format)") from None
    register_quantized_layers(config, _adapter_dtype(adapter_dir))
    return PeftModel.from_pretrained(model, str(adapter_dir), config=config, is_trainable=is_trainable)
