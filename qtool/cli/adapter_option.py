"""--adapter of `qtool run` and `qtool eval`: a LoRA adapter (PEFT's format, `qtool finetune`'s output) put onto the
loaded base. A float base gets it merged into its weights; a GPTQ/EXL2 base keeps its packed weights and runs the
adapter beside them (finetune.quantized_lora's layers, the same ones QLoRA trains)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def with_adapter(loaded: Any, adapter: Path | None) -> Any:
    """`loaded` (a LoadedModel) with `adapter` applied to its model; unchanged without one."""
    if adapter is None:
        return loaded
    if loaded.quantization_config is None:
        from qtool.checkpoints.adapters import apply_adapter

        loaded.model = apply_adapter(loaded.model, adapter, quantized=False)
    else:
        from qtool.finetune.quantized_lora import load_adapter_onto

        loaded.model = load_adapter_onto(loaded.model, adapter).get_base_model().eval()
    return loaded
