"""Named ranges that exist only while a profiler records: a profile can then tell which kernels dequantize a weight
(bench/finetune/step_profile.py reads them), and an unprofiled call pays one flag check, not a dispatcher call."""

from __future__ import annotations

import contextlib

import torch

DEQUANTIZE_RANGE = "qtool::dequantize"  # around every dequantization of a quantized linear's weight
ROW_BLOCK_RANGE = "qtool::gptq_row_block"  # around every lazy block of a GPTQ pass (one kernel on a GPU)
LOSS_RANGE = "qtool::linear_cross_entropy"  # around the fused head + loss (its matmuls are the loss's, not a layer's)
# a quantization run's phases (bench/quantize/profile_layer.py sums each): one calibration batch through a layer, one
# batch's Hessian products, one group's solve, one step's state written
LAYER_BATCH_RANGE = "qtool::layer_batch"
HESSIAN_RANGE = "qtool::hessian_add"
SOLVE_RANGE = "qtool::solve_group"
STATE_SAVE_RANGE = "qtool::state_save"


def profiled_range(name: str) -> contextlib.AbstractContextManager:
    """torch.profiler.record_function(name) while a profiler records, else a context that does nothing."""
    if torch.autograd._profiler_enabled():
        return torch.profiler.record_function(name)
    return contextlib.nullcontext()
