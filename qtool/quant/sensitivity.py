"""How much the model's loss cares about each linear's output: an empirical-Fisher weight per linear, from
forward and backward passes of the float model over calibration windows, one decoder layer at a time.

For a small change dY of a linear's output, the loss moves by about 1/2 * sum_{t,n} F[t,n] * dY[t,n]^2 with
F = (dL/dY)^2 (the empirical Fisher, diagonal). A quantized linear with relative output error e (error energy
over output energy, as the EXL2 measurement reports it) spreads its error over the output channels about as
the channels' energies, dY[:, n]^2 ~ e * mean_t Y[t, n]^2, so its loss cost is about e * S with

    S = sum_n (sum_t F[t, n]) * (mean_t Y[t, n]^2)

S turns the measured relative errors of different linears into one currency, the loss.

The passes run layer by layer, as quantization does: a forward pass keeps every layer's input hidden states,
the head gives each window's loss gradient, and the gradient is carried down through one layer at a time (that
layer alone on the compute device, its forward recomputed with autograd on).

Memory: the kept inputs and the windows' gradients wait in an activation store (quant/activation_store.py: on the
GPU, in pinned host memory or in memory-mapped files, where the memory estimate's plan puts them), and every
step (a layer's forward, the head, a layer's backward) is on the memory ladder (quant/memory_ladder.py): out of
GPU memory, the windows not yet done are redone with one window per batch (the head: HEAD_PIECE_TOKENS positions
of a window at a time), then with everything kept in host memory, then on the CPU. Each linear's sums are added one
window at a time in window order, and a window's result is kept only once its batch is through, so neither the
batching nor the rung changes a value where a window's result does not depend on its batch (on the CPU, tested
byte for byte; memory_ladder says what a GPU may do)."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Callable, Sequence

import torch
from torch import nn

from qtool.core.host_memory import give_back_freed_memory
from qtool.models.architectures import ArchitectureSpec, decoder_layers, get_architecture
from qtool.models.layerwise import (
    BATCH_TOKENS,
    LayerInputs,
    capture_layer_inputs,
    head_logits,
    head_modules,
    run_layer_batch,
    sample_batches,
    split_batch,
)
from qtool.quant.activation_store import ActivationStore
from qtool.quant.memory_ladder import LadderRun, Rung

Progress = Callable[[int, int, str], None]
# decoder layer index -> a context in which that layer's weights are in memory (a streamed model reads them)
LayerWeights = Callable[[int], AbstractContextManager]
# Below the planned rung a window's positions go through the head this many at a time: its logits (vocabulary x
# positions, the head's largest tensors) an eighth of a 2048-token window's. (Pieces of a few rows would not do:
# on the CPU, MKL gives rows of such small products other last bits than the same rows of a large one.)
HEAD_PIECE_TOKENS = 256


class _ChannelSums:
    """Per output channel of one linear: sum over tokens of the squared loss gradient and of the squared output,
    added one window at a time. They stay on the compute device (no copy to the host per window; a float64
    addition gives the same bits on any device)."""

    def __init__(self, out_features: int, device: torch.device):
        self.fisher = torch.zeros(out_features, dtype=torch.float64, device=device)
        self.energy = torch.zeros(out_features, dtype=torch.float64, device=device)
        self.tokens = 0

    def add_window(self, energy: torch.Tensor, fisher: torch.Tensor, tokens: int) -> None:
        self.energy += energy.to(self.energy.device)
        self.fisher += fisher.to(self.fisher.device)
        self.tokens += tokens

    def sensitivity(self) -> float:
        return float((self.fisher * self.energy / max(self.tokens, 1)).sum())


def _per_window(tensor: torch.Tensor, tokens: list[int]) -> list[tuple[torch.Tensor, int]]:
    """Per window of a batch (its rows are the windows' tokens, window after window): the sum over its tokens of
    the squared values per channel, and its token count. A linear that sees only some of the tokens (a routed
    expert) gives one sum for the batch."""
    flat = tensor.detach().reshape(-1, tensor.shape[-1])
    sizes = tokens if flat.shape[0] == sum(tokens) else [flat.shape[0]]
    return [(piece.to(torch.float64).square().sum(0), piece.shape[0]) for piece in flat.split(sizes)]


def _watch(linears: dict[str, nn.Linear], tokens: list[int], energy: dict[str, list], fisher: dict[str, list]) -> list:
    """Hooks that put each linear's per-window output energies, and the per-window squared gradients that later
    reach its output, in `energy` and `fisher` (a batch's windows with `tokens` tokens each)."""

    def watcher(name: str):
        def forward_hook(module: nn.Module, inputs, output: torch.Tensor) -> None:
            energy[name] = _per_window(output, tokens)
            if output.requires_grad:
                output.register_hook(lambda grad: fisher.__setitem__(name, _per_window(grad, tokens)))  # returns None: grad flows on
        return forward_hook

    return [module.register_forward_hook(watcher(name)) for name, module in linears.items()]


def _device_of(module: nn.Module) -> torch.device:
    first = next(module.parameters(), None)
    return first.device if first is not None else torch.device("cpu")


class _Held:
    """What the weighing pass holds between its steps, where its store keeps it: the inputs of every layer the
    backward pass has not been through yet (and the last layer's outputs, until the head is done), the results of
    the step in progress by window (a forward's outputs, the head's or a backward's gradients), and each window's
    loss gradient with respect to the output of the layer the backward pass is at."""

    def __init__(self):
        self.saved: list[LayerInputs | None] = []
        self.done: dict[int, torch.Tensor] = {}
        self.grads: list[torch.Tensor | None] = []  # None: the window's new gradient is in `done`

    def rehome(self, store: ActivationStore) -> None:
        """Everything into `store` (the ladder's host rung)."""
        self.saved = [None if s is None else LayerInputs(s.layer_index, store.store(s.hidden_states), s.calls) for s in self.saved]
        self.done = {k: t.to(store.device) for k, t in self.done.items()}
        self.grads = [None if g is None else g.to(store.device) for g in self.grads]

    def take_done(self, count: int) -> list[torch.Tensor]:
        results, self.done = [self.done[k] for k in range(count)], {}
        return results


def linear_sensitivities(
    model: nn.Module,
    windows: Sequence[torch.Tensor],
    *,
    names: set[str] | None = None,
    device: torch.device | str = "cpu",
    spec: ArchitectureSpec | None = None,
    progress: Progress | None = None,
    layer_weights: LayerWeights | None = None,
    store: ActivationStore | None = None,
) -> dict[str, float]:
    """S (above) for every nn.Linear inside the decoder layers (or those named in `names`), summed over `windows`
    (int64 token ids; next-token loss, mean over the tokens of a window). Each layer visits `device` and returns
    where it was; weights are not changed and no weight gradient is formed. `layer_weights(i)` is entered around
    each visit of layer i (twice: forward, then backward), for a model whose layers' weights are read when needed.
    `store` keeps every layer's inputs until the backward pass needs them (default: host memory); out of GPU
    memory, a step goes down the memory ladder, each step logged."""
    device = torch.device(device)
    spec = spec or get_architecture(model)
    head_modules(model, spec)  # a family without a known head is refused before any work
    was_training = model.training
    model.eval()
    try:
        return _sensitivities(model, windows, names, device, spec, progress or (lambda done, total, detail="": None),
                              layer_weights or (lambda index: nullcontext()), store or ActivationStore("host", device))
    finally:
        model.train(was_training)


def _sensitivities(model: nn.Module, windows: Sequence[torch.Tensor], names: set[str] | None, device: torch.device, spec: ArchitectureSpec,
                   report: Progress, layer_weights: LayerWeights, store: ActivationStore) -> dict[str, float]:
    layers = decoder_layers(model, spec)
    prefix = spec.layers_path + "."
    per_layer: list[dict[str, nn.Linear]] = []
    for index, layer in enumerate(layers):
        found = {f"{prefix}{index}.{name}": module for name, module in layer.named_modules() if isinstance(module, nn.Linear)}
        per_layer.append({n: m for n, m in found.items() if names is None or n in names})
    sums = {name: _ChannelSums(module.out_features, device) for found in per_layer for name, module in found.items()}
    total = 2 * len(layers) + 1
    held = _Held()
    run = LadderRun(store, device, held.rehome)
    count = len(windows)

    # forward: every layer's inputs, kept for the backward pass
    captured = capture_layer_inputs(model, list(windows), device="cpu", storage_device="cpu", spec=spec)
    held.saved.append(LayerInputs(0, run.store.store(captured.hidden_states), captured.calls))
    del captured
    for index, layer in enumerate(layers):
        what = f"weighing: forward through layer {index + 1}/{len(layers)}"
        report(index, total, what)
        with layer_weights(index):
            home = _device_of(layer)  # where its weights are once read
            run.climb(what, lambda rung, index=index, layer=layer: _forward(layer, held.saved[index], rung, held, run),
                      restore=lambda layer=layer, home=home: layer.to(home))
            layer.to(home)
        held.saved.append(held.saved[index].advanced(run.store.store(held.take_done(count))))
        give_back_freed_memory()  # the layer's forward scratch

    # the head: each window's loss gradient with respect to the last layer's output
    what = "weighing: loss gradients"
    report(len(layers), total, what)
    head = head_modules(model, spec)
    homes = [_device_of(module) for module in head]

    def restore_head() -> None:
        for module, home in zip(head, homes):
            module.to(home)

    run.climb(what, lambda rung: _head_gradients(model, spec, windows, held.saved[-1], rung, held, run), restore_head)
    restore_head()
    held.grads, held.saved[-1] = held.take_done(count), None
    give_back_freed_memory()  # the windows' logits, the last layer's outputs

    # backward, one layer at a time: recompute its forward with autograd, carry the gradient to its input
    for index in range(len(layers) - 1, -1, -1):
        what = f"weighing: backward through layer {index + 1}/{len(layers)}"
        report(2 * len(layers) - index, total, what)
        layer = layers[index]
        with layer_weights(index):
            home = _device_of(layer)
            run.climb(what, lambda rung, index=index, layer=layer: _backward(layer, index, per_layer[index], sums, rung, held, run),
                      restore=lambda layer=layer, home=home: layer.to(home))
            layer.to(home)
        held.grads = held.take_done(count)
        held.saved[index] = None  # its inputs are not needed again
        give_back_freed_memory()  # them and the layer's autograd buffers
    report(total, total, "weighing: done")
    return {name: s.sensitivity() for name, s in sums.items()}


def _todo(samples: tuple[int, ...], done) -> tuple[int, ...]:
    """The windows of a batch not done before memory ran out (a batch of the planned rung may be cut)."""
    return tuple(k for k in samples if k not in done)


def _forward(layer: nn.Module, inputs: LayerInputs, rung: Rung, held: _Held, run: LadderRun) -> None:
    """The layer's output for every window not yet done, into held.done (where the store keeps activations)."""
    layer.to(rung.compute)
    moved: dict = {}
    for samples in sample_batches(inputs, rung.max_batch_tokens or BATCH_TOKENS):
        todo = _todo(samples, held.done)
        if todo:
            output = run_layer_batch(layer, inputs, todo, device=rung.compute, moved=moved)
            for k, piece in zip(todo, split_batch(output, inputs, todo)):
                held.done[k] = piece.to(run.store.device)


def _head_gradients(model: nn.Module, spec: ArchitectureSpec, windows: Sequence[torch.Tensor], last: LayerInputs, rung: Rung,
                    held: _Held, run: LadderRun) -> None:
    """Each window's loss gradient with respect to the last layer's output, into held.done; below the planned
    rung HEAD_PIECE_TOKENS positions at a time."""
    for module in head_modules(model, spec):
        module.to(rung.compute)
    piece_tokens = None if rung.max_batch_tokens is None else HEAD_PIECE_TOKENS
    for k, (window, hidden) in enumerate(zip(windows, last.hidden_states)):
        if k not in held.done:
            held.done[k] = _loss_gradient(model, spec, window, hidden, rung.compute, piece_tokens).to(run.store.device)


def _loss_gradient(model: nn.Module, spec: ArchitectureSpec, window: torch.Tensor, hidden: torch.Tensor, device: torch.device,
                   piece_tokens: int | None) -> torch.Tensor:
    """d(mean next-token loss of the window) / d(hidden), its positions through the head `piece_tokens` at a time
    (None: all at once). Each piece's loss is its summed cross-entropy over the window's count of predictions, so
    every position's gradient is the one a single run gives (the head works on each position alone); the last
    position predicts nothing."""
    ids = window.reshape(-1).to(device)
    final = hidden.to(device).detach()
    predictions = final.shape[1] - 1
    grad = torch.zeros_like(final)
    step = max(1, piece_tokens or predictions)
    for start in range(0, predictions, step):
        end = min(start + step, predictions)
        part = final[:, start:end].detach().requires_grad_(True)
        with torch.enable_grad():
            logits = head_logits(model, part, spec=spec)[0].float()
            loss = nn.functional.cross_entropy(logits, ids[start + 1:end + 1], reduction="sum") / predictions
            (piece,) = torch.autograd.grad(loss, part)
        grad[:, start:end] = piece
        del logits, loss, piece
    return grad


def _backward(layer: nn.Module, index: int, linears: dict[str, nn.Linear], sums: dict[str, _ChannelSums], rung: Rung, held: _Held,
              run: LadderRun) -> None:
    """Carry each window's gradient not yet done through the layer into held.done (its gradient at the layer's
    output is dropped then: one set of gradients is held), and add each window's sums to the layer's linears, both
    once the window's batch is through."""
    stored = held.saved[index]
    layer.to(rung.compute)
    moved: dict = {}
    for samples in sample_batches(stored, rung.max_batch_tokens or BATCH_TOKENS):  # windows that share their layer arguments
        todo = _todo(samples, held.done)
        if not todo:
            continue
        tokens = [stored.hidden_states[k].shape[0] * stored.hidden_states[k].shape[1] for k in todo]
        energy: dict[str, list] = {}
        fisher: dict[str, list] = {}
        hooks = _watch(linears, tokens, energy, fisher)
        try:
            hidden = torch.cat([stored.hidden_states[k].to(rung.compute) for k in todo]).requires_grad_(True)
            batch = LayerInputs(index, (hidden,), (stored.calls[todo[0]],))
            with torch.enable_grad():
                output = run_layer_batch(layer, batch, (0,), device=rung.compute, moved=moved, grad=True)
                incoming = torch.cat([held.grads[k].to(rung.compute) for k in todo])
                (grad,) = torch.autograd.grad(output, hidden, grad_outputs=incoming)
        finally:
            for hook in hooks:
                hook.remove()
        for name in linears:  # the batch is through: its windows count, in window order
            grads = fisher.get(name)
            for i, (window_energy, rows) in enumerate(energy.get(name, ())):
                sums[name].add_window(window_energy, grads[i][0] if grads else torch.zeros_like(window_energy), rows)
        for k, piece in zip(todo, grad.split([stored.hidden_states[k].shape[0] for k in todo])):
            held.done[k] = piece.to(run.store.device)
            held.grads[k] = None
