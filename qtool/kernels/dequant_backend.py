"""The "dequant" matmul backend for GPTQ linears (what QLoRA trains through): every call dequantizes the layer's
weight from the checkpoint's own packed layout into one reusable scratch buffer (gptq_dequant_triton.py) and hands
it to torch.matmul (cuBLAS). The layer keeps one packed copy of its weight (no repacked compute layout as the
Triton backend keeps), and at a training step's thousands of rows the matmul runs at the dense dtype's speed:
forward y = x @ W^T and backward dX = dY @ W both read the same scratch. At small M the fused Triton kernels are
faster: auto never picks this backend; training asks for it (finetune/quantized_lora.py)."""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass
from typing import Iterator

import torch

from qtool.kernels.dequant_ref import dequantize_gptq
from qtool.kernels.gptq_dequant_triton import DEQUANT_DTYPES, dequantize_into
from qtool.kernels.gptq_grad_input_triton import GptqGradForm, prepare_gptq_grad
from qtool.kernels.linear_tensors import GptqLinearTensors, check_input_features
from qtool.kernels.profiled_range import DEQUANTIZE_RANGE, profiled_range
from qtool.kernels.registry import triton_device_problem

RESERVED_BYTES_PER_VALUE = 2  # prepare() reserves the scratch for 16-bit weights, what training computes in


@dataclass
class DequantForm:
    """A layer as this backend reads it: the grad form (qweight as stored, aliasing the checkpoint's buffer; zeros
    unpacked to uint8; scales; g_idx) and the layer's own tensors (the bias; the reference for other dtypes)."""

    packed: GptqGradForm
    tensors: GptqLinearTensors

    @property
    def bias(self) -> torch.Tensor | None:
        return self.tensors.bias

    @property
    def in_features(self) -> int:
        return self.packed.in_features

    @property
    def out_features(self) -> int:
        return self.packed.out_features


def _stream_key(device: torch.device) -> tuple[str, int]:
    # layers sharing a scratch must run in one stream's order: a buffer per stream keeps other streams apart
    if device.type == "cuda":
        if device.index is None:  # "cuda" and "cuda:0" must find the same buffer
            device = torch.device("cuda", torch.cuda.current_device())
        return str(device), torch.cuda.current_stream(device).cuda_stream
    return str(device), 0


class DequantScratch:
    """One byte buffer per (device, stream), grown to the largest weight asked for and reused by every layer: the
    dequantized weight lives only between its write and the matmul that reads it. The lock spans both enqueues,
    so threads sharing a stream (models served side by side) cannot interleave a write between them; the stream
    orders the kernels themselves."""

    def __init__(self) -> None:
        self._buffers: dict[tuple[str, int], torch.Tensor] = {}
        self._lock = threading.Lock()

    def reserve(self, device: torch.device, nbytes: int) -> torch.Tensor:
        """The buffer of `device`'s current stream, at least `nbytes` long."""
        key = _stream_key(device)
        buffer = self._buffers.get(key)
        if buffer is None or buffer.numel() < nbytes:
            # the old buffer is freed in stream order: kernels still reading it finish before its memory is reused
            buffer = torch.empty(nbytes, dtype=torch.uint8, device=device)
            self._buffers[key] = buffer
        return buffer

    def nbytes(self, device: torch.device) -> int:
        buffer = self._buffers.get(_stream_key(device))
        return 0 if buffer is None else buffer.numel()

    @contextlib.contextmanager
    def weight_t(self, form: DequantForm, dtype: torch.dtype) -> Iterator[torch.Tensor]:
        """W^T [in_features, out_features] in `dtype`, valid inside the block (enqueue its readers there)."""
        k, n = form.in_features, form.out_features
        if dtype not in DEQUANT_DTYPES:  # float64 and the like: the reference, in a tensor of its own
            yield _reference_weight_t(form, dtype)
            return
        device = form.packed.qweight.device
        itemsize = dtype.itemsize  # not a tensor's element_size(): no allocation per call
        with self._lock:
            buffer = self.reserve(device, k * n * itemsize)
            with profiled_range(DEQUANTIZE_RANGE):
                w_t = dequantize_into(form.packed, buffer[: k * n * itemsize].view(dtype).view(k, n))
            yield w_t


def _reference_weight_t(form: DequantForm, dtype: torch.dtype) -> torch.Tensor:
    t = form.tensors
    return dequantize_gptq(t.qweight, t.qzeros, t.scales, t.g_idx, t.bits, t.checkpoint_format, dtype).T


class GptqDequantBackend:
    """GPTQ matmul as dequantize (Triton, checkpoint layout) into a shared scratch + torch.matmul; dX likewise.
    Share one instance across layers: the scratch lives on it."""

    name = "dequant"

    def __init__(self) -> None:
        self.scratch = DequantScratch()

    def supports(self, device: torch.device | str, bits: int, group_size: int, m: int = 1) -> str | None:
        from qtool.kernels.gptq_dequant_triton import triton_interpreted

        return triton_device_problem(torch.device(device), triton_interpreted())

    def prepare(self, tensors: GptqLinearTensors) -> DequantForm:
        """The layer's form (no copy of the codes); reserves the scratch for its 16-bit weight."""
        form = DequantForm(prepare_gptq_grad(tensors), tensors)
        self.scratch.reserve(tensors.qweight.device, form.in_features * form.out_features * RESERVED_BYTES_PER_VALUE)
        return form

    def matmul(self, x: torch.Tensor, form: DequantForm) -> torch.Tensor:
        """y[..., N] = x[..., K] @ W^T + bias, in x's dtype."""
        check_input_features(x, form.in_features, "GPTQ linear")
        lead = x.shape[:-1]
        x2 = x.reshape(-1, form.in_features)
        with self.scratch.weight_t(form, x.dtype) as w_t:
            if form.bias is None:
                y = torch.matmul(x2, w_t)
            else:
                y = torch.addmm(form.bias.to(x.dtype), x2, w_t)
        return y.reshape(*lead, form.out_features)

    def grad_input(self, grad_output: torch.Tensor, form: DequantForm) -> torch.Tensor:
        """dX[..., K] = dY[..., N] @ W, in dY's dtype."""
        lead = grad_output.shape[:-1]
        dy = grad_output.reshape(-1, form.out_features)
        with self.scratch.weight_t(form, grad_output.dtype) as w_t:
            dx = torch.matmul(dy, w_t.T)
        return dx.reshape(*lead, form.in_features)
