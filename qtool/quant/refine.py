"""Scale refinement after GPTQ: with the integer codes and zero points fixed, the scales that minimise the layer's
output error on the calibration inputs, tr((W - W_q) H (W - W_q)^T), are the solution of one small linear system
per output row (one unknown per group). GPTQ picks its scales before the error feedback has moved the weights of
a group; refitting them afterwards removes part of the error it could not reach."""

from __future__ import annotations

import torch

from qtool.formats.quantized_weight import QuantizedWeight

# Relative ridge on the system, as GPTQ damps its Hessian: keeps rows whose inputs are nearly dead well posed.
REFINE_DAMP = 0.01


# Output rows refitted at a time: every product here is [rows, K], so the refit holds a few of them for this many
# rows (a 7B's gate+up: 22016 rows, 0.34 GiB per full-size product), not for the whole weight.
REFINE_ROWS = 2048


def refine_group_scales(weight: torch.Tensor, quantized: QuantizedWeight, hessian: torch.Tensor) -> tuple[QuantizedWeight, torch.Tensor]:
    """New scales for `quantized` (codes, zeros and g_idx unchanged) minimising tr((W - W_q) H (W - W_q)^T), and
    the new dequantized weight [N, K] (float32). A row whose solution is not finite and positive, or would raise
    that row's error, keeps its scales. Rows are independent: refitted REFINE_ROWS at a time."""
    h = hessian.detach().to(device=weight.device, dtype=torch.float32).clone()
    h.diagonal().add_(REFINE_DAMP * h.diagonal().mean())
    g_idx = quantized.g_idx.long().to(weight.device)
    one_hot = torch.nn.functional.one_hot(g_idx, quantized.num_groups).to(torch.float32)  # [K, G]
    members = [(g_idx == g).nonzero().squeeze(1) for g in range(quantized.num_groups)]
    new = torch.cat([_refit_rows(weight[rows].to(torch.float32), quantized, rows, h, g_idx, one_hot, members)
                     for rows in _row_slices(weight.shape[0])])  # [N, G]
    refined = QuantizedWeight(
        codes=quantized.codes,
        scales=new.T.contiguous().to(quantized.scales.dtype),
        zeros=quantized.zeros,
        g_idx=quantized.g_idx,
        bits=quantized.bits,
        group_size=quantized.group_size,
    )
    return refined, refined.dequantize()


def _row_slices(rows: int) -> list[slice]:
    return [slice(start, min(start + REFINE_ROWS, rows)) for start in range(0, rows, REFINE_ROWS)]


def _refit_rows(w: torch.Tensor, quantized: QuantizedWeight, rows: slice, h: torch.Tensor, g_idx: torch.Tensor,
                one_hot: torch.Tensor, members: list[torch.Tensor]) -> torch.Tensor:
    """The refitted scales [n, G] of output rows `rows` (w: their float32 weights [n, K])."""
    groups = one_hot.shape[1]
    # p[n, i] = codes - zero: the dequantized weight is scale[g(i), n] * p[n, i]
    p = quantized.codes[rows].to(torch.float32)
    p.sub_(quantized.zeros[:, rows].to(torch.float32)[g_idx].T)
    system = torch.empty(w.shape[0], groups, groups, dtype=torch.float32, device=w.device)
    for g, columns in enumerate(members):
        t = p[:, columns] @ h[columns]  # [n, K]: sum over i in g of p[n, i] H[i, j]
        system[:, g, :] = (t * p) @ one_hot
    rhs = ((w @ h) * p) @ one_hot  # [n, G]
    scales, info = torch.linalg.solve_ex(system, rhs)
    old = quantized.scales[:, rows].T.to(torch.float32)  # [n, G]

    def row_errors(s: torch.Tensor) -> torch.Tensor:
        diff = w - s[:, g_idx] * p
        return ((diff @ h) * diff).sum(dim=1)

    usable = (info == 0).unsqueeze(1) & torch.isfinite(scales) & (scales > 0)
    candidate = torch.where(usable, scales, old)
    better = row_errors(candidate) < row_errors(old)
    return torch.where(better.unsqueeze(1), candidate, old)
