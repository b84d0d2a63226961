"""Quantize the linears of one decoder layer in the registry's order (true-sequential: each group sees the
outputs of the groups quantized before it) and produce the layer's outputs for the next layer."""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, replace
from typing import Callable

import torch
from torch import nn

from qtool.config.schema import QuantConfig
from qtool.kernels.profiled_range import HESSIAN_RANGE, LAYER_BATCH_RANGE, SOLVE_RANGE, profiled_range
from qtool.models.rules import resolve_compute_dtype
from qtool.quant.distributed import SINGLE_PROCESS, Collective
from qtool.quant.forward_dtype import weights_in_forward_dtype
from qtool.quant.gptq import gptq_quantize
from qtool.quant.hessian import HessianAccumulator
from qtool.quant.refine import refine_group_scales
from qtool.quant.replay import ProjectionRecorder, RecordingModule, ReplayModule, StopLayerForward, swapped_modules
from qtool.quant.rtn import rtn_quantize
from qtool.formats.quantized_weight import QuantizedWeight

log = logging.getLogger(__name__)

# Runs the layer on batch i of its inputs and returns the layer's output hidden states.
LayerRunner = Callable[[int], torch.Tensor]


@dataclass
class ModuleReport:
    name: str
    in_features: int
    out_features: int
    error: float
    damp_percent: float
    seconds: float


def min_zero_for(config: QuantConfig) -> int:
    # GPTQ v1 files store zero - 1, so an asym zero point of 0 cannot be written there.
    return 1 if (not config.sym and config.checkpoint_format == "gptq") else 0


def solve_group(
    linears: list[tuple[str, nn.Linear]], hessian: torch.Tensor | None, config: QuantConfig
) -> tuple[dict[str, QuantizedWeight], list[ModuleReport]]:
    """Quantize linears that share one input (hence one Hessian) in one solve: GPTQ treats output rows
    independently, so stacking their weights gives each the result it would get alone, at a fraction of the
    Python overhead."""
    weights = [linear.weight.data for _, linear in linears]
    # one float32 linear's own weight as it is: the solvers copy what they change (no third copy of a 7B's
    # down_proj); a weight held in the forward dtype is widened once, several straight into one float32 stack
    if len(weights) == 1:
        stacked = weights[0].float()
    else:
        stacked = torch.empty(sum(w.shape[0] for w in weights), weights[0].shape[1], dtype=torch.float32, device=weights[0].device)
        torch.cat(weights, dim=0, out=stacked)
    started = time.perf_counter()
    common = dict(bits=config.bits, group_size=config.group_size, sym=config.sym, mse=config.mse, min_zero=min_zero_for(config))
    if config.method == "rtn" or hessian is None:
        result = rtn_quantize(stacked, **common)
    else:
        result = gptq_quantize(
            stacked,
            hessian,
            desc_act=config.desc_act,
            static_groups=config.static_groups,
            damp_percent=config.damp_percent,
            damp_auto_increment=config.damp_auto_increment,
            **common,
        )
    if config.refine_scales and hessian is not None:
        # the solver's dequantized weight goes first: the refit makes its own (a 7B's gate+up: 0.34 GiB each)
        result = replace(result, dequantized=None)
        refined, dequantized = refine_group_scales(stacked, result.quantized, hessian)
        result = replace(result, quantized=refined, dequantized=dequantized)
    seconds = time.perf_counter() - started
    quantized: dict[str, QuantizedWeight] = {}
    reports: list[ModuleReport] = []
    start = 0
    q = result.quantized
    for (name, linear), weight in zip(linears, weights):
        rows = slice(start, start + weight.shape[0])
        start += weight.shape[0]
        quantized[name] = QuantizedWeight(
            codes=q.codes[rows].contiguous(),
            scales=q.scales[:, rows].contiguous(),
            zeros=q.zeros[:, rows].contiguous(),
            g_idx=q.g_idx.clone(),
            bits=q.bits,
            group_size=q.group_size,
        )
        # The layer goes on with the weights it will have once loaded: the fake-quantized ones.
        linear.weight.data = result.dequantized[rows].to(linear.weight.dtype).to(linear.weight.device)
        share = weight.shape[0] / stacked.shape[0]
        reports.append(ModuleReport(name, linear.in_features, linear.out_features, float(getattr(result, "error", 0.0)) * share, float(getattr(result, "damp_percent", 0.0)), seconds * share))
    return quantized, reports


def compute_context(dtype: torch.dtype, device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast for the calibration forwards when the compute dtype is not float32: matmuls and attention in that
    dtype, norms in float32, the weights untouched (the solvers read float32; quant.forward_dtype keeps the ones
    the compute dtype holds exactly in it meanwhile). The hidden states between layers are kept in a 16-bit
    compute dtype too (models.rules.activation_dtype), so the residual adds run in it."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def _accumulator(dtype: torch.dtype, group: list[tuple[str, nn.Linear]]) -> HessianAccumulator:
    linear = group[0][1]
    # float64 sums: the Hessian is then the same whether one process saw every batch or several saw some each
    return HessianAccumulator(linear.in_features, device=linear.weight.device, product_dtype=dtype, float64_sum=True)


def solve_shared(group: list[tuple[str, nn.Linear]], accumulator: HessianAccumulator | None, config: QuantConfig,
                 collective: Collective) -> tuple[dict[str, QuantizedWeight], list[ModuleReport]]:
    """solve_group once for the whole process group: the Hessian summed over the processes, solved on rank 0,
    the fake-quantized weights it leaves in the linears broadcast to the others (which return nothing: rank 0
    writes)."""
    hessian = None
    if accumulator is not None:
        accumulator.all_reduce(collective.sum_)
        hessian = _usable_hessian(accumulator, group) if collective.is_main else None
    with profiled_range(SOLVE_RANGE):
        quantized, reports = solve_group(group, hessian, config) if collective.is_main else ({}, [])
    for _, linear in group:
        collective.broadcast_(linear.weight.data)
    return quantized, reports


def _hessian_hook(accumulator: HessianAccumulator, stop: bool, keep_inputs: list[torch.Tensor] | None = None, store_device: torch.device | None = None):
    def hook(module: nn.Module, args: tuple) -> None:
        # One product per sample, in sample order: the Hessian is then the same however the samples are batched
        # (the memory ladder's one-sample batches) or split between processes.
        inputs = args[0].detach()
        with profiled_range(HESSIAN_RANGE):
            for sample in (inputs if inputs.dim() == 3 else (inputs,)):
                accumulator.add_batch(sample)
        if keep_inputs is not None:
            keep_inputs.append(args[0].detach().to(store_device))
        if stop:
            raise StopLayerForward

    return hook


def _usable_hessian(accumulator: HessianAccumulator, group: list[tuple[str, nn.Linear]]) -> torch.Tensor | None:
    """The group's Hessian, or None (round to nearest) when no calibration token reached it, e.g. an MoE expert
    the router never picked."""
    if accumulator.num_tokens == 0:
        log.warning("%s: no calibration token reached this input; rounding to nearest", ", ".join(n for n, _ in group))
        return None
    return accumulator.take_hessian()


def _final_children(
    layer: nn.Module, call_order: list[str], quantized_names: set[str], all_names: set[str]
) -> list[str]:
    """Direct children of the layer whose output can no longer change: the longest run, in call order, of children
    whose linears are all quantized (everything before them then is too)."""
    final = []
    for child in call_order:
        inside = {name for name in all_names if name.startswith(child + ".")}
        if not inside <= quantized_names:
            break
        final.append(child)
    return final


def quantize_layer(
    layer: nn.Module,
    groups: list[list[tuple[str, nn.Linear]]],
    num_batches: int,
    run_batch: LayerRunner,
    config: QuantConfig,
    store_device: torch.device,
    replay: bool = True,
    replay_blocks: bool = False,
    on_group: Callable[[str], None] | None = None,
    output_projections: tuple[tuple[str, str], ...] = (),
    collective: Collective = SINGLE_PROCESS,
    float_hessians: dict[str, HessianAccumulator] | None = None,
    hidden_size: int | None = None,
    narrow_weights: bool = True,
) -> tuple[dict[str, QuantizedWeight], list[ModuleReport], list[torch.Tensor]]:
    """Quantize every group of `layer` (names relative to the layer) and return (quantized weights, reports, the
    layer's outputs per batch). `hidden_size` (the model's) is what `compute_dtype: auto` looks at on a GPU.

    True-sequential: one pass per group, stopped as soon as the group's input is seen. Linears quantized in an
    earlier group, and whole children of the layer that can no longer change (the input norm, then the attention
    block once its linears are done), are recorded the next time they run and replayed afterwards.
    `output_projections` ((child, its last linear), relative names) lets a child that became final be recorded
    without computing it: its linear applied to the inputs seen while that linear was quantized (ProjectionRecorder).
    With `replay_blocks` (and not `replay`: the memory for one hidden-sized recording only) just the layer's
    children that hold linears are recorded once finished (the attention block, through its projection), not the
    linears inside them nor the children without linears (the norms, cheap to compute again).
    Otherwise: one pass gathers every group's Hessian from the float layer.

    With several processes (`collective`), `run_batch` runs this process's batches, each group's Hessian is summed
    over the processes and solved on rank 0 (solve_shared); only rank 0 returns weights and reports.

    `float_hessians` (group name -> accumulator, kept on the CPU), given for a layer whose inputs are the float
    model's (layer 0): the Hessians of the groups whose inputs are still those of the float layer (the first group
    in true-sequential order; every group without it) are taken from there when present, skipping their pass, and
    stored there otherwise, for the next job on the same model and calibration.

    `narrow_weights`: while the layer is worked on, the group linears' weights that the forward dtype holds exactly
    are kept in it (qtool.quant.forward_dtype), the fake-quantized ones after their solve too; the results are
    the same."""
    dtype = resolve_compute_dtype(config.compute_dtype, next(layer.parameters()).device, hidden_size)
    linears = [linear for group in groups for _, linear in group] if narrow_weights else []
    with weights_in_forward_dtype(linears, dtype):
        return _quantize_layer(layer, groups, num_batches, run_batch, config, store_device, replay, replay_blocks, on_group,
                               output_projections, collective, float_hessians, dtype)


def _quantize_layer(layer: nn.Module, groups: list[list[tuple[str, nn.Linear]]], num_batches: int, run_batch: LayerRunner,
                    config: QuantConfig, store_device: torch.device, replay: bool, replay_blocks: bool,
                    on_group: Callable[[str], None] | None, output_projections: tuple[tuple[str, str], ...],
                    collective: Collective, float_hessians: dict[str, HessianAccumulator] | None,
                    dtype: torch.dtype) -> tuple[dict[str, QuantizedWeight], list[ModuleReport], list[torch.Tensor]]:
    quantized: dict[str, QuantizedWeight] = {}
    reports: list[ModuleReport] = []
    recorders: dict[str, RecordingModule] = {}
    call_order: list[str] = []
    children = dict(layer.named_children())
    all_names = {name for group in groups for name, _ in group}
    device = next(layer.parameters()).device
    projection = {child: linear for child, linear in output_projections if child in children and linear in all_names}
    projection_of = {linear: child for child, linear in projection.items()}
    projection_inputs: dict[str, list[torch.Tensor]] = {}  # child -> inputs of its output linear, per batch

    def note_call(child: str):
        def hook(module: nn.Module, args: tuple) -> None:
            if child not in call_order:
                call_order.append(child)

        return hook

    def run_pass(hooked: list[tuple[nn.Module, Callable]], swaps: dict[str, nn.Module]) -> list[torch.Tensor]:
        handles = [module.register_forward_pre_hook(hook) for module, hook in hooked]
        handles += [module.register_forward_pre_hook(note_call(name)) for name, module in children.items()]
        outputs: list[torch.Tensor] = []
        try:
            with swapped_modules(layer, swaps), torch.inference_mode(), compute_context(dtype, device):
                for i in range(num_batches):
                    try:
                        with profiled_range(LAYER_BATCH_RANGE):
                            outputs.append(run_batch(i))
                    except StopLayerForward:
                        pass
        finally:
            for handle in handles:
                handle.remove()
        return outputs

    def next_swaps(record: bool = True) -> dict[str, nn.Module]:
        """What is final and recorded replays; what became final since the last pass records (unless this is the
        last pass, whose recordings nothing would replay)."""
        if not replay and not replay_blocks:
            return {}
        final = set(_final_children(layer, call_order, set(quantized), all_names)) | set(quantized)
        if not replay:  # the finished blocks only: direct children that hold linears
            final = {name for name in final if name in children and any(linear.startswith(name + ".") for linear in all_names)}
        swaps: dict[str, nn.Module] = {}
        replayed: set[str] = set()
        for name in sorted(final):
            recorder = recorders.get(name)
            if recorder is None and not record:
                continue
            if recorder is None:
                if name in projection_inputs:
                    linear = layer.get_submodule(projection[name])
                    recorder = ProjectionRecorder(layer.get_submodule(name), linear, projection_inputs.pop(name), store_device)
                else:
                    recorder = RecordingModule(layer.get_submodule(name), store_device)
                recorders[name] = recorder
                swaps[name] = recorder
            elif recorder.outputs:
                swaps[name] = ReplayModule(recorder)
                replayed.add(name)
                if isinstance(recorder, ProjectionRecorder):
                    recorder.linear_inputs = []  # the recording is complete: the shortcut's inputs are not read again
            else:  # recorded in a pass that stopped before reaching it
                swaps[name] = recorder
        for name in list(swaps):
            if any(name.startswith(outer + ".") for outer in replayed):
                # inside a child that replays whole (q/k/v inside the attention block): never called again, so
                # what it recorded is dropped (for a 7B's 128 x 2048 tokens, 12 GiB of float32 q/k/v)
                del swaps[name]
                recorders[name].outputs.clear()
        return swaps

    if config.method != "gptq":
        for group in groups:
            q, r = solve_shared(group, None, config, collective)
            quantized.update(q)
            reports.extend(r)
        return quantized, reports, run_pass([], {})

    def key(group: list[tuple[str, nn.Linear]]) -> str:
        return "+".join(name for name, _ in group)

    def shared(group: list[tuple[str, nn.Linear]]) -> HessianAccumulator | None:
        cached = float_hessians.get(key(group)) if float_hessians is not None else None
        return cached.copy(device) if cached is not None else None

    def share(group: list[tuple[str, nn.Linear]], accumulator: HessianAccumulator) -> None:
        if float_hessians is not None:
            float_hessians[key(group)] = accumulator.copy("cpu")  # before the solve, which may change H in place

    if not config.true_sequential:
        if float_hessians is not None and all(key(group) in float_hessians for group in groups):
            accumulators = [shared(group) for group in groups]
        else:
            accumulators = [_accumulator(dtype, group) for group in groups]
            run_pass([(group[0][1], _hessian_hook(acc, stop=False)) for group, acc in zip(groups, accumulators)], {})
            for group, accumulator in zip(groups, accumulators):
                share(group, accumulator)
        for group, accumulator in zip(groups, accumulators):
            q, r = solve_shared(group, accumulator, config, collective)
            quantized.update(q)
            reports.extend(r)
        return quantized, reports, run_pass([], {})

    for position, group in enumerate(groups):
        if on_group is not None:
            on_group("+".join(name.rsplit(".", 1)[-1] for name, _ in group))
        child = projection_of.get(group[0][0]) if (replay or replay_blocks) and len(group) == 1 else None
        # only the first group sees the float layer's inputs; a projection's group also keeps its inputs in its pass
        accumulator = shared(group) if position == 0 and child is None else None
        if accumulator is None:
            accumulator = _accumulator(dtype, group)
            kept = projection_inputs.setdefault(child, []) if child else None
            run_pass([(group[0][1], _hessian_hook(accumulator, stop=True, keep_inputs=kept, store_device=store_device))], next_swaps())
            if position == 0 and child is None:
                share(group, accumulator)
        q, r = solve_shared(group, accumulator, config, collective)
        del accumulator
        quantized.update(q)
        reports.extend(r)
    # Final pass: what is recorded replays, the rest computes; what comes out feeds the next layer.
    outputs = run_pass([], next_swaps(record=False))
    return quantized, reports, outputs
