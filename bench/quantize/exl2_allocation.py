"""How EXL2's bit allocation should weigh the measured errors: for one target bpw and one measurement.json, the
optimizer picks candidates under several objectives, each allocation is quantized (the EXL2 quantization pass of
`qtool quantize --format exl2`, in memory: the model keeps the dequantized weights) and scored by the protocol
perplexity. One JSON line per objective.

    .venv/bin/python bench/quantize/exl2_allocation.py --measurement M.json --bpw 4.0 --objectives sum,numel,log
    SCRIPT=bench/quantize/exl2_allocation.py bash bench/device/gpu_grid.sh ...   (on the lent GPU: see its header)

Objectives (each linear's measured relative output error e of each candidate becomes the cost summed):
  sum    e (relative errors of all linears count alike: the optimizer before sensitivities)
  numel  e * weights of the linear (large linears count more)
  log    log e (every linear's error lowered by the same factor counts alike)
  sqrt   sqrt e
  fisher e * S, S the linear's empirical-Fisher weight (quant/sensitivity.py: the loss cost of a unit of relative
         output error), as the optimizer has it; from the measurement when it holds them, else from
         --sensitivity-windows calibration windows through the float model
  fisher:P  e * S**P (P = 0.5: half way between sum and fisher)
  uniform:BITS:GROUP   no optimizer: every linear at one width and group size (the reference point)

--extra-candidates "4,3:0.9,0.1:32;5,4:0.1,0.9:32" measures more candidate settings (bits:shares:group per
candidate) on the float model first and adds them to the measurement (--save-measurement keeps the result).
"""

import argparse
import copy
import json
import math
import time
from pathlib import Path

import torch

from qtool.data.text import calibration_windows, load_eval_text
from qtool.eval.perplexity import perplexity
from qtool.quant.exl2_optimize import LinearMeasurement, MeasuredCandidate, measurement_from_dict, measurement_to_dict, optimize, weighed
from qtool.quant.exl2_pipeline import SENSITIVITY_WINDOWS, _exl2_layout_check, measure_layer, quantize_exl2_layer, weigh_linears
from qtool.quant.exl2_solver import Exl2Candidate
from qtool.quant.pipeline import split_quantizable, storage_device
from qtool.models.architectures import decoder_layers, get_architecture, resolve_layer_groups
from qtool.models.layerwise import capture_layer_inputs
from qtool.checkpoints.sources import load_model

DATA = Path(__file__).resolve().parents[3] / "shared" / "data"  # ../shared/data beside the repo
COSTS = {
    "sum": lambda e, m: e,
    "numel": lambda e, m: e * m.numel,
    "log": lambda e, m: math.log(max(e, 1e-12)),
    "sqrt": lambda e, m: math.sqrt(max(e, 0.0)),
}


def with_costs(measurements: list[LinearMeasurement], objective: str, sensitivity: dict[str, float] | None = None) -> list[LinearMeasurement]:
    """The measurements with each candidate's error replaced by its cost under `objective` (unweighed: the
    optimizer then sums these costs as they are)."""
    if objective.startswith("fisher"):
        power = float(objective.split(":")[1]) if ":" in objective else 1.0
        cost = lambda e, m: e * sensitivity[m.name] ** power
    else:
        cost = COSTS[objective]
    return [LinearMeasurement(m.name, m.out_features, m.in_features, [MeasuredCandidate(c.candidate, c.total_bits, cost(c.error, m)) for c in m.candidates])
            for m in measurements]


def allocation_for(measurements: list[LinearMeasurement], objective: str, bpw: float, sensitivity: dict[str, float] | None = None) -> tuple[dict[str, Exl2Candidate], float]:
    if objective.startswith("uniform:"):
        _, bits, group = objective.split(":")
        candidate = Exl2Candidate((int(bits),), (1.0,), (int(group),))
        weights = sum(m.numel for m in measurements)
        return {m.name: candidate for m in measurements}, sum(candidate.total_bits(m.in_features, m.out_features) for m in measurements) / weights
    allocation = optimize(with_costs(measurements, objective, sensitivity), bpw)
    return allocation.choices, allocation.bits_per_weight


def parse_candidates(text: str) -> tuple[Exl2Candidate, ...]:
    out = []
    for spec in filter(None, text.split(";")):
        bits, shares, group = spec.split(":")
        widths = tuple(int(b) for b in bits.split(","))
        out.append(Exl2Candidate(widths, tuple(float(p) for p in shares.split(",")), (int(group),) * len(widths)))
    return tuple(out)


def measure_extra(model, spec, captured, storage, device, candidates) -> dict[str, list[MeasuredCandidate]]:
    """The extra candidates measured on the float model, layer by layer (as the measurement pass does)."""
    extra: dict[str, list[MeasuredCandidate]] = {}
    inputs = captured
    for index, layer in enumerate(decoder_layers(model, spec)):
        groups, _ = split_quantizable(resolve_layer_groups(model, index, spec), _exl2_layout_check)
        measured, outputs = measure_layer(layer, groups, inputs, device, 0.01, candidates=candidates)
        for m in measured:
            extra[m.name] = m.candidates
        inputs = inputs.advanced([h.to(storage) for h in outputs])
    return extra


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data", default=str(DATA))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--measurement", required=True)
    parser.add_argument("--bpw", default="4.0", help="target bpw, or several separated by commas")
    parser.add_argument("--objectives", default="sum,numel,log")
    parser.add_argument("--windows", type=int, default=40)
    parser.add_argument("--jsonl", default=None)
    parser.add_argument("--extra-candidates", default="")
    parser.add_argument("--save-measurement", default=None)
    parser.add_argument("--sensitivity-windows", type=int, default=SENSITIVITY_WINDOWS, help="calibration windows for the fisher objective")
    args = parser.parse_args()

    data = Path(args.data)
    device = torch.device(args.device)
    measurements = measurement_from_dict(json.loads(Path(args.measurement).read_text()), args.measurement)
    loaded = load_model(args.model, device="cpu", dtype="float32")
    windows = calibration_windows(loaded.tokenizer, str(data / "wikitext-2" / "wiki.valid.tokens"), 128, 512, 0)
    text = load_eval_text(str(data / "wikitext-2-raw" / "wiki.test.raw"))
    spec = get_architecture(loaded.model)
    storage = storage_device(device, len(windows), 512, loaded.model.config.hidden_size)
    captured = capture_layer_inputs(loaded.model, windows, device="cpu", storage_device=storage, spec=spec)
    if args.extra_candidates:
        started = time.perf_counter()
        extra = measure_extra(copy.deepcopy(loaded.model), spec, captured, storage, device, parse_candidates(args.extra_candidates))
        measurements = [LinearMeasurement(m.name, m.out_features, m.in_features, m.candidates + extra[m.name]) for m in measurements]
        print(json.dumps({"extra_measured_s": round(time.perf_counter() - started, 1)}), flush=True)
        if args.save_measurement:
            Path(args.save_measurement).write_text(json.dumps(measurement_to_dict(measurements)))
    sensitivity = {m.name: m.sensitivity for m in measurements} if weighed(measurements) else None
    if "fisher" in args.objectives and (sensitivity is None or args.sensitivity_windows != SENSITIVITY_WINDOWS):
        started = time.perf_counter()
        model = copy.deepcopy(loaded.model)
        layer_groups = [split_quantizable(resolve_layer_groups(model, index, spec), _exl2_layout_check)[0] for index in range(len(decoder_layers(model, spec)))]
        sensitivity = weigh_linears(model, layer_groups, windows, device, args.sensitivity_windows)
        del model
        print(json.dumps({"sensitivity_s": round(time.perf_counter() - started, 1), "windows": args.sensitivity_windows}), flush=True)
    runs = [(objective, float(target)) for target in args.bpw.split(",") for objective in filter(None, args.objectives.split(","))]
    for objective, target in runs:
        started = time.perf_counter()
        choices, bpw = allocation_for(measurements, objective, target, sensitivity)
        model = copy.deepcopy(loaded.model)
        inputs = captured
        for index, layer in enumerate(decoder_layers(model, spec)):
            groups, _ = split_quantizable(resolve_layer_groups(model, index, spec), _exl2_layout_check)
            _, _, outputs = quantize_exl2_layer(layer, groups, inputs, choices, device, 0.01, refine=True)
            inputs = inputs.advanced([h.to(storage) for h in outputs])
        seconds = time.perf_counter() - started
        ppl = perplexity(model.to(device), loaded.tokenizer, text, seqlen=2048, windows=args.windows, device=device).ppl
        shares: dict[str, float] = {}
        for m in measurements:
            shares[choices[m.name].describe()] = shares.get(choices[m.name].describe(), 0) + m.numel
        total = sum(shares.values())
        row = {"objective": objective, "extra_candidates": args.extra_candidates, "target_bpw": target, "bits_per_weight": round(bpw, 4), "ppl": round(ppl, 4), "windows": args.windows,
               "quantize_seconds": round(seconds, 1), "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
               "candidates": {k: round(v / total, 3) for k, v in sorted(shares.items(), key=lambda kv: -kv[1])}}
        print(json.dumps(row), flush=True)
        if args.jsonl:
            with open(args.jsonl, "a") as handle:
                handle.write(json.dumps(row) + "\n")
        del model


if __name__ == "__main__":
    main()
