"""Scale refinement after GPTQ: with the integer codes and zero points fixed, the scales that minimise the layer's
output error on the calibration inputs, tr((W - W_q) H (W - W_q)^T), are the solution of one small linear system
per output row (one unknown per group). GPTQ picks its scales before the error feedback has moved the weights of
a group; refitting them afterwards removes part of the error it could not reach."""

from __future__ import annotations

import torch

from qtool.formats.quantized_weight import QuantizedWeight

# Relative ridge on the system, as GPTQ damps its Hessian: keeps rows whose inputs are nearly dead well posed.
REFINE_DAMP = 0.01


def refine_group_scales(weight: torch.Tensor, quantized: QuantizedWeight, hessian: torch.Tensor) -> tuple[QuantizedWeight, torch.Tensor]:
    """New scales for `quantized` (codes, zeros and g_idx unchanged) minimising tr((W - W_q) H (W - W_q)^T), and
    the new dequantized weight [N, K] (float32). A row whose solution is not finite and positive, or would raise
    that row's error, keeps its scales."""
    w = weight.detach().to(torch.float32)
    h = hessian.detach().to(device=w.device, dtype=torch.float32).clone()
    h.diagonal().add_(REFINE_DAMP * h.diagonal().mean())
    g_idx = quantized.g_idx.long().to(w.device)
    groups = quantized.num_groups
    # p[n, i] = codes - zero: the dequantized weight is scale[g(i), n] * p[n, i]
    p = quantized.codes.to(torch.float32) - quantized.zeros.to(torch.float32)[g_idx].T
    one_hot = torch.nn.functional.one_hot(g_idx, groups).to(torch.float32)  # [K, G]
    system = torch.empty(w.shape[0], groups, groups, dtype=torch.float32, device=w.device)
    for g in range(groups):
        columns = (g_idx == g).nonzero().squeeze(1)
        t = p[:, columns] @ h[columns]  # [N, K]: sum over i in g of p[n, i] H[i, j]
        system[:, g, :] = (t * p) @ one_hot
    rhs = ((w @ h) * p) @ one_hot  # [N, G]
    scales, info = torch.linalg.solve_ex(system, rhs)
    old = quantized.scales.T.to(torch.float32)  # [N, G]

    def row_errors(s: torch.Tensor) -> torch.Tensor:
        diff = w - s[:, g_idx] * p
        return ((diff @ h) * diff).sum(dim=1)

    usable = (info == 0).unsqueeze(1) & torch.isfinite(scales) & (scales > 0)
    candidate = torch.where(usable, scales, old)
    better = row_errors(candidate) < row_errors(old)
    new = torch.where(better.unsqueeze(1), candidate, old)
    refined = QuantizedWeight(
        codes=quantized.codes,
        scales=new.T.contiguous().to(quantized.scales.dtype),
        zeros=quantized.zeros,
        g_idx=quantized.g_idx,
        bits=quantized.bits,
        group_size=quantized.group_size,
    )
    return refined, refined.dequantize()
