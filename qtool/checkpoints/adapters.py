"""A PEFT LoRA adapter (adapter_config.json + adapter_model.safetensors, as `qtool finetune` writes) applied to a
loaded base for `qtool eval` and `qtool run`: loaded with PEFT and merged into a float base's weights, so every
path that runs the model (the engine included) sees plain linears."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qtool.core.errors import QtoolError

ADAPTER_CONFIG = "adapter_config.json"


def apply_adapter(model: Any, adapter: str | Path, quantized: bool) -> Any:
    """`model` with the adapter of directory `adapter` merged into its weights."""
    from peft import PeftModel

    directory = Path(adapter).expanduser()
    if not (directory / ADAPTER_CONFIG).is_file():
        raise QtoolError(f"--adapter {adapter}: no {ADAPTER_CONFIG} in it", "pass the output directory of `qtool finetune --method lora`")
    if quantized:
        raise QtoolError(f"--adapter {adapter}: merging an adapter into a GPTQ/EXL2 base is not supported here",
                         "pass the float base model with --adapter")
    try:
        peft_model = PeftModel.from_pretrained(model, str(directory))
    except (ValueError, KeyError, RuntimeError, OSError) as exc:
        raise QtoolError(f"--adapter {adapter}: cannot be applied to this model: {str(exc).splitlines()[0]}",
                         "pass the base model the adapter was trained on") from exc
    return peft_model.merge_and_unload().eval()
