"""HessianAccumulator against 2/n X^T X computed in float64 over all tokens at once."""

from __future__ import annotations

import pytest
import torch

from qtool.core.errors import QtoolError
from qtool.quant.hessian import SCALE_ROWS, HessianAccumulator


def reference_hessian(batches: list[torch.Tensor]) -> torch.Tensor:
    tokens = torch.cat([b.reshape(-1, b.shape[-1]).double() for b in batches])
    return 2.0 * tokens.T @ tokens / tokens.shape[0]


def test_running_mean_over_uneven_batches_matches_float64():
    gen = torch.Generator().manual_seed(0)
    k = 37
    mix = torch.randn(k, k, generator=gen)
    batches = [
        torch.randn(3, 11, k, generator=gen) @ mix,  # [batch, seq, features]
        torch.randn(1, k, generator=gen) @ mix,
        torch.randn(0, k, generator=gen),  # empty batches change nothing
        torch.randn(2, 5, 4, k, generator=gen) @ mix + 3.0,
        torch.randn(250, k, generator=gen) @ mix,
    ]
    acc = HessianAccumulator(k, device="cpu")
    for batch in batches:
        acc.add_batch(batch)
    assert acc.num_tokens == 33 + 1 + 40 + 250
    assert acc.hessian.dtype == torch.float32 and acc.hessian.shape == (k, k)
    ref = reference_hessian(batches)
    assert torch.allclose(acc.hessian.double(), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


def test_half_precision_inputs_and_inference_mode():
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randn(4, 16, 24, generator=gen).to(torch.bfloat16) for _ in range(3)]
    acc = HessianAccumulator(24)
    with torch.inference_mode():  # the driver's hooks run under it
        for batch in batches:
            acc.add_batch(batch)
    ref = reference_hessian([b.float() for b in batches])
    assert torch.allclose(acc.hessian.double(), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


def test_one_batch_equals_many():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(96, 20, generator=gen)
    whole, pieces = HessianAccumulator(20), HessianAccumulator(20)
    whole.add_batch(x)
    for chunk in x.split(7):
        pieces.add_batch(chunk)
    assert torch.allclose(whole.hessian, pieces.hessian, rtol=1e-5, atol=1e-6)
    assert whole.num_tokens == pieces.num_tokens == 96


def test_starts_empty_and_rejects_wrong_width():
    acc = HessianAccumulator(8)
    assert acc.num_tokens == 0 and (acc.hessian == 0).all()
    with pytest.raises(QtoolError):
        acc.add_batch(torch.randn(4, 9))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_hessian_matches_float64():
    gen = torch.Generator().manual_seed(14)
    batches = [torch.randn(3, 50, 64, generator=gen) for _ in range(4)]
    acc = HessianAccumulator(64, device="cuda")
    for batch in batches:
        acc.add_batch(batch.cuda().to(torch.bfloat16))
    tokens = torch.cat([b.reshape(-1, 64).to(torch.bfloat16).double() for b in batches])
    ref = 2.0 * tokens.T @ tokens / tokens.shape[0]
    assert acc.hessian.device.type == "cuda"
    assert torch.allclose(acc.hessian.cpu().double(), ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


@pytest.mark.parametrize("k", [769, 1537])
def test_wide_inputs_accumulated_by_blocks_match_float64(k):
    # wide inputs take the blocked upper-triangle path; reading H between batches must not disturb it
    gen = torch.Generator().manual_seed(k)
    batches = [torch.randn(n, k, generator=gen) for n in (7, 300, 1)]
    acc = HessianAccumulator(k)
    for i, batch in enumerate(batches):
        acc.add_batch(batch)
        ref = reference_hessian(batches[: i + 1])
        got = acc.hessian.double()
        assert torch.allclose(got, got.T, rtol=1e-6, atol=1e-6 * got.abs().max().item())
        assert torch.allclose(got, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("k", [40, 1537])
def test_half_precision_products_stay_close_to_float64(dtype, k):
    """product_dtype rounds each batch's inputs and product once; the running sum is float32, so H stays within
    a few units of that dtype's rounding of the float64 reference of the rounded inputs."""
    gen = torch.Generator().manual_seed(k + 3)
    batches = [torch.randn(n, k, generator=gen) for n in (64, 200, 5, 128)]
    acc = HessianAccumulator(k, product_dtype=dtype)
    for batch in batches:
        acc.add_batch(batch)
    assert acc.hessian.dtype == torch.float32
    ref = reference_hessian([b.to(dtype) for b in batches])
    unit = torch.finfo(dtype).eps
    got = acc.hessian.double()
    assert torch.allclose(got, got.T, rtol=0, atol=4 * unit * ref.abs().max().item())
    assert (got - ref).abs().max().item() <= 4 * unit * ref.abs().max().item()
    assert acc.num_tokens == 397


@pytest.mark.parametrize("k", [37, 2500])
def test_float64_sum_read_in_row_slices_and_taken(k):
    """The float64 sum is scaled to float32 H a slice of rows at a time (2500 inputs: three slices); H matches
    float64 to float32's products, reads repeat, and take_hessian hands H over and refuses more batches."""
    gen = torch.Generator().manual_seed(k + 11)
    batches = [torch.randn(n, k, generator=gen) for n in (9, 130, 2)]
    acc = HessianAccumulator(k, float64_sum=True)
    assert (acc.hessian == 0).all() and acc.hessian.dtype == torch.float32
    for batch in batches:
        acc.add_batch(batch)
    ref = reference_hessian(batches)
    first = acc.hessian.clone()
    assert torch.allclose(first.double(), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    assert torch.equal(first, first.T)
    taken = acc.take_hessian()
    assert torch.equal(taken, first)
    with pytest.raises(ValueError, match="take_hessian"):
        acc.add_batch(batches[0])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_float64_read_makes_only_the_float32_h():
    """Reading H from the float64 sum adds H itself and one slice of rows in float64, not a sum-sized
    temporary (a 7B's down_proj: 0.9 GiB); take_hessian then frees the sum."""
    k = 4096
    acc = HessianAccumulator(k, device="cuda", product_dtype=torch.bfloat16, float64_sum=True)
    acc.add_batch(torch.randn(2, 256, k, device="cuda", dtype=torch.bfloat16))
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    hessian = acc.take_hessian()
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() - before <= k * k * 4 + 2 * SCALE_ROWS * k * 8
    assert torch.cuda.memory_allocated() - before <= k * k * 4 - k * k * 8 + 2**20  # the sum is gone
    assert hessian.dtype == torch.float32 and hessian.device.type == "cuda"
