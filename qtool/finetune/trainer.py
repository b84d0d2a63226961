"""The training loop (no HF Trainer): token-budget batches in a seeded order, loss summed over the batch's label
tokens and divided by their count in the whole (global) batch, AdamW, warm-up + linear/cosine schedule, gradient
clipping, bf16 autocast on CUDA, eval loss at intervals, checkpoints and resume.

The loss of a step does not depend on how its rows are split: each process of a torch.distributed group takes
rows rank::world of the batch, divides its summed token loss by the global count (every process knows the whole
batch) and the gradients are summed across processes, which is the 1-process gradient."""

from __future__ import annotations

import math
import resource
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from qtool.config.finetune_schema import FinetuneConfig
from qtool.core.errors import QtoolError
from qtool.finetune.checkpointing import latest_checkpoint, load_checkpoint, save_checkpoint
from qtool.finetune.data import IGNORE
from qtool.finetune.fused_forward import FusedForward
from qtool.finetune.packing import Row, collate, epoch_order, plan_batches


@dataclass
class StepReport:
    step: int
    total_steps: int
    loss: float
    lr: float
    tokens_per_second: float
    elapsed: float
    peak_memory_bytes: int
    eval_loss: float | None = None  # set on the steps that evaluated


@dataclass
class TrainResult:
    steps: int
    losses: list[float]  # one per step this run took (a resumed run: from the checkpoint's step on)
    eval_losses: list[tuple[int, float]] = field(default_factory=list)  # (step, loss)
    tokens: int = 0
    seconds: float = 0.0
    peak_memory_bytes: int = 0
    resumed_from_step: int = 0

    @property
    def final_loss(self) -> float | None:
        return self.losses[-1] if self.losses else None

    @property
    def eval_loss(self) -> float | None:
        return self.eval_losses[-1][1] if self.eval_losses else None

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(final_loss=self.final_loss, eval_loss=self.eval_loss, tokens_per_second=self.tokens_per_second)
        return data


@dataclass
class TrainingRun:
    model: torch.nn.Module  # trainable parameters marked requires_grad (a PeftModel, or the whole model)
    config: FinetuneConfig
    rows: list[Row]
    pad_id: int
    device: torch.device
    eval_rows: list[Row] | None = None
    checkpoint_dir: Path | None = None
    resume: bool = False
    progress: Callable[[StepReport], None] | None = None
    rank: int = 0
    world_size: int = 1
    fused: FusedForward | None = None  # the fused training forward (fused_forward.plan_fused_forward), or transformers'


def step_batches(rows: list[Row], config: FinetuneConfig) -> list[list[int]]:
    """Every step's rows, in order: epochs of seeded permutations, cut at max_steps (which may run past the
    epochs, starting new ones)."""
    batches: list[list[int]] = []
    epoch = 0
    while True:
        batches += plan_batches(rows, epoch_order(len(rows), config.seed, epoch), config.batch_tokens)
        epoch += 1
        if config.max_steps and len(batches) >= config.max_steps:
            return batches[: config.max_steps]
        if not config.max_steps and epoch >= config.epochs:
            return batches


def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """The learning rate's multiplier at `step` (0-based): linear warm-up, then constant or a linear or cosine
    decay to 0 at `total`."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    return max(0.0, 1 - progress) if schedule == "linear" else 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def make_optimizer(model: torch.nn.Module, config: FinetuneConfig, device: torch.device) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise QtoolError("the model has no trainable parameters", "check --target-modules")
    if config.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    try:
        import bitsandbytes
    except ImportError as exc:
        raise QtoolError(f"optimizer {config.optimizer} needs bitsandbytes, which is not installed", "pip install bitsandbytes, or use optimizer adamw") from exc
    if device.type != "cuda":
        raise QtoolError(f"optimizer {config.optimizer} runs on CUDA only, and the model is on {device}", "use optimizer adamw")
    kind = bitsandbytes.optim.PagedAdamW8bit if config.optimizer == "paged_adamw8bit" else bitsandbytes.optim.AdamW8bit
    return kind(params, lr=config.lr, weight_decay=config.weight_decay)


def autocast_dtype(config: FinetuneConfig, device: torch.device) -> torch.dtype | None:
    """bfloat16 autocast on CUDA (dtype auto or bfloat16); float32 (no autocast) on the CPU or when asked."""
    if config.dtype == "float32" or (config.dtype == "auto" and device.type != "cuda"):
        return None
    return torch.bfloat16


def summed_token_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor], dtype: torch.dtype | None,
                      fused: FusedForward | None = None) -> torch.Tensor:
    """Sum over the label tokens of the next-token cross entropy (float32 logits), through the fused forward when
    there is one."""
    with torch.autocast(batch["input_ids"].device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        if fused is not None:
            return fused.summed_token_loss(batch["input_ids"], batch["position_ids"], batch["labels"], IGNORE)
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
    labels = batch["labels"][:, 1:]
    return F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE, reduction="sum")


def peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # the process's peak resident set (Linux: KiB)


def _to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {key: value.to(device) for key, value in batch.items()}


def evaluate(model: torch.nn.Module, rows: list[Row], config: FinetuneConfig, pad_id: int, device: torch.device,
             fused: FusedForward | None = None) -> float:
    """Mean next-token loss over the label tokens of `rows`."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for batch_rows in plan_batches(rows, list(range(len(rows))), config.batch_tokens):
            chosen = [rows[i] for i in batch_rows]
            batch = _to(collate(chosen, pad_id), device)
            total += float(summed_token_loss(model, batch, autocast_dtype(config, device), fused))
            count += sum(row.label_tokens for row in chosen)
    model.train(was_training)
    return total / max(1, count)


def _all_reduce_gradients(params: list[torch.nn.Parameter]) -> None:
    import torch.distributed as dist

    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)


def train(run: TrainingRun) -> TrainResult:
    config, model, device = run.config, run.model, run.device
    batches = step_batches(run.rows, config)
    total = len(batches)
    optimizer = make_optimizer(model, config, device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, total, config.warmup_steps, config.schedule))
    start = 0
    if run.resume:
        found = latest_checkpoint(run.checkpoint_dir) if run.checkpoint_dir else None
        if found is None:
            raise QtoolError(f"--resume: no checkpoint in {run.checkpoint_dir}", "start without --resume (checkpoints come with --save-every N)")
        start = load_checkpoint(found, model, optimizer, scheduler, config)
    params = [p for p in model.parameters() if p.requires_grad]
    dtype = autocast_dtype(config, device)
    result = TrainResult(steps=total, losses=[], resumed_from_step=start)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    began = time.perf_counter()
    model.train()
    for step in range(start, total):
        chosen = [run.rows[i] for i in batches[step]]
        label_tokens = sum(row.label_tokens for row in chosen)
        mine = chosen[run.rank :: run.world_size]
        optimizer.zero_grad(set_to_none=True)
        loss_sum = torch.zeros((), device=device)
        if mine and label_tokens:
            loss_sum = summed_token_loss(model, _to(collate(mine, run.pad_id), device), dtype, run.fused)
            (loss_sum / label_tokens).backward()
        if run.world_size > 1:
            import torch.distributed as dist

            _all_reduce_gradients(params)
            loss_sum = loss_sum.detach().clone()
            dist.all_reduce(loss_sum, op=dist.ReduceOp.SUM)
        if config.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        loss = float(loss_sum.detach()) / max(1, label_tokens)
        result.losses.append(loss)
        result.tokens += sum(len(row.input_ids) for row in chosen)
        done = step + 1
        eval_loss = None
        if run.eval_rows and ((config.eval_every and done % config.eval_every == 0) or done == total):
            eval_loss = evaluate(model, run.eval_rows, config, run.pad_id, device, run.fused)
            result.eval_losses.append((done, eval_loss))
        if run.checkpoint_dir is not None and config.save_every and done % config.save_every == 0 and done < total and run.rank == 0:
            save_checkpoint(run.checkpoint_dir, done, model, optimizer, scheduler, config)
        elapsed = time.perf_counter() - began
        if run.progress is not None:
            run.progress(StepReport(done, total, loss, lr, result.tokens / elapsed if elapsed > 0 else 0.0, elapsed, peak_memory(device), eval_loss))
    result.seconds = time.perf_counter() - began
    result.peak_memory_bytes = peak_memory(device)
    return result
