"""Quantize the linears of one decoder layer in the registry's order (true-sequential: each group sees the
outputs of the groups quantized before it) and produce the layer's outputs for the next layer."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from typing import Callable

import torch
from torch import nn

from qtool.configs.schema import QuantConfig
from qtool.quant.gptq import gptq_quantize
from qtool.quant.hessian import HessianAccumulator
from qtool.quant.refine import refine_group_scales
from qtool.quant.replay import RecordingModule, ReplayModule, StopLayerForward, swapped_modules
from qtool.quant.rtn import rtn_quantize
from qtool.quant.types import QuantizedWeight

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
    weights = [linear.weight.data.float() for _, linear in linears]
    stacked = torch.cat(weights, dim=0)
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


def _hessian_hook(accumulator: HessianAccumulator, stop: bool):
    def hook(module: nn.Module, args: tuple) -> None:
        accumulator.add_batch(args[0].detach())
        if stop:
            raise StopLayerForward

    return hook


def _usable_hessian(accumulator: HessianAccumulator, group: list[tuple[str, nn.Linear]]) -> torch.Tensor | None:
    """The group's Hessian, or None (round to nearest) when no calibration token reached it, e.g. an MoE expert
    the router never picked."""
    if accumulator.num_tokens == 0:
        log.warning("%s: no calibration token reached this input; rounding to nearest", ", ".join(n for n, _ in group))
        return None
    return accumulator.hessian


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
    on_group: Callable[[str], None] | None = None,
) -> tuple[dict[str, QuantizedWeight], list[ModuleReport], list[torch.Tensor]]:
    """Quantize every group of `layer` (names relative to the layer) and return (quantized weights, reports, the
    layer's outputs per batch).

    True-sequential: one pass per group, stopped as soon as the group's input is seen. Linears quantized in an
    earlier group, and whole children of the layer that can no longer change (the input norm, then the attention
    block once its linears are done), are recorded the next time they run and replayed afterwards.
    Otherwise: one pass gathers every group's Hessian from the float layer."""
    quantized: dict[str, QuantizedWeight] = {}
    reports: list[ModuleReport] = []
    recorders: dict[str, RecordingModule] = {}
    call_order: list[str] = []
    children = dict(layer.named_children())
    all_names = {name for group in groups for name, _ in group}

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
            with swapped_modules(layer, swaps), torch.inference_mode():
                for i in range(num_batches):
                    try:
                        outputs.append(run_batch(i))
                    except StopLayerForward:
                        pass
        finally:
            for handle in handles:
                handle.remove()
        return outputs

    def next_swaps() -> dict[str, nn.Module]:
        """What is final and recorded replays; what became final since the last pass records."""
        if not replay:
            return {}
        final = set(_final_children(layer, call_order, set(quantized), all_names)) | set(quantized)
        swaps: dict[str, nn.Module] = {}
        for name in sorted(final):
            recorder = recorders.get(name)
            if recorder is None:
                recorder = recorders[name] = RecordingModule(layer.get_submodule(name), store_device)
                swaps[name] = recorder
            elif recorder.outputs:
                swaps[name] = ReplayModule(recorder)
            else:  # recorded in a pass that stopped before reaching it
                swaps[name] = recorder
        return swaps

    if config.method != "gptq":
        for group in groups:
            q, r = solve_group(group, None, config)
            quantized.update(q)
            reports.extend(r)
        return quantized, reports, run_pass([], {})

    if not config.true_sequential:
        accumulators = [HessianAccumulator(group[0][1].in_features, device=group[0][1].weight.device) for group in groups]
        run_pass([(group[0][1], _hessian_hook(acc, stop=False)) for group, acc in zip(groups, accumulators)], {})
        for group, accumulator in zip(groups, accumulators):
            q, r = solve_group(group, _usable_hessian(accumulator, group), config)
            quantized.update(q)
            reports.extend(r)
        return quantized, reports, run_pass([], {})

    for group in groups:
        if on_group is not None:
            on_group("+".join(name.rsplit(".", 1)[-1] for name, _ in group))
        accumulator = HessianAccumulator(group[0][1].in_features, device=group[0][1].weight.device)
        run_pass([(group[0][1], _hessian_hook(accumulator, stop=True))], next_swaps())
        q, r = solve_group(group, _usable_hessian(accumulator, group), config)
        del accumulator
        quantized.update(q)
        reports.extend(r)
    # Final pass: what is recorded replays, the rest computes; what comes out feeds the next layer.
    outputs = run_pass([], next_swaps())
    return quantized, reports, outputs
