"""How much the model's loss cares about each linear's output: an empirical-Fisher weight per linear, from
forward and backward passes of the float model over calibration windows, one decoder layer at a time.

For a small change dY of a linear's output, the loss moves by about 1/2 * sum_{t,n} F[t,n] * dY[t,n]^2 with
F = (dL/dY)^2 (the empirical Fisher, diagonal). A quantized linear with relative output error e (error energy
over output energy, as the EXL2 measurement reports it) spreads its error over the output channels about as
the channels' energies, dY[:, n]^2 ~ e * mean_t Y[t, n]^2, so its loss cost is about e * S with

    S = sum_n (sum_t F[t, n]) * (mean_t Y[t, n]^2)

S turns the measured relative errors of different linears into one currency, the loss.

The passes run layer by layer, as quantization does: a forward pass keeps every layer's input hidden states
(on `storage_device`), the head gives each window's loss gradient, and the gradient is carried down through one
layer at a time (that layer alone on the compute device, its forward recomputed with autograd on)."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Callable, Sequence

import torch
from torch import nn

from qtool.core.host_memory import give_back_freed_memory
from qtool.models.architectures import ArchitectureSpec, decoder_layers, get_architecture
from qtool.models.layerwise import (
    LayerInputs,
    capture_layer_inputs,
    head_logits,
    head_modules,
    next_layer_inputs,
    run_layer_batch,
    sample_batches,
)

Progress = Callable[[int, int, str], None]
# decoder layer index -> a context in which that layer's weights are in memory (a streamed model reads them)
LayerWeights = Callable[[int], AbstractContextManager]
# one layer's input hidden states -> the same values where they wait for the backward pass (e.g. an activation
# store's files on disk)
KeepInputs = Callable[[Sequence[torch.Tensor]], Sequence[torch.Tensor]]


class _ChannelSums:
    """Per output channel of one linear: sum over tokens of the squared loss gradient and of the squared output."""

    def __init__(self, out_features: int):
        self.fisher = torch.zeros(out_features, dtype=torch.float64)
        self.energy = torch.zeros(out_features, dtype=torch.float64)
        self.tokens = 0

    def add_output(self, output: torch.Tensor) -> None:
        flat = output.detach().reshape(-1, output.shape[-1]).to(torch.float64)
        self.energy += flat.square().sum(0).cpu()
        self.tokens += flat.shape[0]

    def add_gradient(self, grad: torch.Tensor) -> None:
        self.fisher += grad.reshape(-1, grad.shape[-1]).to(torch.float64).square().sum(0).cpu()

    def sensitivity(self) -> float:
        return float((self.fisher * self.energy / max(self.tokens, 1)).sum())


def _watch(linears: dict[str, nn.Linear], sums: dict[str, _ChannelSums]) -> list:
    """Hooks that feed each linear's outputs, and the gradients that later reach them, into its sums."""

    def watcher(name: str):
        def forward_hook(module: nn.Module, inputs, output: torch.Tensor) -> None:
            sums[name].add_output(output)
            if output.requires_grad:
                output.register_hook(lambda grad: sums[name].add_gradient(grad))  # returns None: grad flows on
        return forward_hook

    return [module.register_forward_hook(watcher(name)) for name, module in linears.items()]


def _move(module: nn.Module, device: torch.device) -> torch.device:
    """Move a module's parameters to `device`; returns where they were."""
    first = next(module.parameters(), None)
    where = first.device if first is not None else device
    module.to(device)
    return where


def linear_sensitivities(
    model: nn.Module,
    windows: Sequence[torch.Tensor],
    *,
    names: set[str] | None = None,
    device: torch.device | str = "cpu",
    storage_device: torch.device | str = "cpu",
    spec: ArchitectureSpec | None = None,
    progress: Progress | None = None,
    layer_weights: LayerWeights | None = None,
    keep_inputs: KeepInputs | None = None,
) -> dict[str, float]:
    """S (above) for every nn.Linear inside the decoder layers (or those named in `names`), summed over `windows`
    (int64 token ids; next-token loss, mean over the tokens of a window). Each layer visits `device` and returns
    where it was; weights are not changed and no weight gradient is formed. `layer_weights(i)` is entered around
    each visit of layer i (twice: forward, then backward), for a model whose layers' weights are read when needed;
    `keep_inputs` keeps each layer's inputs until the backward pass needs them (default: on `storage_device`)."""
    device = torch.device(device)
    spec = spec or get_architecture(model)
    head_modules(model, spec)  # a family without a known head is refused before any work
    was_training = model.training
    model.eval()
    try:
        return _sensitivities(model, windows, names, device, torch.device(storage_device), spec, progress, layer_weights or (lambda index: nullcontext()),
                              keep_inputs or tuple)
    finally:
        model.train(was_training)


def _sensitivities(model: nn.Module, windows: Sequence[torch.Tensor], names: set[str] | None, device: torch.device,
                   storage_device: torch.device, spec: ArchitectureSpec, progress: Progress | None, layer_weights: LayerWeights,
                   keep_inputs: KeepInputs) -> dict[str, float]:
    layers = decoder_layers(model, spec)
    prefix = spec.layers_path + "."
    per_layer: list[dict[str, nn.Linear]] = []
    for index, layer in enumerate(layers):
        found = {f"{prefix}{index}.{name}": module for name, module in layer.named_modules() if isinstance(module, nn.Linear)}
        per_layer.append({n: m for n, m in found.items() if names is None or n in names})
    sums = {name: _ChannelSums(module.out_features) for found in per_layer for name, module in found.items()}
    report = progress or (lambda done, total, detail="": None)
    total = 2 * len(layers) + 1

    # forward: every layer's inputs, kept for the backward pass
    inputs = capture_layer_inputs(model, list(windows), device="cpu", storage_device=storage_device, spec=spec)
    layer_inputs: list[LayerInputs | None] = []
    for index, layer in enumerate(layers):
        report(index, total, f"weighing: forward through layer {index + 1}/{len(layers)}")
        inputs = LayerInputs(inputs.layer_index, tuple(keep_inputs(inputs.hidden_states)), inputs.calls)
        layer_inputs.append(inputs)
        with layer_weights(index):
            where = _move(layer, device)
            inputs = next_layer_inputs(layer, inputs, device=device, storage_device=storage_device)
            layer.to(where)
        give_back_freed_memory()  # the layer's forward scratch

    # the head: each window's loss gradient with respect to the last layer's output
    report(len(layers), total, "weighing: loss gradients")
    head = head_modules(model, spec)
    head_places = [_move(module, device) for module in head]
    grads = []
    for window, hidden in zip(windows, inputs.hidden_states):
        ids = window.reshape(-1).to(device)
        final = hidden.to(device).detach().requires_grad_(True)
        with torch.enable_grad():
            logits = head_logits(model, final, spec=spec)[0, :-1].float()
            loss = nn.functional.cross_entropy(logits, ids[1:])
            (grad,) = torch.autograd.grad(loss, final)
        grads.append(grad.to(storage_device))
        give_back_freed_memory()  # the window's logits and their gradient
    for module, where in zip(head, head_places):
        module.to(where)

    # backward, one layer at a time: recompute its forward with autograd, carry the gradient to its input
    for index in range(len(layers) - 1, -1, -1):
        report(2 * len(layers) - index, total, f"weighing: backward through layer {index + 1}/{len(layers)}")
        layer, stored = layers[index], layer_inputs[index]
        with layer_weights(index):
            where = _move(layer, device)
            hooks = _watch(per_layer[index], sums)
            moved: dict = {}
            try:
                for samples in sample_batches(stored):  # windows that share their layer arguments, as one batch
                    hidden = torch.cat([stored.hidden_states[k] for k in samples]).to(device).requires_grad_(True)
                    batch = LayerInputs(index, (hidden,), (stored.calls[samples[0]],))
                    with torch.enable_grad():
                        output = run_layer_batch(layer, batch, (0,), device=device, moved=moved, grad=True)
                        incoming = torch.cat([grads[k] for k in samples]).to(device)
                        (grad,) = torch.autograd.grad(output, hidden, grad_outputs=incoming)
                    for k, piece in zip(samples, grad.split([stored.hidden_states[k].shape[0] for k in samples])):
                        grads[k] = piece.to(storage_device)
            finally:
                for hook in hooks:
                    hook.remove()
                layer.to(where)
        layer_inputs[index] = stored = None  # its inputs are not needed again
        give_back_freed_memory()  # them and the layer's autograd buffers
    report(total, total, "weighing: done")
    return {name: s.sensitivity() for name, s in sums.items()}
