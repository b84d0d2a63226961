"""The fine-tuning step's fused operations: each backward reference against autograd of an independent float64
computation, each Triton kernel against its reference on fresh random inputs (odd widths, widths that are no power
of two, strided views, float32/float16/bfloat16), and the autograd functions' gradients against float64 autograd.
The head's linear + cross entropy against torch's cross_entropy over whole logits, across chunk boundaries and
ignored rows. On a CPU the kernels run under the Triton interpreter; on a GPU the same tests run them compiled."""

import pytest
import torch
import torch.nn.functional as F
from kernel_env import DEVICE

from qtool.kernels.train_ops import add_rms_norm, linear_cross_entropy, rms_norm, rope, silu_mul
from qtool.kernels.train_ops_ref import (rms_norm_backward_ref, rms_norm_weight_grad_ref, rope_backward_ref, rope_ref,
                                        silu_mul_backward_ref)
from qtool.kernels.train_ops_triton import rms_norm_backward_triton, rope_triton, silu_mul_backward_triton

TOLERANCE = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def close(got: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    scale = expected.double().abs().max().clamp(min=1.0)
    assert got.dtype == expected.dtype
    assert ((got.double() - expected.double()).abs().max() / scale) <= TOLERANCE[dtype]


def rms_norm_f64(summed, weight, eps, offset):
    h = summed.double()
    return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps) * (weight.double() + offset)


def rope_f64(x, cos, sin):
    half = x.shape[-1] // 2
    x = x.double()
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos.double().unsqueeze(1) + rotated * sin.double().unsqueeze(1)


def rope_tables(tokens, head_dim, gen):
    """Tables with different halves (cos1 != cos2), so a kernel mixing them up fails."""
    angles = torch.rand(tokens, head_dim, generator=gen) * 6.0
    return angles.cos(), angles.sin()


@pytest.mark.parametrize("hidden,offset,with_summed_grad", [(96, 0.0, True), (101, 1.0, False), (7, 0.0, False)])
def test_rms_norm_backward_reference_is_the_gradient(hidden, offset, with_summed_grad):
    gen = torch.Generator().manual_seed(hidden)
    summed = torch.randn(5, hidden, generator=gen) * 3
    weight = torch.randn(hidden, generator=gen)
    grad_normed = torch.randn(5, hidden, generator=gen)
    grad_summed = torch.randn(5, hidden, generator=gen) if with_summed_grad else None
    x = summed.double().requires_grad_()
    w = weight.double().requires_grad_()
    out = (rms_norm_f64(x, w, 1e-5, offset) * grad_normed.double()).sum()
    if grad_summed is not None:
        out = out + (x * grad_summed.double()).sum()
    out.backward()
    close(rms_norm_backward_ref(grad_normed, grad_summed, summed, weight, 1e-5, offset), x.grad.float(), torch.float32)
    close(rms_norm_weight_grad_ref(grad_normed, summed, 1e-5), w.grad.float(), torch.float32)


def test_silu_mul_and_rope_backward_references_are_the_gradients():
    gen = torch.Generator().manual_seed(1)
    gate, up, grad = (torch.randn(6, 37, generator=gen) * 3 for _ in range(3))
    g, u = gate.double().requires_grad_(), up.double().requires_grad_()
    (F.silu(g) * u * grad.double()).sum().backward()
    d_gate, d_up = silu_mul_backward_ref(grad, gate, up)
    close(d_gate, g.grad.float(), torch.float32)
    close(d_up, u.grad.float(), torch.float32)
    x = torch.randn(9, 3, 24, generator=gen)
    cos, sin = rope_tables(9, 24, gen)
    grad = torch.randn(9, 3, 24, generator=gen)
    xd = x.double().requires_grad_()
    (rope_f64(xd, cos, sin) * grad.double()).sum().backward()
    close(rope_ref(x, cos, sin), rope_f64(x, cos, sin).float(), torch.float32)
    close(rope_backward_ref(grad, cos, sin), xd.grad.float(), torch.float32)


DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden,rows,offset,with_summed_grad", [(96, 7, 0.0, True), (131, 3, 1.0, False),
                                                                  (1000, 2, 0.0, True)])
def test_rms_norm_backward_kernel_matches_reference(dtype, hidden, rows, offset, with_summed_grad):
    gen = torch.Generator().manual_seed(hidden + rows)
    summed = (torch.randn(rows, hidden, generator=gen) * 2).to(dtype)
    weight = torch.randn(hidden, generator=gen).to(dtype)
    # the incoming gradient as a strided view: columns of a wider tensor
    grad_normed = torch.randn(rows, hidden + 5, generator=gen).to(dtype)[:, 3 : 3 + hidden]
    grad_summed = torch.randn(rows, hidden, generator=gen).to(dtype) if with_summed_grad else None
    args = [t if not isinstance(t, torch.Tensor) else t.to(DEVICE)
            for t in (grad_normed, grad_summed, summed, weight)] + [1e-6, offset]
    got = rms_norm_backward_triton(*args)
    close(got.cpu(), rms_norm_backward_ref(grad_normed, grad_summed, summed, weight, 1e-6, offset), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,width", [(3, 37), (2, 1500), (1, 1)])
def test_silu_mul_backward_kernel_matches_reference(dtype, rows, width):
    gen = torch.Generator().manual_seed(rows * width)
    fused = (torch.randn(rows, 2 * width, generator=gen) * 4).to(dtype)  # gate and up as halves of one output
    gate, up = fused[:, :width], fused[:, width:]
    grad = torch.randn(rows, width, generator=gen).to(dtype)
    got = silu_mul_backward_triton(grad.to(DEVICE), gate.to(DEVICE), up.to(DEVICE))
    expected = silu_mul_backward_ref(grad, gate, up)
    for g, e in zip(got, expected):
        close(g.cpu(), e, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,heads,head_dim", [(5, 3, 16), (4, 32, 128), (3, 7, 24), (2, 1, 2)])
def test_rope_kernel_matches_reference_both_ways(dtype, tokens, heads, head_dim):
    gen = torch.Generator().manual_seed(tokens * heads + head_dim)
    # x as a strided view: the query heads of a [T, heads + 2, d] projection output
    x = torch.randn(tokens, heads + 2, head_dim, generator=gen).to(dtype)[:, :heads]
    cos, sin = (t.to(dtype) for t in rope_tables(tokens, head_dim, gen))
    for backward, reference in ((False, rope_ref), (True, rope_backward_ref)):
        got = rope_triton(x.to(DEVICE), cos.to(DEVICE), sin.to(DEVICE), backward=backward)
        close(got.cpu(), reference(x, cos, sin), dtype)


def test_autograd_functions_match_float64_autograd():
    """Through the routed functions (the references on the CPU, the kernels on a GPU): gradients of x, residual,
    weight, gate, up and the rotated input against float64 autograd of the same composition."""
    gen = torch.Generator().manual_seed(3)
    x, residual = (torch.randn(2, 5, 48, generator=gen) for _ in range(2))
    weight = torch.randn(48, generator=gen)
    cos, sin = rope_tables(10, 16, gen)
    probe = torch.randn(2, 5, 48, generator=gen)

    def run(x, residual, weight, fused: bool):
        if fused:
            normed, summed = add_rms_norm(x, residual, weight, 1e-5)
            gated = silu_mul(normed, rms_norm(summed, weight, 1e-5, 1.0))
            turned = rope(gated.reshape(10, 3, 16), cos.to(x.device), sin.to(x.device))
        else:
            summed = x + residual
            normed = rms_norm_f64(summed, weight, 1e-5, 0.0)
            gated = F.silu(normed) * rms_norm_f64(summed, weight, 1e-5, 1.0)
            turned = rope_f64(gated.reshape(10, 3, 16), cos, sin)
        return (turned.reshape(2, 5, 48) * probe.to(turned)).sum() + (summed * probe.to(summed)).sum()

    leaves = [t.detach().clone().to(DEVICE).requires_grad_() for t in (x, residual, weight)]
    run(*leaves, fused=True).backward()
    exact = [t.double().requires_grad_() for t in (x, residual, weight)]
    run(*exact, fused=False).backward()
    for got, expected in zip(leaves, exact):
        close(got.grad.cpu(), expected.grad.float(), torch.float32)


@pytest.mark.parametrize("chunk_rows", [None, 4, 7])
def test_linear_cross_entropy_matches_whole_logits(chunk_rows):
    gen = torch.Generator().manual_seed(5)
    hidden = torch.randn(19, 24, generator=gen)
    weight = torch.randn(53, 24, generator=gen) * 0.3
    labels = torch.randint(0, 53, (19,), generator=gen)
    labels[[0, 7, 8, 18]] = -100
    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss = linear_cross_entropy(h1, w1, labels, -100, chunk_rows)
    (loss * 0.5).backward()
    h2, w2 = hidden.double().requires_grad_(), weight.double().requires_grad_()
    expected = F.cross_entropy(h2 @ w2.T, labels, ignore_index=-100, reduction="sum")
    (expected * 0.5).backward()
    assert loss.dtype == torch.float32
    assert abs(loss.item() - expected.item()) <= 1e-5 * abs(expected.item())
    close(h1.grad, h2.grad.float(), torch.float32)
    close(w1.grad, w2.grad.float(), torch.float32)


def test_linear_cross_entropy_without_weight_gradient_and_all_rows_ignored():
    gen = torch.Generator().manual_seed(6)
    hidden = torch.randn(6, 8, generator=gen).requires_grad_()
    weight = torch.randn(11, 8, generator=gen)
    ignored = torch.full((6,), -100)
    loss = linear_cross_entropy(hidden, weight, ignored)
    loss.backward()
    assert loss.item() == 0.0 and torch.count_nonzero(hidden.grad) == 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the self-check builds the kernels for CUDA tensors")
def test_the_kernel_self_check_passes_on_the_gpu():
    from qtool.kernels.train_ops import train_kernels_problem

    assert train_kernels_problem(torch.device("cuda")) is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the routed functions take the kernels on CUDA tensors")
def test_a_fused_llama_step_on_the_gpu_matches_transformers_in_bfloat16(make_tiny_llama):
    """The whole fused forward compiled (kernels, not references) against transformers' in bfloat16."""
    from peft import LoraConfig, get_peft_model

    from qtool.finetune.fused_forward import plan_fused_forward
    from qtool.finetune.trainer import summed_token_loss

    model = get_peft_model(make_tiny_llama(0).to("cuda", torch.bfloat16),
                           LoraConfig(r=4, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                            "up_proj", "down_proj"])).train()
    fused, description = plan_fused_forward(model)
    assert fused is not None, description
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 320, (2, 64), generator=gen).cuda()
    batch = dict(input_ids=ids, position_ids=torch.arange(64, device="cuda").repeat(2, 1), labels=ids)
    losses = [summed_token_loss(model, batch, torch.bfloat16, f).item() for f in (None, fused)]
    assert losses[1] == pytest.approx(losses[0], rel=2e-2)
