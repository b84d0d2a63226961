"""Rules that need the model or the machine: group size against each linear's width, and the estimated peak
memory of a quantization run against the free memory of the chosen device."""

from __future__ import annotations

import math
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

from qtool.core.findings import Finding, error, info, warning
from qtool.config.schema import QuantConfig
from qtool.core.errors import QtoolError
from qtool.formats.exl2 import MAX_IN_FEATURES as EXL2_MAX_IN_FEATURES
from qtool.formats.exl2 import ROW_ALIGNMENT as EXL2_ROW_ALIGNMENT
from qtool.formats.exl2 import check_exl2_layout
from qtool.formats.gptq import PACK_ALIGNMENT

# The widest linear's Hessian: its float64 sum (two float32's worth), the float32 Hessian read from it and its
# inverse Cholesky factor, side by side during the solve.
HESSIAN_COPIES = 4
# Layer inputs and outputs for all calibration samples are held at once.
ACTIVATION_COPIES = 2
FLOAT32_BYTES = 4
# MLPs of these families have two matrices (up, down); the others (Llama, Mistral, Qwen...) are gated: three.
UNGATED_MLP_MODEL_TYPES = ("gpt2", "gpt_neox", "gptj", "opt", "bloom", "falcon", "phi", "starcoder2", "gpt_bigcode")
LAYER_INDEX = re.compile(r"\.(\d+)\.")
MEMINFO = Path("/proc/meminfo")


def is_packable(in_features: int, out_features: int) -> bool:
    """Whether GPTQ can pack a linear of this shape; the others stay float16."""
    return in_features % PACK_ALIGNMENT == 0 and out_features % PACK_ALIGNMENT == 0


def is_exl2_storable(in_features: int, out_features: int) -> bool:
    """Whether EXL2 can hold a linear of this shape (check_exl2_layout with one group over all rows)."""
    try:
        check_exl2_layout(in_features, out_features, (8,), (in_features,))
    except QtoolError:
        return False
    return True


def name_pattern(name: str) -> str:
    """model.layers.7.mlp.up_proj -> model.layers.*.mlp.up_proj, to report one finding for all layers."""
    return LAYER_INDEX.sub(".*.", name)


def _where(names: list[str]) -> str:
    patterns = sorted({name_pattern(n) for n in names})
    shown = ", ".join(patterns[:4]) + (f" and {len(patterns) - 4} more" if len(patterns) > 4 else "")
    return f"{shown} ({len(names)} linear{'s' if len(names) != 1 else ''})"


def validate_for_model(config: QuantConfig, linear_shapes: Mapping[str, tuple[int, int]]) -> list[Finding]:
    """Check the group size against the linears to quantize; `linear_shapes` maps each linear's name to
    (in_features, out_features)."""
    exl2 = config.output_format == "exl2"
    storable = is_exl2_storable if exl2 else is_packable
    why_not = f"has an input width EXL2 cannot store (multiples of {EXL2_ROW_ALIGNMENT} up to {EXL2_MAX_IN_FEATURES})" if exl2 else f"is not a multiple of {PACK_ALIGNMENT}"
    unpackable: dict[tuple[int, int], list[str]] = defaultdict(list)
    by_width: dict[int, list[str]] = defaultdict(list)
    for name, (in_features, out_features) in linear_shapes.items():
        if storable(in_features, out_features):
            by_width[in_features].append(name)
        else:
            unpackable[(in_features, out_features)].append(name)
    found: list[Finding] = []
    for (in_features, out_features), names in sorted(unpackable.items()):
        found.append(warning(
            _where(names),
            f"shape {in_features} in x {out_features} out {why_not}: the layer stays float16",
            "nothing to do unless these layers must be quantized",
        ))
    if not by_width:
        found.append(error(
            "model",
            "has no quantizable linear layers" + ((" (none can be stored in EXL2)" if exl2 else " (none has widths that are multiples of 32)") if unpackable else ""),
            "qtool quantizes the nn.Linear layers of the decoder blocks; check that PATH is a decoder language model",
        ))
        return found
    group_size = config.group_size
    if group_size == -1 or exl2:  # EXL2 picks its groups per linear
        return found
    for width, names in sorted(by_width.items()):
        full, rest = divmod(width, group_size)
        if group_size > width:
            found.append(warning(
                _where(names),
                f"group size {group_size} is larger than the {width} input columns: one group per row",
                f"that is the same as group_size -1; use a group size <= {width} for finer groups",
            ))
        elif rest:
            found.append(info(_where(names), f"{width} = {full}×{group_size} + {rest}: last group has {rest} columns"))
    return found


@dataclass(frozen=True)
class ModelStats:
    """What the memory estimate needs to know about a model."""

    params: int
    layers: int
    hidden: int
    intermediate: int
    heads: int
    max_in_features: int
    layer_params: int  # the largest decoder layer

    @classmethod
    def from_config(cls, hf_config: Any, tensor_shapes: Mapping[str, tuple[int, ...]] | None = None) -> "ModelStats":
        """From a transformers config; with the checkpoint's tensor shapes the counts are exact, without them
        they are computed from the config's dimensions."""
        text = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
        hidden = int(text.hidden_size)
        heads = int(text.num_attention_heads)
        intermediate = int(getattr(text, "intermediate_size", None) or getattr(text, "n_inner", None) or 4 * hidden)
        layers = int(text.num_hidden_layers)
        if tensor_shapes:
            return cls._from_shapes(tensor_shapes, layers, hidden, intermediate, heads)
        head_dim = int(getattr(text, "head_dim", None) or hidden // heads)
        kv_heads = int(getattr(text, "num_key_value_heads", None) or heads)
        attention = hidden * head_dim * (2 * heads + 2 * kv_heads)
        mlp_matrices = 2 if getattr(text, "model_type", "") in UNGATED_MLP_MODEL_TYPES else 3
        layer_params = attention + mlp_matrices * hidden * intermediate + 2 * hidden
        embeddings = int(text.vocab_size) * hidden * (1 if getattr(text, "tie_word_embeddings", True) else 2)
        return cls(
            params=layers * layer_params + embeddings + hidden,
            layers=layers,
            hidden=hidden,
            intermediate=intermediate,
            heads=heads,
            max_in_features=max(hidden, intermediate, heads * head_dim),
            layer_params=layer_params,
        )

    @classmethod
    def _from_shapes(cls, shapes: Mapping[str, tuple[int, ...]], layers: int, hidden: int, intermediate: int, heads: int) -> "ModelStats":
        per_layer: dict[str, int] = defaultdict(int)
        max_in = 0
        for name, shape in shapes.items():
            match = LAYER_INDEX.search(name)
            if match:
                per_layer[match.group(1)] += math.prod(shape)
                if len(shape) == 2 and name.endswith(".weight"):
                    max_in = max(max_in, shape[1])
        return cls(
            params=sum(math.prod(s) for s in shapes.values()),
            layers=layers,
            hidden=hidden,
            intermediate=intermediate,
            heads=heads,
            max_in_features=max_in or max(hidden, intermediate),
            layer_params=max(per_layer.values(), default=0),
        )


def estimate_peak_memory(config: QuantConfig, stats: ModelStats, device: torch.device | str = "cpu", processes: int = 1) -> dict[str, Any]:
    """Bytes a quantization run holds at its peak: the float32 model on the CPU, and where the work runs one
    layer, the calibration activations, the Hessians and one sample's forward scratch. With several processes
    (`--nproc`) the figures are one process's (its share of the samples; device_bytes per GPU) except cpu_bytes,
    the host's total: every process holds the float model."""
    device = torch.device(device)
    samples, seqlen = math.ceil(config.calibration.samples / processes), config.calibration.seqlen
    components = {
        "weights": stats.params * FLOAT32_BYTES,
        "layer": stats.layer_params * FLOAT32_BYTES if device.type != "cpu" else 0,  # on the CPU it is in weights
        "activations": samples * seqlen * stats.hidden * FLOAT32_BYTES * ACTIVATION_COPIES,
        "hessians": stats.max_in_features**2 * FLOAT32_BYTES * HESSIAN_COPIES,
        # one sample through the layer: MLP intermediates and the attention scores
        "forward_scratch": seqlen * max(2 * stats.intermediate, stats.heads * seqlen) * FLOAT32_BYTES,
    }
    work = components["layer"] + components["activations"] + components["hessians"] + components["forward_scratch"]
    if device.type == "cpu":
        return {"device": str(device), "components": components, "cpu_bytes": (components["weights"] + work) * processes, "device_bytes": 0}
    return {"device": str(device), "components": components, "cpu_bytes": components["weights"] * processes, "device_bytes": work}


def cpu_free_memory() -> int | None:
    """MemAvailable of /proc/meminfo in bytes, or None where it cannot be read."""
    try:
        for line in MEMINFO.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def device_free_memory(device: torch.device) -> int | None:
    if device.type == "cuda" and torch.cuda.is_available():
        return int(torch.cuda.mem_get_info(device)[0])
    return None


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _fewer_samples_fix(config: QuantConfig, stats: ModelStats, needed: int, free: int, device: torch.device) -> str:
    """Name the largest samples (or seqlen) that would fit, and the other device."""
    samples, seqlen = config.calibration.samples, config.calibration.seqlen
    per_sample = seqlen * stats.hidden * FLOAT32_BYTES * ACTIVATION_COPIES
    others = needed - samples * per_sample
    options = []
    if free > others:
        fitting_samples = (free - others) // per_sample
        if fitting_samples >= 1:
            options.append(f"--samples {fitting_samples}")
        fitting_seqlen = (free - others) // (samples * stats.hidden * FLOAT32_BYTES * ACTIVATION_COPIES)
        if fitting_seqlen >= 8:
            options.append(f"--seqlen {fitting_seqlen}")
    if device.type == "cpu" and torch.cuda.is_available():
        options.append("--device cuda")
    elif device.type != "cpu":
        options.append("--device cpu")
    return "use " + " or ".join(options) if options else "use a machine with more memory"


def validate_for_hardware(
    config: QuantConfig,
    stats: ModelStats,
    device: torch.device | str,
    cpu_free_bytes: int | None = None,
    device_free_bytes: int | None = None,
    processes: int = 1,
) -> list[Finding]:
    """Compare the estimated peak memory with the free memory (read from the machine unless given)."""
    device = torch.device(device)
    estimate = estimate_peak_memory(config, stats, device, processes)
    cpu_free = cpu_free_bytes if cpu_free_bytes is not None else cpu_free_memory()
    found: list[Finding] = []
    pools = [("cpu", estimate["cpu_bytes"], cpu_free)]
    if device.type != "cpu":
        free = device_free_bytes if device_free_bytes is not None else device_free_memory(device)
        pools.append((str(device), estimate["device_bytes"], free))
    for pool, needed, free in pools:
        if free is None:
            found.append(info(f"memory ({pool})", f"estimated peak {format_bytes(needed)}; free memory unknown"))
        elif needed > free:
            weights_alone = pool == "cpu" and estimate["components"]["weights"] > free
            fix = (
                "the float32 model alone does not fit: use a machine with more memory"
                if weights_alone
                else _fewer_samples_fix(config, stats, needed, free, device)
            )
            found.append(error(
                f"memory ({pool})",
                f"estimated peak {format_bytes(needed)} exceeds the {format_bytes(free)} free",
                fix,
            ))
        else:
            found.append(info(f"memory ({pool})", f"estimated peak {format_bytes(needed)} of {format_bytes(free)} free"))
    return found
