"""Rules that need the model or the machine: group size against each linear's width, and the estimated peak
memory of a quantization run against the free memory of the chosen device."""

from __future__ import annotations

import math
import re
from collections import defaultdict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from qtool.core.findings import Finding, error, info, warning
from qtool.config.schema import QuantConfig
from qtool.core.errors import QtoolError
from qtool.formats.exl2 import MAX_IN_FEATURES as EXL2_MAX_IN_FEATURES
from qtool.formats.exl2 import ROW_ALIGNMENT as EXL2_ROW_ALIGNMENT
from qtool.formats.exl2 import check_exl2_layout
from qtool.formats.gptq import PACK_ALIGNMENT

# The widest linear's Hessian, in float32 units: its float64 sum (two) and the float32 H read from it; then, the
# sum freed, H beside the solve's working copy, its damped copy and the Cholesky factor (quant/gptq.py; traced on
# the CPU with bench/quantize/profile_layer.py --trace-tensors).
HESSIAN_COPIES = 4
# The solve of the largest group (linears that share an input, stacked: a gated MLP's gate+up) holds, in float32,
# the stacked weights, the sweep's transposed copy and the dequantized result: another phase than the widest
# Hessian's solve, so a layer's work takes the larger of the two. The layer's codes (uint8) wait for its save.
SOLVE_WEIGHT_COPIES = 3
CODE_BYTES = 1
# Layer inputs and outputs for all calibration samples are held at once.
ACTIVATION_COPIES = 2
# Besides them, while a layer is quantized its replay (quant/replay.py) keeps every quantized linear's output and,
# per token, four hidden-size vectors more: the two norms' outputs, the attention block's and its output
# projection's inputs. For SmolLM2 with 128 x 512 tokens this puts the GPU peak at 2.11 GiB, what the H100 measured.
# An upper bound since the outputs recorded inside the attention block are dropped once it replays whole.
RECORDED_HIDDEN_COPIES = 4
# what a GPTQ run's passes over a layer record and replay (the first that fits): every module that can no longer
# change, only the finished blocks (the attention block), or nothing (each pass computes the layer again)
REPLAY_ALL, REPLAY_BLOCKS, REPLAY_NONE = "all", "blocks", "none"
# A streamed run holds, of the decoder layers, the one being quantized and the next one, read ahead while this one
# is worked on (quant/float_source.py); a redo lower down the memory ladder reads the layer from its files again.
STREAMED_LAYER_COPIES = 2
# Where the calibration activations live between layers, best first: the compute device, host memory (pinned when
# the compute device is a GPU), files on disk (memory-mapped, in a folder beside the output).
ACTIVATION_TIERS = ("device", "host", "disk")
# EXL2's weighing pass (quant/sensitivity.py) runs this many calibration windows forward through every layer and
# back, keeping each layer's inputs for them and their loss gradients in host memory.
SENSITIVITY_WINDOWS = 32
WEIGHING_LOGIT_COPIES = 3
# Quantizing the head (EXL2's head_bits) holds, besides its weights, about this many float32 copies of them: the
# solver's transposed and permuted rows, the rows it updates, the codes, the dequantized result and the error's
# difference (quant/exl2_solver.py).
HEAD_SOLVE_COPIES = 5
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
    layer_outputs: int = 0  # the out_features of the largest layer's linears, summed (what its replay records per token)
    vocab: int = 0  # the head's outputs (EXL2's weighing pass holds one window's logits and their gradient)
    largest_group_params: int = 0  # the weights of the largest set of a layer's linears that share an input

    @classmethod
    def from_config(cls, hf_config: Any, tensor_shapes: Mapping[str, tuple[int, ...]] | None = None) -> "ModelStats":
        """From a transformers config; with the checkpoint's tensor shapes the counts are exact, without them
        they are computed from the config's dimensions."""
        text = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
        hidden = int(text.hidden_size)
        heads = int(text.num_attention_heads)
        intermediate = int(getattr(text, "intermediate_size", None) or getattr(text, "n_inner", None) or 4 * hidden)
        layers = int(text.num_hidden_layers)
        vocab = int(getattr(text, "vocab_size", 0) or 0)
        if tensor_shapes:
            return replace(cls._from_shapes(tensor_shapes, layers, hidden, intermediate, heads), vocab=vocab)
        head_dim = int(getattr(text, "head_dim", None) or hidden // heads)
        kv_heads = int(getattr(text, "num_key_value_heads", None) or heads)
        attention = hidden * head_dim * (2 * heads + 2 * kv_heads)
        mlp_matrices = 2 if getattr(text, "model_type", "") in UNGATED_MLP_MODEL_TYPES else 3
        layer_params = attention + mlp_matrices * hidden * intermediate + 2 * hidden
        layer_outputs = head_dim * (heads + 2 * kv_heads) + hidden + (mlp_matrices - 1) * intermediate + hidden
        # q+k+v, or the MLP's input side (gate+up; up alone, as large as down, when ungated)
        largest_group = max(hidden * head_dim * (heads + 2 * kv_heads), (mlp_matrices - 1) * hidden * intermediate)
        embeddings = vocab * hidden * (1 if getattr(text, "tie_word_embeddings", True) else 2)
        return cls(
            params=layers * layer_params + embeddings + hidden,
            layers=layers,
            hidden=hidden,
            intermediate=intermediate,
            heads=heads,
            max_in_features=max(hidden, intermediate, heads * head_dim),
            layer_params=layer_params,
            layer_outputs=layer_outputs,
            vocab=vocab,
            largest_group_params=largest_group,
        )

    @classmethod
    def _from_shapes(cls, shapes: Mapping[str, tuple[int, ...]], layers: int, hidden: int, intermediate: int, heads: int) -> "ModelStats":
        per_layer: dict[str, int] = defaultdict(int)
        outputs: dict[str, int] = defaultdict(int)
        # linears of one block with the same input width, an upper bound on a group (q/k/v counted with o_proj)
        sharing: dict[tuple[str, int], int] = defaultdict(int)
        max_in = 0
        for name, shape in shapes.items():
            match = LAYER_INDEX.search(name)
            if match:
                per_layer[match.group(1)] += math.prod(shape)
                if len(shape) == 2 and name.endswith(".weight"):
                    max_in = max(max_in, shape[1])
                    outputs[match.group(1)] += shape[0]
                    block = name.rsplit(".", 2)[0]  # "model.layers.3.mlp" of "model.layers.3.mlp.up_proj.weight"
                    sharing[block, shape[1]] += shape[0] * shape[1]
        return cls(
            params=sum(math.prod(s) for s in shapes.values()),
            layers=layers,
            hidden=hidden,
            intermediate=intermediate,
            heads=heads,
            max_in_features=max_in or max(hidden, intermediate),
            layer_params=max(per_layer.values(), default=0),
            layer_outputs=max(outputs.values(), default=0),
            largest_group_params=max(sharing.values(), default=0),
        )


# Hidden sizes from which a GPU's calibration forwards run in bfloat16 under `compute_dtype: auto`.
BFLOAT16_FORWARDS_MIN_HIDDEN = 2048


def resolve_compute_dtype(requested: str, device: torch.device, hidden_size: int | None = None) -> torch.dtype:
    """The dtype config.compute_dtype names. auto is bfloat16 where the forwards are most of a run and bfloat16
    multiplies natively: on CPUs with bf16 dot products (about twice float32's speed there), and on GPUs for models
    of hidden size BFLOAT16_FORWARDS_MIN_HIDDEN and more (a Llama-2-7B layer on the H100: 3.3 s of float32 SIMT
    GEMMs, most of its compute, where tensor cores take a fraction of that). float32 elsewhere: emulated bfloat16
    is slower than float32, and on a GPU a small model's forwards are a small part of the time (SmolLM2 4-bit on an
    H200: ppl 24.85 in float32, 25.04 with bfloat16 forwards, for no gain in time; on this repo's CPU VM its
    bfloat16 forwards gave 24.78-24.87)."""
    if requested != "auto":
        return getattr(torch, requested)
    if device.type == "cpu" and (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()):
        return torch.bfloat16
    if device.type == "cuda" and hidden_size is not None and hidden_size >= BFLOAT16_FORWARDS_MIN_HIDDEN:
        return torch.bfloat16
    return torch.float32


def activation_dtype(config: QuantConfig, device: torch.device | str, hidden_size: int | None) -> torch.dtype:
    """The dtype a GPTQ run keeps the calibration activations in between layers: its forwards' 16-bit compute dtype
    (half the memory, and the rounding a 16-bit model's own residual stream has at inference), float32 otherwise
    and for EXL2 (whose passes run in float32)."""
    if config.output_format == "exl2":
        return torch.float32
    dtype = resolve_compute_dtype(config.compute_dtype, torch.device(device), hidden_size)
    return dtype if dtype.itemsize == 2 else torch.float32


def batch_samples(config: QuantConfig) -> int:
    """Calibration samples per forward call whose scratch the estimate counts: those of a batch_tokens set, else
    one (the default's two 2048-token samples fit within what the other components overcount: measured)."""
    if not config.calibration.batch_tokens:
        return 1
    return max(1, config.calibration.batch_tokens // config.calibration.seqlen)


def replay_note(estimate: dict[str, Any], lead: str = " (") -> str:
    """How the plan replays, for the estimate's line: nothing said for the full replay."""
    if estimate.get("replay"):
        return ""
    text = "replaying finished blocks only" if estimate.get("replay_blocks") else "no replay"
    return f"{lead}{text}" + (")" if lead.endswith("(") else "")


def estimate_peak_memory(config: QuantConfig, stats: ModelStats, device: torch.device | str = "cpu", processes: int = 1,
                         streaming: bool = False, cpu_free_bytes: int | None = None, device_free_bytes: int | None = None,
                         tier: str | None = None, weighing: bool = True) -> dict[str, Any]:
    """Bytes a quantization run holds at its peak, and where it keeps the calibration activations.

    The float32 model on the CPU (`streaming`: only what lies outside the decoder layers, the layer being quantized
    and the next layer being read ahead); where the work runs, one layer, the Hessians or (the larger) the largest
    group's solve copies, the layer's codes and one sample's forward scratch;
    and the activations: the layer's inputs and outputs for every sample, and what the replay records while the
    layer is quantized. They go to the first plan that fits the free memory given (None: assumed to fit): on the
    compute device with the replay, there without it (each pass recomputes the layer instead), in host memory
    with, then without the replay, and last on disk (host memory then holds the outputs being built).

    EXL2 (config.output_format) has no replay. With `weighing` (its linears weighed in this run, not taken from a
    given measurement) its weighing pass runs first and holds, for up to SENSITIVITY_WINDOWS windows, every
    layer's inputs, the last layer's outputs and the windows' loss gradients, and while at the head its weights
    and one window's logits where the work runs. Those inputs go to a tier of their own (`weighing_tier`), the
    first of the same ones that fits the free memory given: on the compute device, in host memory, on disk (host
    memory then holds the gradients). The head quantized (config.head_bits) holds its weights and the solve's
    copies of them where the work runs. The passes come one after the other: each pool's peak is the larger one.

    With several processes (`--nproc`) the figures are one process's (its share of the samples; device_bytes per
    GPU) except cpu_bytes, the host's total. `tier` (one of ACTIVATION_TIERS) keeps every pass to that tier.
    Returns the components, the plan (`activation_tier`, `replay`, `weighing_tier`: None without a weighing pass),
    cpu_bytes, device_bytes and disk_bytes, and the weighing pass's own three (`weighing_peaks`, None without it)."""
    device = torch.device(device)
    on_gpu = device.type != "cpu"
    exl2 = config.output_format == "exl2"
    samples, seqlen = math.ceil(config.calibration.samples / processes), config.calibration.seqlen
    tokens = samples * seqlen
    layer = stats.layer_params * FLOAT32_BYTES
    outside_layers = (stats.params - stats.layers * stats.layer_params) * FLOAT32_BYTES
    components = {
        "weights": outside_layers + STREAMED_LAYER_COPIES * layer if streaming else stats.params * FLOAT32_BYTES,
        "layer": layer if on_gpu else 0,  # on the CPU it is in weights
        "activations": tokens * stats.hidden * activation_dtype(config, device, stats.hidden).itemsize * ACTIVATION_COPIES,
        "recordings": 0 if exl2 else tokens * (stats.layer_outputs + RECORDED_HIDDEN_COPIES * stats.hidden) * FLOAT32_BYTES,
        # replaying finished blocks only (the attention block once its linears are done): one hidden-sized recording,
        # in the activations' dtype (its projection's inputs, kept the pass before, are freed as it is made)
        "block_recordings": 0 if exl2 else tokens * stats.hidden * activation_dtype(config, device, stats.hidden).itemsize,
        "hessians": stats.max_in_features**2 * FLOAT32_BYTES * HESSIAN_COPIES,
        "solve": stats.largest_group_params * FLOAT32_BYTES * SOLVE_WEIGHT_COPIES,
        "codes": stats.layer_params * CODE_BYTES,
        # one batch of samples through the layer: MLP intermediates and the attention scores
        "forward_scratch": batch_samples(config) * seqlen * max(2 * stats.intermediate, stats.heads * seqlen) * FLOAT32_BYTES,
    }
    windows = min(config.calibration.samples, SENSITIVITY_WINDOWS) if exl2 and weighing else 0
    if exl2:
        # every layer's inputs and the last layer's outputs, plus one gradient per window
        components["weighing"] = windows * seqlen * stats.hidden * FLOAT32_BYTES * (stats.layers + 2)
        # one window at a time through the head: its logits, their log-softmax and its gradient
        components["weighing_head"] = seqlen * stats.vocab * FLOAT32_BYTES * WEIGHING_LOGIT_COPIES if windows else 0
        head = stats.vocab * stats.hidden * FLOAT32_BYTES
        # the head's weights where the work runs (on the CPU they are in weights), for its gradients or its quantization
        components["head"] = head if on_gpu and (windows or config.head_bits) else 0
        components["head_quantization"] = (head * HEAD_SOLVE_COPIES + stats.hidden**2 * FLOAT32_BYTES * HESSIAN_COPIES) if config.head_bits else 0
    work = components["layer"] + max(components["hessians"], components["solve"]) + components["codes"] + components["forward_scratch"]

    def fits(host: int, device_bytes: int) -> bool:
        return ((device_free_bytes is None or device_bytes <= device_free_bytes)
                and (cpu_free_bytes is None or (components["weights"] + host) * processes <= cpu_free_bytes))

    def allowed(candidate: str) -> bool:  # on the CPU the compute device is host memory
        return tier is None or candidate == (tier if on_gpu or tier != "device" else "host")

    tiers = [t for t in (("device",) if on_gpu else ()) + ("host", "disk") if allowed(t)]
    # the measuring and quantizing passes (GPTQ's one pass): (tier, replay) -> host, device, disk bytes
    replays = (REPLAY_NONE,) if exl2 else (REPLAY_ALL, REPLAY_BLOCKS, REPLAY_NONE)
    plans = [(t, replay) for t in tiers for replay in (replays if t != "disk" else (REPLAY_NONE,))]
    head_work = (components["head"] + components["head_quantization"]) if exl2 and config.head_bits else 0
    for plan_tier, replay in plans:
        held = components["activations"] + {REPLAY_ALL: components["recordings"], REPLAY_BLOCKS: components["block_recordings"]}.get(replay, 0)
        if plan_tier == "disk":
            held = components["activations"] // ACTIVATION_COPIES  # the outputs of the layer being quantized
        passes_device = max(work, head_work) + (held if plan_tier == "device" else 0) if on_gpu else 0
        passes_host = (0 if plan_tier == "device" else held) + (0 if on_gpu else max(work, head_work))
        passes_disk = components["activations"] if plan_tier == "disk" else 0
        if fits(passes_host, passes_device):
            break

    # the weighing pass: its tier -> host, device, disk bytes
    weighing_tier, weighing_host, weighing_device, weighing_disk = None, 0, 0, 0
    if windows:
        window_bytes = windows * seqlen * stats.hidden * FLOAT32_BYTES
        head_visit = components["head"] + components["weighing_head"]
        for weighing_tier in tiers:
            weighing_disk = window_bytes * (stats.layers + 1) if weighing_tier == "disk" else 0  # all but the gradients
            kept = components["weighing"] - weighing_disk
            weighing_device = max(work, head_visit) + (kept if weighing_tier == "device" else 0) if on_gpu else 0
            weighing_host = (0 if weighing_tier == "device" else kept) + (0 if on_gpu else work + components["weighing_head"])
            if fits(weighing_host, weighing_device):
                break
    # the weighing pass's own peaks (the figures above are the larger of them and the later passes')
    weighing_peaks = {"cpu_bytes": components["weights"] + weighing_host, "device_bytes": weighing_device, "disk_bytes": weighing_disk} if windows else None
    return {"device": str(device), "components": components, "streaming": streaming, "samples": samples, "activation_tier": plan_tier,
            "replay": replay == REPLAY_ALL, "replay_blocks": replay == REPLAY_BLOCKS, "weighing_tier": weighing_tier, "weighing_peaks": weighing_peaks,
            "cpu_bytes": (components["weights"] + max(passes_host, weighing_host)) * processes,
            "device_bytes": max(passes_device, weighing_device), "disk_bytes": max(passes_disk, weighing_disk) * processes}


def cpu_free_memory() -> int | None:
    """MemAvailable of /proc/meminfo in bytes, or None where it cannot be read."""
    try:
        for line in MEMINFO.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def cuda_index(device: torch.device) -> int:
    """The index of a CUDA device, the current one for a device named without one ("cuda")."""
    return torch.cuda.current_device() if device.index is None else device.index


def device_free_memory(device: torch.device) -> int | None:
    """What a CUDA device can still give this process: its free memory, and no more than a per-process cap
    (torch.cuda.set_per_process_memory_fraction) leaves above what the caching allocator holds. None elsewhere."""
    if device.type == "cuda" and torch.cuda.is_available():
        device = torch.device("cuda", cuda_index(device))  # the fraction query wants an index
        free, total = torch.cuda.mem_get_info(device)
        get_fraction = getattr(torch.cuda, "get_per_process_memory_fraction", None)  # newer torch only
        fraction = get_fraction(device) if get_fraction is not None else 1.0
        if fraction < 1.0:
            free = min(free, max(0, int(fraction * total) - torch.cuda.memory_reserved(device)))
        return int(free)
    return None


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _largest_fitting(fits: Callable[[int], bool], below: int, lowest: int) -> int | None:
    """The largest n in lowest..below-1 with fits(n) (fits grows false with n), or None."""
    if below <= lowest or not fits(lowest):
        return None
    low, high = lowest, below - 1
    while low < high:
        middle = (low + high + 1) // 2
        low, high = (middle, high) if fits(middle) else (low, middle - 1)
    return low


def _fewer_samples_fix(config: QuantConfig, fits: Callable[[QuantConfig], bool], device: torch.device) -> str:
    """Name the largest samples (or seqlen) whose estimate fits, and the other device."""
    calibration = config.calibration
    options = []
    samples = _largest_fitting(lambda n: fits(replace(config, calibration=replace(calibration, samples=n))), calibration.samples, 1)
    if samples is not None:
        options.append(f"--samples {samples}")
    seqlen = _largest_fitting(lambda n: fits(replace(config, calibration=replace(calibration, seqlen=n))), calibration.seqlen, 8)
    if seqlen is not None:
        options.append(f"--seqlen {seqlen}")
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
    streaming: bool = False,
    weighing: bool = True,
) -> list[Finding]:
    """Compare the estimated peak memory (estimate_peak_memory, its plan chosen for this free memory) with the
    free memory (read from the machine unless given)."""
    device = torch.device(device)
    cpu_free = cpu_free_bytes if cpu_free_bytes is not None else cpu_free_memory()
    device_free = None
    if device.type != "cpu":
        device_free = device_free_bytes if device_free_bytes is not None else device_free_memory(device)

    def estimate_for(candidate: QuantConfig) -> dict[str, Any]:
        return estimate_peak_memory(candidate, stats, device, processes, streaming, cpu_free, device_free, weighing=weighing)

    estimate = estimate_for(config)
    found: list[Finding] = []
    pools = [("cpu", "cpu_bytes", cpu_free)]
    if device.type != "cpu":
        pools.append((str(device), "device_bytes", device_free))
    for pool, key, free in pools:
        needed = estimate[key]
        if free is None:
            found.append(info(f"memory ({pool})", f"estimated peak {format_bytes(needed)}; free memory unknown"))
        elif needed > free:
            weights_alone = pool == "cpu" and estimate["components"]["weights"] > free
            fix = (
                "the float32 model alone does not fit: use a machine with more memory"
                if weights_alone
                else _fewer_samples_fix(config, lambda candidate, key=key, free=free: estimate_for(candidate)[key] <= free, device)
            )
            found.append(error(
                f"memory ({pool})",
                f"estimated peak {format_bytes(needed)} exceeds the {format_bytes(free)} free",
                fix,
            ))
        else:
            places = {"device": f"on {device}", "host": "in host memory", "disk": "on disk"}
            weighing_place = f"; the weighing pass's layer inputs {places[estimate['weighing_tier']]}" if estimate["weighing_tier"] else ""
            found.append(info(f"memory ({pool})", f"estimated peak {format_bytes(needed)} of {format_bytes(free)} free "
                                                  f"(activations {places[estimate['activation_tier']]}{replay_note(estimate, ', ')}"
                                                  f"{weighing_place})"))
    return found
