"""Quantize the linears of one decoder layer in the registry's order (true-sequential: each group sees the
outputs of the groups quantized before it) and produce the layer's outputs for the next layer."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from qtool.configs.schema import QuantConfig
from qtool.quant.gptq import gptq_quantize
from qtool.quant.hessian import HessianAccumulator
from qtool.quant.replay import RecordingLinear, ReplayLinear, StopLayerForward, swapped_modules
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


def quantize_layer(
    layer: nn.Module,
    groups: list[list[tuple[str, nn.Linear]]],
    num_batches: int,
    run_batch: LayerRunner,
    config: QuantConfig,
    store_device: torch.device,
) -> tuple[dict[str, QuantizedWeight], list[ModuleReport], list[torch.Tensor]]:
    """Quantize every group of `layer` and return (quantized weights, reports, the layer's outputs per batch).

    True-sequential: one pass per group, stopped as soon as the group's input is seen; linears quantized in an
    earlier group are recorded the first time they run and replayed afterwards, so each is computed once.
    Otherwise: one pass gathers every group's Hessian from the float layer."""
    quantized: dict[str, QuantizedWeight] = {}
    reports: list[ModuleReport] = []
    needs_hessian = config.method == "gptq"
    recorded: dict[str, RecordingLinear] = {}

    def run_pass(hooked: list[tuple[nn.Module, Callable]], swaps: dict[str, nn.Module]) -> list[torch.Tensor]:
        handles = [module.register_forward_pre_hook(hook) for module, hook in hooked]
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

    def replay_swaps() -> dict[str, nn.Module]:
        """Linears already recorded replay their outputs; the ones quantized since the last pass record."""
        swaps: dict[str, nn.Module] = {}
        for name, recorder in recorded.items():
            if recorder.outputs:
                swaps[name] = ReplayLinear(recorder.outputs, recorder.linear.out_features)
            else:
                swaps[name] = recorder
        return swaps

    if not needs_hessian:
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
        accumulator = HessianAccumulator(group[0][1].in_features, device=group[0][1].weight.device)
        run_pass([(group[0][1], _hessian_hook(accumulator, stop=True))], replay_swaps())
        q, r = solve_group(group, _usable_hessian(accumulator, group), config)
        del accumulator
        quantized.update(q)
        reports.extend(r)
        for name, linear in group:
            recorded[name] = RecordingLinear(linear, store_device)
    # Final pass: all earlier groups replay, the last group computes; what comes out feeds the next layer.
    swaps = {name: ReplayLinear(rec.outputs, rec.linear.out_features) if rec.outputs else rec.linear for name, rec in recorded.items()}
    outputs = run_pass([], swaps)
    return quantized, reports, outputs
