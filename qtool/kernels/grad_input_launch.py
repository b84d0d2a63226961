"""What the GPTQ and EXL2 grad-input kernels (gptq_grad_input_triton.py, exl2_grad_input_triton.py) share on the
host: the tiles and their rule, the dtypes they multiply in, and the operands of one call (dY as rows of unit
stride, dX allocated, the grid over dX's tiles). Torch only: quantized_autograd checks the dtypes without
importing Triton."""

from __future__ import annotations

from dataclasses import dataclass

import torch

# the dtypes the kernels multiply in; others (float64) go through the reference
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@dataclass(frozen=True)
class GradInputConfig:
    """Launch parameters: the dX tile [block_m, block_k] and the N step block_n (all >= 16 for tl.dot)."""

    block_m: int = 64
    block_n: int = 64
    block_k: int = 64
    num_warps: int = 4
    num_stages: int = 3


def default_grad_config(m: int) -> GradInputConfig:
    """The tiles for M rows of dY, by rule (untuned: no GPU measurement yet). Unpacking a weight tile costs the
    same whatever BM is, so long inputs (a training step's thousands of tokens) take tall tiles that share each
    unpacked tile among more rows."""
    if m >= 1024:
        return GradInputConfig(block_m=128, block_n=64, block_k=64, num_warps=8, num_stages=3)
    return GradInputConfig()


@dataclass
class GradInputCall:
    """One dX = dY @ dequant(W): dy [M, N] with unit stride along N, dx [M, K] to fill, the tiles."""

    dy: torch.Tensor
    dx: torch.Tensor
    config: GradInputConfig
    lead: torch.Size  # dY's shape without its last dimension: dX's shape is lead + (K,)

    @property
    def rows(self) -> int:
        return self.dy.shape[0]

    def grid(self, columns: int) -> tuple[int, int]:
        """One program per [block_m, block_k] tile of `columns` columns of dX."""
        return (_cdiv(self.rows, self.config.block_m), _cdiv(columns, self.config.block_k))

    def result(self) -> torch.Tensor:
        return self.dx.reshape(*self.lead, self.dx.shape[1])


def grad_input_call(grad_output: torch.Tensor, out_features: int, in_features: int,
                    config: GradInputConfig | None, kernel: str) -> GradInputCall:
    """The operands of `kernel` for dY = grad_output [..., out_features]; config None: default_grad_config of dY's
    rows. Raises ValueError for a dY of the wrong width or dtype."""
    if grad_output.shape[-1] != out_features:
        raise ValueError(f"grad_output has {grad_output.shape[-1]} features, the layer has {out_features} outputs")
    if grad_output.dtype not in KERNEL_DTYPES:
        raise ValueError(f"{kernel} takes {', '.join(map(str, KERNEL_DTYPES))}, not {grad_output.dtype}")
    dy = grad_output.reshape(-1, out_features)
    if dy.stride(-1) != 1:
        dy = dy.contiguous()
    m = dy.shape[0]
    dx = torch.empty(m, in_features, dtype=grad_output.dtype, device=grad_output.device)
    return GradInputCall(dy, dx, config or default_grad_config(m), grad_output.shape[:-1])


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)
