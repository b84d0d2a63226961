"""EXL2's mixed precision: the candidate settings each linear is measured with, the measurement record
(measurement.json) that lets another bpw be produced without measuring again, and the optimizer that picks
one candidate per linear to reach a target bits per weight at the least total cost.

A candidate's cost is its measured relative output error times the linear's sensitivity (quant/sensitivity.py:
what a unit of relative error in that linear's output costs the model's loss). Unweighted, the relative errors
of a k_proj and of a down_proj count alike although the loss feels them 1000x apart; weighted, SmolLM2 at 4.0
bpw went from ppl 25.02 to 22.99 and at 3.0 from 38.66 to 33.62 (bench/RESULTS.md, "EXL2")."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch

from qtool.core.errors import QtoolError
from qtool.quant.exl2_solver import P_GRID, Exl2Candidate, candidate_errors, prepare_linear

MEASUREMENT_VERSION = 1
BPW_TOLERANCE = 0.02


def _c(bits, prop, group) -> Exl2Candidate:
    groups = tuple(group) if isinstance(group, (list, tuple)) else (group,) * len(bits)
    return Exl2Candidate(tuple(bits), tuple(prop), groups)


# Settings from about 2.1 to 8.3 bpw in the spirit of ExLlamaV2's qparams tables (a mix of two or three widths,
# the wider ones on the rows with the largest Hessian diagonal). The groups-of-32 mixes between 3 and 5 bits give
# the optimizer small steps where most targets land (on SmolLM2 they took 4.0 bpw from ppl 25.44 to 25.13 and
# 3.0 bpw from 41.08 to 40.19: bench/RESULTS.md).
DEFAULT_CANDIDATES: tuple[Exl2Candidate, ...] = (
    _c((3, 2), (0.05, 0.95), 64),
    _c((3, 2), (0.25, 0.75), 64),
    _c((3, 2), (0.6, 0.4), 64),
    _c((4, 3, 2), (0.05, 0.2, 0.75), (32, 64, 64)),
    _c((3,), (1.0,), 64),
    _c((3,), (1.0,), 32),
    _c((4, 3), (0.1, 0.9), 128),
    _c((4, 3), (0.25, 0.75), 128),
    _c((8, 4, 3), (0.05, 0.1, 0.85), (32, 128, 128)),
    _c((4, 3), (0.5, 0.5), 32),
    _c((4, 3), (0.75, 0.25), 32),
    _c((4, 3), (0.9, 0.1), 32),
    _c((4,), (1.0,), 128),
    _c((4,), (1.0,), 64),
    _c((4,), (1.0,), 32),
    _c((8, 4), (0.05, 0.95), (32, 128)),
    _c((5, 4), (0.1, 0.9), 128),
    _c((5, 4), (0.1, 0.9), 32),
    _c((5, 4), (0.25, 0.75), 64),
    _c((5, 4), (0.25, 0.75), 32),
    _c((5,), (1.0,), 64),
    _c((5,), (1.0,), 32),
    _c((6, 5), (0.1, 0.9), 128),
    _c((6, 5), (0.6, 0.4), 128),
    _c((6,), (1.0,), 128),
    _c((8, 6), (0.1, 0.9), 128),
    _c((8, 6), (0.4, 0.6), 128),
    _c((8, 6), (0.6, 0.4), 128),
    _c((8, 6), (0.75, 0.25), 128),
    _c((8,), (1.0,), 128),
)
# --head-bits: the head's one setting (0 keeps it float16), as ExLlamaV2's head options
HEAD_CANDIDATES: dict[int, Exl2Candidate] = {
    6: _c((8, 6), (0.15, 0.85), 128),
    8: _c((8,), (1.0,), 128),
}


@dataclass
class MeasuredCandidate:
    candidate: Exl2Candidate
    total_bits: int
    error: float

    def to_dict(self) -> dict[str, Any]:
        return {**self.candidate.to_dict(), "total_bits": self.total_bits, "error": self.error}


@dataclass
class LinearMeasurement:
    name: str
    out_features: int
    in_features: int
    candidates: list[MeasuredCandidate]
    sensitivity: float | None = None  # loss cost of a unit of relative output error; None: not weighed (counts 1)

    @property
    def numel(self) -> int:
        return self.out_features * self.in_features

    def cost(self, candidate: MeasuredCandidate) -> float:
        return candidate.error * (1.0 if self.sensitivity is None else self.sensitivity)

    def to_dict(self) -> dict[str, Any]:
        entry: dict[str, Any] = {"shape": [self.out_features, self.in_features], "candidates": [c.to_dict() for c in self.candidates]}
        if self.sensitivity is not None:
            entry["sensitivity"] = self.sensitivity
        return entry


def valid_sensitivity(value: float) -> bool:
    return math.isfinite(value) and value >= 0


def with_sensitivities(measurements: list[LinearMeasurement], sensitivities: dict[str, float]) -> list[LinearMeasurement]:
    """The measurements weighed by these sensitivities (one per linear name)."""
    missing = [m.name for m in measurements if m.name not in sensitivities]
    if missing:
        raise QtoolError(f"no sensitivity for {', '.join(missing[:3])}", "weigh every measured linear")
    bad = [name for name, value in sensitivities.items() if not valid_sensitivity(value)]
    if bad:
        raise QtoolError(f"the sensitivity of {bad[0]} is {sensitivities[bad[0]]}", "sensitivities are finite and >= 0: check the calibration text and the model's float weights")
    return [dataclasses.replace(m, sensitivity=float(sensitivities[m.name])) for m in measurements]


def weighed(measurements: list[LinearMeasurement]) -> bool:
    """True when every linear carries a sensitivity (an older measurement.json has none)."""
    return all(m.sensitivity is not None for m in measurements)


def measure_linear(
    name: str,
    weight: torch.Tensor,
    hessian: torch.Tensor,
    candidates: tuple[Exl2Candidate, ...] = DEFAULT_CANDIDATES,
    damp_percent: float = 0.01,
    p_grid: int = P_GRID,
) -> LinearMeasurement:
    """The relative output error of quantizing this linear with each candidate (nothing is kept)."""
    out_features, in_features = weight.shape
    prepared = prepare_linear(weight, hessian, damp_percent=damp_percent)  # the same for every candidate
    errors = candidate_errors(prepared, weight, hessian, [c.layout(in_features) for c in candidates], p_grid)
    measured = [MeasuredCandidate(c, c.total_bits(in_features, out_features), error) for c, error in zip(candidates, errors)]
    return LinearMeasurement(name, out_features, in_features, measured)


def measurement_to_dict(measurements: list[LinearMeasurement], meta: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"version": MEASUREMENT_VERSION, "meta": meta or {}, "linears": {m.name: m.to_dict() for m in measurements}}


def measurement_from_dict(data: dict[str, Any], where: str = "measurement.json") -> list[LinearMeasurement]:
    if not isinstance(data, dict) or data.get("version") != MEASUREMENT_VERSION or not isinstance(data.get("linears"), dict):
        raise QtoolError(f"{where} is not a qtool EXL2 measurement (version {MEASUREMENT_VERSION})", "measure again (omit --measurement)")
    out = []
    try:
        for name, entry in data["linears"].items():
            out_features, in_features = (int(v) for v in entry["shape"])
            candidates = [MeasuredCandidate(Exl2Candidate.from_dict(c), int(c["total_bits"]), float(c["error"])) for c in entry["candidates"]]
            if not candidates:
                raise ValueError(f"{name} has no candidates")
            sensitivity = None if entry.get("sensitivity") is None else float(entry["sensitivity"])
            if sensitivity is not None and not valid_sensitivity(sensitivity):
                raise ValueError(f"{name} has sensitivity {sensitivity}")
            out.append(LinearMeasurement(name, out_features, in_features, candidates, sensitivity))
    except (KeyError, TypeError, ValueError) as exc:
        raise QtoolError(f"{where}: malformed entry ({exc})", "measure again (omit --measurement)") from exc
    return out


@dataclass
class Allocation:
    choices: dict[str, Exl2Candidate]
    bits_per_weight: float
    total_cost: float  # sum of the picks' costs (errors times sensitivities)
    target: float


def _hull(m: LinearMeasurement) -> list[MeasuredCandidate]:
    """The candidates no other beats on both bits and cost, by increasing bits (hence decreasing cost), each with
    its error replaced by its cost."""
    ordered = sorted((MeasuredCandidate(c.candidate, c.total_bits, m.cost(c)) for c in m.candidates), key=lambda c: (c.total_bits, c.error))
    hull: list[MeasuredCandidate] = []
    for c in ordered:
        if hull and c.error >= hull[-1].error:
            continue  # more (or as many) bits for no less cost
        hull.append(c)
    return hull


def _reachable(hulls: list[list[MeasuredCandidate]], weights: int) -> tuple[float, float]:
    return sum(h[0].total_bits for h in hulls) / weights, sum(h[-1].total_bits for h in hulls) / weights


def reachable_bpw(measurements: list[LinearMeasurement]) -> tuple[float, float]:
    """The least and the most bits per weight the measured candidates can give these linears together."""
    return _reachable([_hull(m) for m in measurements], sum(m.numel for m in measurements))


def optimize(measurements: list[LinearMeasurement], target_bpw: float, tolerance: float = BPW_TOLERANCE, resolution: int = 16384) -> Allocation:
    """One candidate per linear with total bits / total weights at most target_bpw + tolerance and the least sum
    of costs (errors times sensitivities, where measured): a multiple-choice knapsack solved by dynamic programming over the bits above each linear's cheapest
    candidate, counted in `resolution` steps of the spare budget (each cost rounded up, so the result always
    fits), then the bits the rounding left unspent go to the upgrades that save the most error per bit."""
    import numpy as np

    if not measurements:
        raise QtoolError("nothing was measured", "measure at least one linear")
    hulls = [_hull(m) for m in measurements]
    weights = sum(m.numel for m in measurements)
    lowest, highest = _reachable(hulls, weights)
    if target_bpw < lowest - tolerance or target_bpw > highest + tolerance:
        raise QtoolError(f"target {target_bpw} bpw is outside what the candidates reach ({lowest:.2f} to {highest:.2f} bpw)", f"choose a bpw in {lowest:.2f}..{highest:.2f}")
    base = sum(h[0].total_bits for h in hulls)
    spare = (target_bpw + tolerance) * weights - base
    picks = [0] * len(hulls)
    if spare > 0:
        unit = spare / resolution
        cost = [[int(np.ceil((c.total_bits - h[0].total_bits) / unit - 1e-9)) for c in h] for h in hulls]
        best = np.zeros(resolution + 1)  # least error with at most b units spent, over the linears so far
        choice = np.zeros((len(hulls), resolution + 1), dtype=np.int32)
        for k, h in enumerate(hulls):
            new = np.full(resolution + 1, np.inf)
            for i, c in enumerate(h):
                if cost[k][i] > resolution:
                    continue
                shifted = np.full(resolution + 1, np.inf)
                shifted[cost[k][i]:] = best[: resolution + 1 - cost[k][i]] + c.error
                better = shifted < new
                new[better] = shifted[better]
                choice[k][better] = i
            best = new
        budget = int(np.argmin(best))
        for k in range(len(hulls) - 1, -1, -1):
            picks[k] = int(choice[k][budget])
            budget -= cost[k][picks[k]]
    used = sum(h[i].total_bits for h, i in zip(hulls, picks))
    limit = (target_bpw + tolerance) * weights
    while True:  # the rounded-up costs leave bits unspent: take the upgrades that save most error per bit
        best, best_gain = None, 0.0
        for k, (h, i) in enumerate(zip(hulls, picks)):
            if i + 1 < len(h):
                extra = h[i + 1].total_bits - h[i].total_bits
                gain = (h[i].error - h[i + 1].error) / extra
                if used + extra <= limit and gain > best_gain:
                    best, best_gain = k, gain
        if best is None:
            break
        used += hulls[best][picks[best] + 1].total_bits - hulls[best][picks[best]].total_bits
        picks[best] += 1
    return Allocation(
        choices={m.name: h[i].candidate for m, h, i in zip(measurements, hulls, picks)},
        bits_per_weight=used / weights,
        total_cost=sum(h[i].error for h, i in zip(hulls, picks)),
        target=target_bpw,
    )
