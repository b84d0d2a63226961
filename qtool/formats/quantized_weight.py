"""The quantized weight of one linear as plain tensors, independent of any file format or kernel layout.
The solver (GPTQ, RTN) produces it, the format layer packs and unpacks it, kernels repack it."""

from __future__ import annotations

from dataclasses import dataclass

import torch


def codes_dtype(bits: int) -> torch.dtype:
    """The narrowest dtype codes of `bits` are kept in (GPTQ's solver, a run's state): uint8 up to 8 bits, else int32."""
    return torch.uint8 if bits <= 8 else torch.int32


@dataclass
class QuantizedWeight:
    """codes[o, i] in 0..2**bits-1; weight[o, i] = scales[g_idx[i], o] * (codes[o, i] - zeros[g_idx[i], o]).

    zeros hold the true zero point (0..2**bits-1), i.e. the GPTQ v2 convention; the v1 "zero - 1" storage is a
    concern of the file format only. group_size is -1 for one group per output channel.
    """

    codes: torch.Tensor  # integer [out_features, in_features]: codes_dtype(bits) from GPTQ and a run's state, int32 from RTN
    scales: torch.Tensor  # float32 [groups, out_features]
    zeros: torch.Tensor  # int32 [groups, out_features]
    g_idx: torch.Tensor  # int32 [in_features]
    bits: int
    group_size: int

    @property
    def out_features(self) -> int:
        return self.codes.shape[0]

    @property
    def in_features(self) -> int:
        return self.codes.shape[1]

    @property
    def num_groups(self) -> int:
        return self.scales.shape[0]

    def to(self, device: torch.device | str) -> "QuantizedWeight":
        """The same weight with its tensors on `device`."""
        return QuantizedWeight(codes=self.codes.to(device), scales=self.scales.to(device), zeros=self.zeros.to(device),
                               g_idx=self.g_idx.to(device), bits=self.bits, group_size=self.group_size)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float weight [out_features, in_features] these codes stand for."""
        g = self.g_idx.long()
        # in place on one float32 copy of the codes: two weight-sized tensors at a time, not five (a 7B's gate+up
        # weight is 0.34 GiB in float32)
        weight = self.codes.to(torch.float32, copy=True)
        weight.sub_(self.zeros.to(torch.float32)[g].T)
        weight.mul_(self.scales.to(torch.float32)[g].T)
        return weight.to(dtype)
