"""How much the model's loss cares about each linear's output: an empirical-Fisher weight per linear, from
forward and backward passes of the float model over calibration windows.

For a small change dY of a linear's output, the loss moves by about 1/2 * sum_{t,n} F[t,n] * dY[t,n]^2 with
F = (dL/dY)^2 (the empirical Fisher, diagonal). A quantized linear with relative output error e (error energy
over output energy, as the EXL2 measurement reports it) spreads its error over the output channels about as
the channels' energies, dY[:, n]^2 ~ e * mean_t Y[t, n]^2, so its loss cost is about e * S with

    S = sum_n (sum_t F[t, n]) * (mean_t Y[t, n]^2)

S turns the measured relative errors of different linears into one currency, the loss."""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

Progress = Callable[[int, int, str], None]


def linear_sensitivities(
    model: nn.Module,
    linears: dict[str, nn.Linear],
    windows: Sequence[torch.Tensor],
    device: torch.device | str = "cpu",
    progress: Progress | None = None,
) -> dict[str, float]:
    """S (above) for each named linear, summed over `windows` (int64 token ids, next-token loss, mean over the
    tokens of a window). The model's weights are left untouched (no optimizer step) and its gradients cleared."""
    fisher = {name: torch.zeros(m.out_features, dtype=torch.float64) for name, m in linears.items()}
    energy = {name: torch.zeros(m.out_features, dtype=torch.float64) for name, m in linears.items()}
    tokens = {name: 0 for name in linears}

    def keep(name: str):
        def forward_hook(module: nn.Module, inputs, output: torch.Tensor) -> None:
            flat = output.detach().reshape(-1, output.shape[-1]).to(torch.float64)
            energy[name] += flat.square().sum(0).cpu()
            tokens[name] += flat.shape[0]
            output.register_hook(lambda grad: accumulate_fisher(name, grad))
        return forward_hook

    def accumulate_fisher(name: str, grad: torch.Tensor) -> None:  # returns None: the gradient flows on unchanged
        fisher[name] += grad.reshape(-1, grad.shape[-1]).to(torch.float64).square().sum(0).cpu()

    handles = [module.register_forward_hook(keep(name)) for name, module in linears.items()]
    was_training = model.training
    model.eval()
    params = [p for p in model.parameters() if p.requires_grad]  # no weight gradients: only the outputs' are needed
    try:
        for p in params:
            p.requires_grad_(False)
        for i, window in enumerate(windows):
            ids = window.reshape(1, -1).to(device)
            embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)  # gradients flow without weight grads
            logits = model(inputs_embeds=embeds).logits[0, :-1].float()
            loss = nn.functional.cross_entropy(logits, ids[0, 1:])
            loss.backward()
            if progress:
                progress(i + 1, len(windows), "sensitivity")
    finally:
        for handle in handles:
            handle.remove()
        for p in params:
            p.requires_grad_(True)
        model.train(was_training)
    return {name: float((fisher[name] * energy[name] / max(tokens[name], 1)).sum()) for name in linears}
