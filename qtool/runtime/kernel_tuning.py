"""Tuning the Triton GPTQ kernels ahead of use (`qtool tune MODEL`): each distinct quantized linear of a model is
timed at every M bucket asked for, and the winners go to the plan cache that every later process reads (run, eval,
the engine), so that no timing lands inside a user's request (kernels/triton_backend.py serves untuned shapes with
default plans)."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from qtool.core.errors import QtoolError
from qtool.kernels.default_plans import DEFAULT_BATCH_SIZES
from qtool.kernels.fused_linear import fuse_linears
from qtool.kernels.plan_store import default_cache_dir
from qtool.kernels.quant_linear import QuantLinear
from qtool.kernels.repack import GptqComputeWeight
from qtool.kernels.triton_backend import (KERNEL_DTYPES, GpuFacts, TritonBackend, TuneKey,
                                          kernel_plan_store, m_bucket, tune_key, tuning_triton_backend)
from qtool.models.architectures import GATE_UP, QKV, decoder_layers, get_architecture

ProgressCallback = Callable[[int, int, str], None]  # (done, total, what is being tuned)


@dataclass
class TunedPlan:
    in_features: int
    out_features: int
    bits: int
    group_rows: int
    m_bucket: int
    plan: str  # Plan.describe()
    source: str  # "tuned" (timed now), "stored" (in the cache before) or "untimed" (no candidate ran: not stored)


@dataclass
class TuneResult:
    gpu: str
    plan_cache: str  # the file the plans are in
    dtype: str
    batch_sizes: list[int]  # the M buckets tuned
    layers: int  # quantized linears in the model
    shapes: int  # distinct ones among them (each tuned once)
    tuned: int
    stored_before: int
    seconds: float
    plans: list[TunedPlan] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def m_buckets(batch_sizes: list[int] | tuple[int, ...]) -> list[int]:
    """The distinct M buckets (powers of two, capped at MAX_M_BUCKET) of the batch sizes, ascending."""
    if not batch_sizes or any(not isinstance(m, int) or m < 1 for m in batch_sizes):
        raise QtoolError(f"batch sizes {list(batch_sizes)} are invalid", "give integers >= 1, e.g. 1,8,64")
    return sorted({m_bucket(m) for m in batch_sizes})


def fuse_engine_projections(model: nn.Module) -> list[QuantLinear]:
    """The fused GPTQ linears the engine's decode step runs in place of each layer's q/k/v and gate/up where the
    family's table lists them (runtime/engine/decode_step.py's fuse_layer_projections; kernels/fused_linear.py),
    built so that their shapes are tuned too: the engine serves a shape without a stored plan with a default one.
    The model's parts become views of the fused tensors, as in the engine (no copy is kept)."""
    spec = get_architecture(model)
    groups = [members for _, members in spec.fusable_groups if members in (QKV, GATE_UP)]
    fused = []
    for layer in decoder_layers(model, spec):
        for members in groups:
            try:
                parts = [layer.get_submodule(member) for member in members]
            except AttributeError:  # a layer without the group (e.g. a dense layer of a mixed family)
                continue
            result, _ = fuse_linears(parts, [member.rpartition(".")[2] for member in members])
            if result is not None and isinstance(result.module, QuantLinear):
                fused.append(result.module)
    return fused


def distinct_layers(model: nn.Module, backend: TritonBackend, dtype: torch.dtype, device: torch.device,
                    extra: list[QuantLinear] | tuple[QuantLinear, ...] = ()) -> tuple[int, list[GptqComputeWeight]]:
    """(quantized linears in the model, the backend's form of one layer per distinct tune key among them and the
    `extra` linears, e.g. the engine's fused projections)."""
    seen: set[TuneKey] = set()
    distinct = []
    model_linears = [module for module in model.modules() if isinstance(module, QuantLinear)]
    for module in [*model_linears, *extra]:
        weight = backend.prepare(module.backend_tensors())
        key = tune_key(weight, 1, dtype, device)
        if key not in seen:
            seen.add(key)
            distinct.append(weight)
    return len(model_linears), distinct


def tune_layers(model: nn.Module, batch_sizes: list[int] | tuple[int, ...], backend: TritonBackend, gpu: GpuFacts,
                dtype: torch.dtype, device: torch.device, progress: ProgressCallback | None = None,
                extra: list[QuantLinear] | tuple[QuantLinear, ...] = ()) -> TuneResult:
    """Decide every distinct layer's plan (the model's and `extra`'s) at every M bucket through `backend` (a tuning
    backend: stored plans are kept, new keys timed and stored) and check that the plans timed now can be read back
    from its cache."""
    if backend.plan_store is None:
        raise QtoolError("the tuned-plan cache is off (QTOOL_CACHE_DIR=off): the plans would be lost",
                         "unset QTOOL_CACHE_DIR, or set it to a writable directory")
    if dtype not in KERNEL_DTYPES:
        raise QtoolError(f"the Triton GPTQ kernels run in float16 or bfloat16, not {str(dtype).replace('torch.', '')}",
                         "pass --dtype bfloat16 or float16")
    buckets = m_buckets(batch_sizes)
    started = time.perf_counter()
    count, layers = distinct_layers(model, backend, dtype, device, extra)
    if not layers:
        raise QtoolError("the model has no GPTQ quantized linears: nothing to tune",
                         "qtool tune tunes the Triton GPTQ kernels of a quantized checkpoint (EXL2 kernels have no plans)")
    total = len(layers) * len(buckets)
    result = TuneResult(gpu.name, str(backend.plan_store.path), str(dtype).replace("torch.", ""), buckets, count,
                        len(layers), 0, 0, 0.0)
    timed_keys = []
    for index, (weight, m) in enumerate(((w, m) for w in layers for m in buckets)):
        if progress is not None:
            progress(index, total, f"{weight.in_features}->{weight.out_features} M={m}")
        key = tune_key(weight, m, dtype, device)
        x = torch.randn(m, weight.in_features, dtype=dtype, device=weight.qweight.device)
        had_timings = key in backend.tuner.timings
        plan = backend.decide_plan(key, x, weight, gpu)
        if key in backend.tuner.timings and not had_timings:
            timed = any(name == plan.describe() and isinstance(ms, float) for name, ms in backend.tuner.timings[key])
            source = "tuned" if timed else "untimed"
            if timed:
                timed_keys.append(key)
        else:
            source = "stored"
        result.tuned += source == "tuned"
        result.stored_before += source == "stored"
        result.plans.append(TunedPlan(weight.in_features, weight.out_features, weight.bits, weight.group_rows, m,
                                      plan.describe(), source))
    if progress is not None:
        progress(total, total, "")
    reread = kernel_plan_store(backend.plan_store.directory)
    missing = [key for key in timed_keys if reread.get(gpu.name, key) is None]
    if missing:
        raise QtoolError(f"could not write {len(missing)} tuned plans to {reread.path}",
                         "check that QTOOL_CACHE_DIR (default ~/.cache/qtool) is writable")
    result.seconds = time.perf_counter() - started
    return result


def tuning_device(device: str = "auto") -> torch.device:
    """The CUDA device `--device` names (auto: the current one), or a QtoolError: timing needs a GPU."""
    from qtool.checkpoints.sources import resolve_device
    from qtool.kernels.gptq_gemm_triton import triton_interpreted

    torch_device = resolve_device(device)
    if torch_device.type != "cuda":
        raise QtoolError("qtool tune times the Triton kernels on a CUDA GPU, and this run has none"
                         + ("" if device == "auto" else f" (--device {device})"),
                         "run it on the machine that serves the model; elsewhere default plans serve untuned shapes")
    if triton_interpreted():
        raise QtoolError("the Triton kernels were built by the interpreter (TRITON_INTERPRET=1), which cannot be timed",
                         "unset TRITON_INTERPRET")
    return torch_device if torch_device.index is not None else torch.device("cuda", torch.cuda.current_device())


def tune_model(model: str, batch_sizes: list[int] | tuple[int, ...] = DEFAULT_BATCH_SIZES, device: str = "auto",
               dtype: str | None = None, progress: ProgressCallback | None = None) -> TuneResult:
    """Load a GPTQ checkpoint on a CUDA GPU and tune its layers' plans into qtool's plan cache."""
    from qtool.checkpoints.sources import load_model

    torch_device = tuning_device(device)
    store = kernel_plan_store(default_cache_dir())
    if store is None:
        raise QtoolError("the tuned-plan cache is off (QTOOL_CACHE_DIR=off): the plans would be lost",
                         "unset QTOOL_CACHE_DIR, or set it to a writable directory")
    m_buckets(batch_sizes)  # a bad list fails before the model loads
    # the torch backend at load: the tuner builds its own Triton form of each distinct layer
    loaded = load_model(model, device=str(torch_device), dtype=dtype, backend="torch", with_tokenizer=False)
    model_dtype = loaded.model.get_input_embeddings().weight.dtype
    fused = fuse_engine_projections(loaded.model)
    return tune_layers(loaded.model, batch_sizes, tuning_triton_backend(store), GpuFacts.of(torch_device),
                       model_dtype, torch_device, progress, fused)
