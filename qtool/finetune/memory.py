"""A coarse estimate of a fine-tuning run's peak memory (weights, gradients, optimizer state, activations, logits),
checked against what the device has free before the first step, so a run that cannot fit fails at once."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from qtool.config.finetune_schema import FinetuneConfig, check_fits
from qtool.kernels.train_ops import CROSS_ENTROPY_CHUNK_VALUES

# bytes of optimizer state per trainable parameter: AdamW's two float32 moments, or two 8-bit ones
OPTIMIZER_STATE_BYTES = {"adamw": 8, "adamw8bit": 2, "paged_adamw8bit": 2}
# values kept per token and layer for the backward, in units of hidden / intermediate width: the decoder layer's
# inputs, norms, q/k/v/o and attention output (~8 x hidden) and the MLP's gate, up, act and product (~4 x inter)
HIDDEN_SAVED, INTERMEDIATE_SAVED = 8, 4
LOGIT_COPIES = 3  # float32 logits, their log-softmax and its gradient
# the fused forward's chunked loss (kernels/train_ops.linear_cross_entropy): one chunk's float32 logits, turned
# into their gradient in place, and that gradient in the compute dtype
CHUNK_LOGIT_COPIES = 2


@dataclass
class MemoryEstimate:
    weights: int
    gradients: int
    optimizer: int
    activations: int

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.activations

    def breakdown(self) -> str:
        parts = ("weights", "gradients", "optimizer", "activations")
        return ", ".join(f"{name} {getattr(self, name) / 2**30:.2f}" for name in parts) + " GiB"

    def to_dict(self) -> dict[str, int]:
        return {"weights": self.weights, "gradients": self.gradients, "optimizer": self.optimizer,
                "activations": self.activations, "total": self.total}


def estimate_peak_memory(model: torch.nn.Module, config: FinetuneConfig, compute_bytes: int,
                         chunked_loss: bool = False) -> MemoryEstimate:
    """From the model's tensors (as loaded and wrapped) and the run's batch shape. chunked_loss: the run trains
    through the fused forward, whose loss holds one chunk of logits at a time (and the hidden states' gradient)."""
    model_config = model.config
    weights = sum(t.numel() * t.element_size() for t in model.parameters()) + sum(t.numel() * t.element_size() for t in model.buffers())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    hidden = getattr(model_config, "hidden_size", 0)
    intermediate = getattr(model_config, "intermediate_size", 4 * hidden) or 4 * hidden
    layers = getattr(model_config, "num_hidden_layers", 1)
    vocab = getattr(model_config, "vocab_size", 0)
    tokens = config.batch_tokens
    per_layer = tokens * (HIDDEN_SAVED * hidden + INTERMEDIATE_SAVED * intermediate) * compute_bytes
    if config.grad_checkpointing:
        # each layer keeps its input; one layer at a time recomputes the rest
        stored = layers * tokens * hidden * compute_bytes + per_layer
    else:
        stored = layers * per_layer
    if chunked_loss:
        rows = min(tokens, max(1, CROSS_ENTROPY_CHUNK_VALUES // max(1, vocab)))
        logits = rows * vocab * 4 * CHUNK_LOGIT_COPIES + tokens * hidden * compute_bytes
    else:
        logits = tokens * vocab * 4 * LOGIT_COPIES
    return MemoryEstimate(weights=weights, gradients=trainable * 4, optimizer=trainable * OPTIMIZER_STATE_BYTES[config.optimizer],
                          activations=stored + logits)


def free_bytes(device: torch.device) -> int:
    """What the device has free now: CUDA's free memory, or the host's MemAvailable."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    meminfo = Path("/proc/meminfo")
    if meminfo.exists():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    import os

    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def check_memory(estimate: MemoryEstimate, device: torch.device, available: int | None = None) -> None:
    """The weights are loaded already: the rest of the estimate must fit in what is free."""
    free = free_bytes(device) if available is None else available
    check_fits(estimate.total - estimate.weights, free, str(device), estimate.breakdown())
