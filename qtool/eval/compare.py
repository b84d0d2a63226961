"""`qtool eval --compare`: several models on the same perplexity windows, with size on disk, bits per weight,
speed, and a one-line recommendation."""

from __future__ import annotations

import gc
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from qtool.core.errors import QtoolError
from qtool.data.text import tokenize_text
from qtool.checkpoints.footprint import model_footprint
from qtool.eval.perplexity import ProgressCallback, choose_seqlen, cut_windows, perplexity_of_windows
from qtool.checkpoints.sources import LoadedModel, load_model

DEFAULT_TOLERANCE = 0.02  # a model within 2% of the best perplexity counts as "as good"


@dataclass
class ModelReport:
    model: str
    ppl: float
    windows: int
    seqlen: int
    tokens: int
    seconds: float
    tokens_per_second: float
    size_bytes: int
    bits_per_weight: float | None
    format: str


@dataclass
class CompareResult:
    models: list[ModelReport]
    seqlen: int
    windows: int
    recommendation: str
    tolerance: float = DEFAULT_TOLERANCE
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def human_size(size: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} B"


def recommend(reports: list[ModelReport], tolerance: float = DEFAULT_TOLERANCE) -> str:
    """The smallest model on disk whose perplexity is within `tolerance` of the best, and why."""
    best = min(reports, key=lambda r: r.ppl)
    close = [r for r in reports if r.ppl <= best.ppl * (1 + tolerance)]
    pick = min(close, key=lambda r: (r.size_bytes, r.ppl))
    percent = f"{tolerance:.0%}"
    if pick is best:
        line = f"{best.model}: lowest perplexity ({best.ppl:.3f}) and the smallest on disk ({human_size(best.size_bytes)}) of the models within {percent} of it"
    else:
        line = (
            f"{pick.model}: perplexity {pick.ppl:.3f} is {pick.ppl / best.ppl - 1:.1%} above the best ({best.model}, {best.ppl:.3f}), "
            f"within {percent}, at {human_size(pick.size_bytes)} ({pick.size_bytes / best.size_bytes:.0%} of its size)"
        )
    smaller = [r for r in reports if r.size_bytes < pick.size_bytes]
    if smaller:
        nearest = min(smaller, key=lambda r: r.ppl)
        line += f"; {nearest.model} is smaller ({human_size(nearest.size_bytes)}) but {nearest.ppl / best.ppl - 1:.1%} worse"
    return line


def release(loaded: LoadedModel) -> None:
    """Free a model's memory before the next one is loaded."""
    on_cuda = next(loaded.model.parameters()).device.type == "cuda"
    loaded.model = None
    gc.collect()
    if on_cuda:
        torch.cuda.empty_cache()


def overall_progress(progress: ProgressCallback | None, offset: int, total: int, name: str) -> ProgressCallback | None:
    """One model's window progress as a step of the whole comparison."""
    if progress is None:
        return None
    return lambda done, _count, detail: progress(offset + done, total, f"{name}: {detail}")


def compare_models(
    specs: list[str],
    text: str,
    seqlen: int | None = None,
    windows: int | None = None,
    device: str = "auto",
    dtype: str | None = None,
    progress: ProgressCallback | None = None,
    tolerance: float = DEFAULT_TOLERANCE,
) -> CompareResult:
    """Perplexity of each model on the same token windows (one model in memory at a time). Models must
    tokenize the text identically, else their perplexities would not be comparable."""
    if len(specs) < 2:
        raise QtoolError(f"--compare needs at least two models, got {len(specs)}", "e.g. qtool eval --compare MODEL_A MODEL_B --perplexity wikitext")
    reports: list[ModelReport] = []
    reference_ids: torch.Tensor | None = None
    token_windows: torch.Tensor | None = None
    for index, spec in enumerate(specs):
        loaded = load_model(spec, device=device, dtype=dtype)
        if loaded.tokenizer is None:
            raise QtoolError(f"model '{spec}' has no tokenizer", "the model directory needs its tokenizer files to tokenize the text")
        ids = tokenize_text(loaded.tokenizer, text)
        if reference_ids is None:
            seqlen = choose_seqlen(loaded.model, seqlen)
            reference_ids, token_windows = ids, cut_windows(ids, seqlen, windows)
        elif not torch.equal(ids, reference_ids):
            raise QtoolError(
                f"'{spec}' tokenizes the text differently from '{specs[0]}'; their perplexities would not be comparable",
                "compare models that share one tokenizer (quantized variants of the same model)",
            )
        else:
            choose_seqlen(loaded.model, seqlen)  # the shared window must fit every model's context
        count = token_windows.shape[0]
        result = perplexity_of_windows(loaded.model, token_windows, progress=overall_progress(progress, index * count, len(specs) * count, spec), name=spec)
        footprint = model_footprint(loaded.source, loaded.quantization_config)
        reports.append(ModelReport(model=spec, **asdict(result), size_bytes=footprint.size_bytes, bits_per_weight=footprint.bits_per_weight, format=footprint.format))
        release(loaded)
    notes = ["GGUF models are dequantized to float for evaluation; their size and bits are those of the file"] if any(r.format.startswith("gguf") for r in reports) else []
    return CompareResult(models=reports, seqlen=token_windows.shape[1], windows=token_windows.shape[0], recommendation=recommend(reports, tolerance), tolerance=tolerance, notes=notes)
