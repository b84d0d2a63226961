"""Accumulates the GPTQ Hessian H = 2/n * sum over tokens of x x^T for one linear's inputs, batch by batch."""

from __future__ import annotations

from typing import Callable

import torch

from qtool.core.errors import QtoolError

# Row blocks for inputs of 2 * MIN_ROW_BLOCK features and more (measured on 1536 inputs: 4 blocks skip 34%).
MIN_ROW_BLOCK = 384
MAX_ROW_BLOCKS = 4
SCALE_ROWS = 1024  # rows of the float64 sum scaled at a time when H is read


class HessianAccumulator:
    """Running H = 2/n * X^T X (float32 [in_features, in_features]) over every token passed to add_batch.

    Each batch rescales the running mean and adds its own tokens in one addmm, as GPTQ does, so H keeps the
    scale of one token's contribution however many tokens come.

    With `float64_sum` it keeps instead the plain sum of the batches' products in float64 (each product computed
    in the product dtype as before) and divides only when H is read: the sums of several processes that each saw
    some of the batches can then be added (`all_reduce`), and H, rounded to float32 once at the end, does not
    depend on how the batches were split (float64 carries 29 bits more than the float32 result keeps)."""

    def __init__(self, in_features: int, device: torch.device | str | None = None, product_dtype: torch.dtype = torch.float32,
                 float64_sum: bool = False):
        self.in_features = in_features
        self.num_tokens = 0
        # bfloat16/float16 products run about twice as fast on CPUs with bf16 dot products and on GPUs; each batch's
        # product is rounded to that dtype once, the running sum stays float32.
        self.product_dtype = product_dtype
        # Only the upper block triangle is accumulated (H is symmetric); wide inputs are cut into row blocks so
        # that about a third of the products are skipped. The lower part is filled in when H is read.
        blocks = min(MAX_ROW_BLOCKS, max(1, in_features // MIN_ROW_BLOCK))
        edges = [round(i * in_features / blocks) for i in range(blocks + 1)]
        self._row_blocks = list(zip(edges[:-1], edges[1:]))
        self._device = torch.device(device) if device is not None else torch.device("cpu")
        # With a float64 sum the float32 H is only made when read: for a 7B's down_proj (11008 inputs) the sum
        # alone is 0.9 GiB, and a second full-size buffer beside it during the pass would be 0.45 GiB more.
        self._hessian = None if float64_sum else torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self._symmetric = True
        self._sum = torch.zeros(in_features, in_features, dtype=torch.float64, device=device) if float64_sum else None
        self._stale = float64_sum  # _hessian lags behind _sum

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def hessian(self) -> torch.Tensor:
        """The accumulated H itself (not a copy): all zeros until a token was added."""
        if self._sum is not None and self._stale:
            self._fill_lower(self._sum)
            self._hessian = None  # the stale H goes before the new one is made
            hessian = torch.empty(self.in_features, self.in_features, dtype=torch.float32, device=self._device)
            scale = 2.0 / self.num_tokens if self.num_tokens else 0.0
            # a slice of rows at a time: the same values as (sum * scale).to(float32) without a float64 temporary
            # of the sum's size
            for start in range(0, self.in_features, SCALE_ROWS):
                hessian[start:start + SCALE_ROWS].copy_(self._sum[start:start + SCALE_ROWS] * scale)
            self._hessian = hessian
            self._stale = False
            return self._hessian
        self._check_not_taken()
        if not self._symmetric:
            for start, end in self._row_blocks[1:]:
                self._hessian[start:end, :start] = self._hessian[:start, start:end].T
            self._symmetric = True
        return self._hessian

    def add_batch(self, x: torch.Tensor) -> None:
        """Add the tokens of x [..., in_features] (any float dtype, any device)."""
        if x.shape[-1] != self.in_features:
            raise QtoolError(
                f"Hessian input has {x.shape[-1]} features, the linear takes {self.in_features}",
                "feed the accumulator the input of the linear it was made for",
            )
        self._check_not_taken()
        tokens = x.reshape(-1, self.in_features)
        count = tokens.shape[0]
        if count == 0:
            return
        tokens = tokens.to(device=self._device, dtype=self.product_dtype)
        if self._sum is not None:
            for start, end in self._row_blocks:
                self._sum[start:end, start:].add_(tokens[:, start:end].T @ tokens[:, start:])
            self.num_tokens += count
            self._stale = True
            return
        total = self.num_tokens + count
        # H_new = n/(n+m) * H_old + 2/(n+m) * X^T X, one fused call per row block of the upper triangle.
        beta, alpha = self.num_tokens / total, 2.0 / total
        for start, end in self._row_blocks:
            target = self._hessian[start:end, start:]
            if self.product_dtype == torch.float32:
                target.addmm_(tokens[:, start:end].T, tokens[:, start:], beta=beta, alpha=alpha)
            else:
                target.mul_(beta).add_(tokens[:, start:end].T @ tokens[:, start:], alpha=alpha)
        self._symmetric = len(self._row_blocks) == 1
        self.num_tokens = total

    def take_hessian(self) -> torch.Tensor:
        """H, with the accumulator's float64 sum released (a solve that consumes H needs nothing else from it): the
        accumulator then takes no more batches."""
        hessian = self.hessian
        self._sum, self._hessian = None, None
        return hessian

    def _check_not_taken(self) -> None:
        if self._sum is None and self._hessian is None:
            raise ValueError("the accumulator's sums were released by take_hessian")

    def _fill_lower(self, matrix: torch.Tensor) -> None:
        for start, end in self._row_blocks[1:]:
            matrix[start:end, :start] = matrix[:start, start:end].T

    def all_reduce(self, sum_in_place: Callable[[torch.Tensor], None]) -> None:
        """Add the sums of the other processes' accumulators of the same linear (float64_sum only):
        `sum_in_place` replaces a tensor by its sum over the processes (torch.distributed.all_reduce)."""
        if self._sum is None:
            raise ValueError("all_reduce needs an accumulator made with float64_sum=True")
        count = torch.tensor([float(self.num_tokens)], dtype=torch.float64, device=self._sum.device)
        sum_in_place(count)
        sum_in_place(self._sum)
        self.num_tokens = int(count.item())
        self._stale = True

    def copy(self, device: torch.device | str | None = None) -> "HessianAccumulator":
        """An independent accumulator holding the same tokens (float64_sum only), e.g. kept for another job."""
        if self._sum is None:
            raise ValueError("copy needs an accumulator made with float64_sum=True")
        twin = HessianAccumulator(self.in_features, device=device or self.device, product_dtype=self.product_dtype, float64_sum=True)
        twin._sum.copy_(self._sum)
        twin.num_tokens, twin._stale = self.num_tokens, True
        return twin
