"""Accumulates the GPTQ Hessian H = 2/n * sum over tokens of x x^T for one linear's inputs, batch by batch."""

from __future__ import annotations

import torch

from qtool.configs.errors import QtoolError


class HessianAccumulator:
    """Running H = 2/n * X^T X (float32 [in_features, in_features]) over every token passed to add_batch.

    Each batch rescales the running mean and adds its own tokens in one addmm, as GPTQ does, so H keeps the
    scale of one token's contribution however many tokens come."""

    def __init__(self, in_features: int, device: torch.device | str | None = None):
        self.in_features = in_features
        self.num_tokens = 0
        self._hessian = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)

    @property
    def device(self) -> torch.device:
        return self._hessian.device

    @property
    def hessian(self) -> torch.Tensor:
        """The accumulated H itself (not a copy): all zeros until a token was added."""
        return self._hessian

    def add_batch(self, x: torch.Tensor) -> None:
        """Add the tokens of x [..., in_features] (any float dtype, any device)."""
        if x.shape[-1] != self.in_features:
            raise QtoolError(
                f"Hessian input has {x.shape[-1]} features, the linear takes {self.in_features}",
                "feed the accumulator the input of the linear it was made for",
            )
        tokens = x.reshape(-1, self.in_features)
        count = tokens.shape[0]
        if count == 0:
            return
        tokens = tokens.to(device=self._hessian.device, dtype=torch.float32)
        total = self.num_tokens + count
        # H_new = n/(n+m) * H_old + 2/(n+m) * X^T X, in one fused call.
        self._hessian.addmm_(tokens.T, tokens, beta=self.num_tokens / total, alpha=2.0 / total)
        self.num_tokens = total
