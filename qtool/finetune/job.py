"""`qtool finetune`'s library function: load the base, read the data, set the method up, check the memory, train
and write the output atomically (a PEFT adapter for lora, a whole model directory for full)."""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from qtool.checkpoints.sources import load_model, plain_model_copy, resolve_device, resolve_source
from qtool.config.finetune_schema import FinetuneConfig, check_method_for_base
from qtool.core.errors import QtoolError
from qtool.core.output_claim import claimed_output
from qtool.core.output_dir import atomic_output_dir
from qtool.core.output_marker import check_replaceable, is_qtool_output
from qtool.core.output_path import check_output_path
from qtool.finetune.checkpointing import CONFIG_FILE, checkpoints_dir, step_dirs
from qtool.finetune.data import TokenizedData, load_examples
from qtool.finetune.lora_setup import make_lora_model, quantized_format
from qtool.finetune.memory import MemoryEstimate, check_memory, estimate_peak_memory
from qtool.finetune.packing import make_rows
from qtool.finetune.fused_forward import training_forward
from qtool.finetune.trainer import StepReport, TrainingRun, TrainResult, autocast_dtype, train

RESULT_FILE = "finetune_result.json"


@dataclass
class FinetuneJob:
    model: str
    data: str
    output: Path
    config: FinetuneConfig
    eval_data: str | None = None
    resume: bool = False
    force: bool = False
    device: str = "auto"


@dataclass
class FinetuneResult:
    output: str
    method: str
    data_kind: str
    examples: int
    rows: int
    train: TrainResult
    memory_estimate: MemoryEstimate
    checkpoints: str | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"output": self.output, "method": self.method, "data_kind": self.data_kind, "examples": self.examples,
                "rows": self.rows, **self.train.to_dict(), "memory_estimate": self.memory_estimate.to_dict(),
                "checkpoints": self.checkpoints, "notes": self.notes}


def load_dtype(config: FinetuneConfig, device: torch.device) -> torch.dtype:
    """Full fine-tuning keeps float32 master weights (autocast computes in bf16 on CUDA); LoRA's frozen base
    is held in bf16 on CUDA unless float32 is asked for."""
    if config.method == "full" or config.dtype == "float32" or device.type != "cuda":
        return torch.float32
    return torch.bfloat16


def float_reference(config: FinetuneConfig) -> torch.nn.Module | None:
    """lora_init loftq: the float model named by loftq_float, on the CPU (read once for the adapters' init)."""
    if config.lora_init != "loftq":
        return None
    loaded = load_model(config.loftq_float, device="cpu", dtype=torch.float32)
    if quantized_format(loaded.model) is not None:
        raise QtoolError(f"loftq_float {config.loftq_float!r} is a quantized model", "name the float model the quantized base was made from")
    return loaded.model


def prepare_model(model: torch.nn.Module, config: FinetuneConfig, resumed: bool = False) -> torch.nn.Module:
    """The trainable model of the method: a PEFT LoRA model, or the whole model trainable (full). resumed: the
    trainable values will come from a checkpoint, so no adapter init is computed (LoftQ's float model not read)."""
    torch.manual_seed(config.seed)  # LoRA's A init is drawn here: the same seed gives the same run
    if config.method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
    else:
        model = make_lora_model(model, config, None if resumed else float_reference(config), resumed=resumed)
    if config.grad_checkpointing:
        # non-reentrant: gradients reach LoRA weights even though the frozen embeddings' outputs need none
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def _check_checkpoint_folder(job: FinetuneJob, folder: Path) -> None:
    if job.resume or not step_dirs(folder):
        return
    if not job.force:
        raise QtoolError(f"checkpoints of an earlier run are in {folder}", "pass --resume to continue that run, or --force to start over")
    for old in step_dirs(folder):
        if is_qtool_output(old):
            shutil.rmtree(old, ignore_errors=True)


def write_output(staging: Path, model: torch.nn.Module, tokenizer: Any, config: FinetuneConfig, base: str) -> None:
    """lora: PEFT's adapter files (adapter_config.json + adapter_model.safetensors) naming `base`; full: a model
    directory transformers and qtool load. The tokenizer beside either (its chat template included)."""
    if config.method == "full":
        plain = model if getattr(model.config, "quantization_config", None) is None else plain_model_copy(model)
        plain.save_pretrained(str(staging))
    else:
        model.peft_config["default"].base_model_name_or_path = base
        model.save_pretrained(str(staging))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(staging))
    (staging / CONFIG_FILE).write_text(config.to_json() + "\n")


def _examples(source: str, tokenizer: Any, config: FinetuneConfig, option: str) -> TokenizedData:
    return load_examples(source, tokenizer, config.seqlen, option)


def run_finetune(job: FinetuneJob, progress: Callable[[StepReport], None] | None = None, available_memory: int | None = None,
                 rank: int = 0, world_size: int = 1) -> FinetuneResult:
    """The whole job in this process; with world_size > 1 this is process `rank` of a torch.distributed group
    (qtool.finetune.distributed starts them): each trains on its share of every batch, rank 0 writes."""
    config = job.config
    device = resolve_device(job.device)
    if device.type == "cuda" and world_size > 1:
        device = torch.device("cuda", rank)
    source = resolve_source(job.model)  # a bad MODEL fails before anything else
    inputs = [p for p in (source.path if source.kind == "hf_dir" else None, Path(job.data)) if p is not None and Path(p).exists()]
    output = check_output_path(job.output, inputs)
    check_replaceable(output, job.force)
    folder = checkpoints_dir(output)
    loaded = load_model(source, device=str(device), dtype=load_dtype(config, device))
    if loaded.tokenizer is None:
        raise QtoolError(f"model '{job.model}' has no tokenizer", "the model directory needs its tokenizer files to tokenize the data")
    check_method_for_base(config, quantized_format(loaded.model))
    data = _examples(job.data, loaded.tokenizer, config, "--data")
    eval_data = _examples(job.eval_data, loaded.tokenizer, config, "--eval-data") if job.eval_data else None
    rows = make_rows(data.examples, config.seqlen, config.packing)
    model = prepare_model(loaded.model, config, resumed=job.resume)  # --resume without a checkpoint: train() refuses
    fused, forward_note = training_forward(model, config.fused_ops, device)
    compute_bytes = 2 if autocast_dtype(config, device) is not None else 4
    estimate = estimate_peak_memory(model, config, compute_bytes, chunked_loss=fused is not None)
    check_memory(estimate, device, available_memory)
    pad_id = loaded.tokenizer.pad_token_id if loaded.tokenizer.pad_token_id is not None else loaded.tokenizer.eos_token_id
    notes = list(loaded.notes)
    if data.truncated:
        notes.append(f"{data.truncated} examples were cut to seqlen {config.seqlen}")
    if data.dropped:
        notes.append(f"{data.dropped} examples had no token to learn within seqlen {config.seqlen} and were left out")
    notes.append(forward_note)
    run = TrainingRun(model=model, config=config, rows=rows, pad_id=pad_id, device=device, fused=fused,
                      eval_rows=make_rows(eval_data.examples, config.seqlen, config.packing) if eval_data else None,
                      checkpoint_dir=folder, resume=job.resume, progress=progress, rank=rank, world_size=world_size)
    if rank != 0:
        trained = train(run)
    else:
        with claimed_output(output, job.force):
            _check_checkpoint_folder(job, folder)
            trained = train(run)
            model.eval()
            with atomic_output_dir(output, job.force, what=f"finetune {config.method} output") as staging:
                write_output(staging, model, loaded.tokenizer, config, job.model)
    return FinetuneResult(output=str(output), method=config.method, data_kind=data.kind, examples=len(data.examples),
                          rows=len(rows), train=trained, memory_estimate=estimate,
                          checkpoints=str(folder) if step_dirs(folder) else None, notes=notes)
