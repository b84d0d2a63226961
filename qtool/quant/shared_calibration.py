"""What several quantization jobs of one model reuse instead of computing again (`qtool quantize --jobs`).

Shared, for jobs with the same model files and the same calibration settings (source, samples, seqlen, seed):
the calibration windows, tokenized once. Shared besides, for such jobs with the same compute dtype and device
kind: the Hessians of the linears whose inputs are still the float model's, i.e. those of decoder layer 0 seen
through the float layer: its first group in true-sequential order (q/k/v of a Llama), and every group of layer 0
for jobs without true_sequential. Every later input depends on the job's own quantized weights, so nothing else
is shared. A reused Hessian is the float64 sum the job would accumulate itself (same windows, same batches, same
products), so a job writes the same bytes with or without the others."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from qtool.quant.hessian import HessianAccumulator


class ReusedHessians(dict):
    """Group name -> accumulator; counts the reads that found one (each is a pass over the calibration saved)."""

    def __init__(self) -> None:
        super().__init__()
        self.reused = 0

    def get(self, key, default=None):
        found = super().get(key, default)
        if found is not None:
            self.reused += 1
        return found


@dataclass
class SharedCalibration:
    windows: dict[str, list[torch.Tensor]] = field(default_factory=dict)  # calibration key -> token windows
    hessians: dict[str, ReusedHessians] = field(default_factory=dict)  # Hessian key -> group -> float64 sums
    windows_reused: int = 0  # how many jobs took their windows from here

    @property
    def hessians_reused(self) -> int:
        """How many group Hessians jobs took from here."""
        return sum(cache.reused for cache in self.hessians.values())

    def hessians_for(self, key: str) -> dict[str, HessianAccumulator]:
        return self.hessians.setdefault(key, ReusedHessians())
