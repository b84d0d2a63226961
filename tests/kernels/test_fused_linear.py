"""fuse_linears: one module computing several linears of one input (q/k/v, gate/up), for float, GPTQ and EXL2
parts. Its output equals the parts' outputs side by side (exactly through the torch reference, to the float64
reference through the other backends), the parts keep computing what they did while reading the fused tensors,
and parts it cannot fuse exactly are refused with the reason."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from kernel_env import DEVICE
from torch import nn

from qtool.formats.exl2 import Exl2Weight
from qtool.formats.quantized_weight import QuantizedWeight
from qtool.kernels.exl2_linear import Exl2Linear
from qtool.kernels.fused_linear import fuse_linears
from qtool.kernels.quant_linear import QuantLinear
from qtool.kernels.registry import BackendRegistry

IN_FEATURES = 160  # group size 64 leaves a partial last group
QKV_OUT = (96, 32, 64)  # odd sizes: q, k, v of different widths
NAMES = ("q_proj", "k_proj", "v_proj")


def same_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got.double().cpu() - expected).norm() / expected.norm()).item()


# ---- float ----


@pytest.mark.parametrize("bias", [True, False])
def test_float_fused_output_is_the_parts_outputs_exactly(bias):
    torch.manual_seed(1)
    parts = [nn.Linear(IN_FEATURES, n, bias=bias) for n in QKV_OUT]
    x = torch.randn(3, 5, IN_FEATURES)
    expected = [part(x).detach() for part in parts]
    reference = x.double() @ torch.cat([p.weight for p in parts]).double().T
    fused, why = fuse_linears(parts, NAMES)
    assert why is None and fused.sizes == QKV_OUT
    with torch.no_grad():
        outputs = fused(x)
        whole = fused.module(x)
    assert whole.shape == (3, 5, sum(QKV_OUT))
    assert torch.equal(fused.module.weight, torch.cat([part.weight for part in parts]))
    for got, want, part in zip(outputs, expected, parts):
        # the weights are equal bit for bit; BLAS may sum a wider product in another order
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
        with torch.no_grad():
            assert torch.equal(part(x), want), "a part computes what it did"
        assert same_storage(part.weight, fused.module.weight), "a part reads the fused weight"
    if not bias:
        assert relative_error(whole, reference) < 1e-6


def test_adjacent_blocks_become_a_view_and_overlapping_ones_a_copy():
    from qtool.kernels.fused_linear import _joined

    rows = torch.arange(24.0).view(3, 8)
    columns = _joined([rows[:, :5], rows[:, 5:]], 1)
    assert same_storage(columns, rows) and torch.equal(columns, rows), "column blocks of one tensor"
    assert same_storage(_joined([rows[:1], rows[1:]], 0), rows)
    # k's first row is q's second: side by side by their offsets, but a view over both would read memory twice
    storage = torch.arange(12.0)
    q, k = storage.as_strided((2, 4), (4, 1), 0), storage.as_strided((2, 4), (4, 1), 4)
    joined = _joined([q, k], 1)
    assert not same_storage(joined, storage) and torch.equal(joined, torch.cat([q, k], 1))
    apart = [torch.arange(8.0).view(2, 4), torch.arange(8.0).view(2, 4)]  # two storages
    assert torch.equal(_joined(apart, 1), torch.cat(apart, 1))


def test_fusing_fused_parts_again_makes_no_copy():
    torch.manual_seed(2)
    parts = [nn.Linear(64, n, bias=True) for n in (64, 32)]
    first, _ = fuse_linears(parts, ("gate_proj", "up_proj"))
    views = [part.weight for part in parts]
    again, why = fuse_linears(parts, ("gate_proj", "up_proj"))
    assert why is None
    assert all(part.weight is view for part, view in zip(parts, views)), "the parts are left as they were"
    assert again.module.weight.data_ptr() == first.module.weight.data_ptr()
    assert again.module.bias.data_ptr() == first.module.bias.data_ptr()
    reversed_order, _ = fuse_linears(parts[::-1], ("up_proj", "gate_proj"))  # not adjacent in this order: a copy
    assert not same_storage(reversed_order.module.weight, first.module.weight)
    x = torch.randn(4, 64)
    with torch.no_grad():
        torch.testing.assert_close(torch.cat(reversed_order(x)[::-1], -1), first.module(x), rtol=1e-6, atol=1e-6)


# ---- GPTQ ----


def random_gptq(out_features: int, bits: int, group_size: int, act_order: bool, symmetric: bool,
                g_idx: torch.Tensor | None, gen: torch.Generator) -> QuantizedWeight:
    groups = 1 if group_size == -1 else math.ceil(IN_FEATURES / group_size)
    codes = torch.randint(0, 1 << bits, (out_features, IN_FEATURES), generator=gen, dtype=torch.int32)
    scales = (torch.rand(groups, out_features, generator=gen) * 0.05 + 1e-3).half().float()
    if symmetric:
        zeros = torch.full((groups, out_features), 1 << (bits - 1), dtype=torch.int32)
    else:
        zeros = torch.randint(1, 1 << bits, (groups, out_features), generator=gen, dtype=torch.int32)
    if g_idx is None:
        g_idx = (torch.zeros(IN_FEATURES, dtype=torch.int32) if group_size == -1
                 else torch.arange(IN_FEATURES, dtype=torch.int32) // group_size)
        if act_order:
            g_idx = g_idx[torch.randperm(IN_FEATURES, generator=gen)]
    return QuantizedWeight(codes, scales, zeros, g_idx, bits, group_size)


def gptq_parts(bits: int, group_size: int, act_order: bool, symmetric: bool, seed: int, bias: bool = True,
               checkpoint_format: str = "gptq_v2", sizes=QKV_OUT) -> list[QuantLinear]:
    """Parts of one quantization: the same g_idx (act order permutes the rows of all q/k/v alike)."""
    gen = torch.Generator().manual_seed(seed)
    first = random_gptq(sizes[0], bits, group_size, act_order, symmetric, None, gen)
    weights = [first] + [random_gptq(n, bits, group_size, act_order, symmetric, first.g_idx, gen) for n in sizes[1:]]
    biases = [torch.randn(n, generator=gen).half() if bias else None for n in sizes]
    return [QuantLinear.from_quantized(w, bias=b, checkpoint_format=checkpoint_format) for w, b in zip(weights, biases)]


# every bit width, per-channel and grouped (64 does not divide 160), act order on and off, sym/asym
GPTQ_CASES = list(itertools.product((2, 3, 4, 8), (32, 64, -1), (False, True), (False, True)))


@pytest.mark.parametrize("bits,group_size,act_order,symmetric", GPTQ_CASES)
def test_gptq_fused_output_is_the_parts_outputs_exactly(bits, group_size, act_order, symmetric):
    seed = bits * 1000 + group_size * 10 + 2 * act_order + symmetric
    parts = gptq_parts(bits, group_size, act_order, symmetric, seed, checkpoint_format="gptq" if symmetric else "gptq_v2")
    x = torch.randn(7, IN_FEATURES, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    expected = [part(x) for part in parts]
    weights = [part.dequantized_weight(torch.float64) for part in parts]
    fused, why = fuse_linears(parts, NAMES)
    assert why is None, why
    module = fused.module
    assert isinstance(module, QuantLinear) and module.out_features == sum(QKV_OUT)
    assert torch.equal(module.dequantized_weight(torch.float64), torch.cat(weights))
    for got, want, part in zip(fused(x), expected, parts):
        # the weights are equal bit for bit; BLAS may sum a wider product in another order
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        assert torch.equal(part(x), want), "a part computes what it did"
        for name in ("qweight", "qzeros", "scales", "bias"):
            assert same_storage(getattr(part, name), getattr(module, name)), f"{name} is a view of the fused one"
    assert module.state_dict()["qweight"].shape == (IN_FEATURES * bits // 32, sum(QKV_OUT))


def untuned_registry() -> BackendRegistry:
    from qtool.kernels.cpu_int4_backend import GptqCpuInt4Backend
    from qtool.kernels.torch_backends import GptqTorchBackend
    from qtool.kernels.triton_backend import TritonBackend

    return BackendRegistry(factories={"triton": lambda: TritonBackend(tune=False), "torch": GptqTorchBackend,
                                      "cpu-int4": GptqCpuInt4Backend})


TOLERANCE = {torch.float16: 3e-3, torch.bfloat16: 1.5e-2, torch.float32: 1e-5}
# (backend, bits, group_size, act_order, M, dtype): M = 1 is the GEMV, 5 a tl.dot path; cpu-int4 is torch's kernel
BACKEND_CASES = [
    ("triton", 4, 32, True, 1, torch.float16),
    ("triton", 3, 64, False, 1, torch.bfloat16),
    ("triton", 8, 64, True, 5, torch.float16),
    ("cpu-int4", 4, 32, False, 3, torch.bfloat16),
]


@pytest.mark.parametrize("backend,bits,group_size,act_order,m,dtype", BACKEND_CASES)
def test_gptq_fused_layer_runs_through_the_parts_backend(backend, bits, group_size, act_order, m, dtype,
                                                         kernels_can_run):
    if backend == "cpu-int4" and DEVICE != "cpu":
        pytest.skip("torch's CPU int4 kernel")
    seed = bits * 100 + m
    registry = untuned_registry()
    parts = gptq_parts(bits, group_size, act_order, False, seed)
    for part in parts:
        part.to(DEVICE).set_backend(backend, registry)
    x = torch.randn(m, IN_FEATURES, generator=torch.Generator().manual_seed(seed)).to(dtype)
    reference = x.double() @ torch.cat([p.dequantized_weight(torch.float64).cpu() for p in parts]).T
    reference = reference + torch.cat([p.bias.double().cpu() for p in parts])
    separate = torch.cat([part(x.to(DEVICE)) for part in parts], -1)
    fused, why = fuse_linears(parts, NAMES)
    assert why is None, why
    assert fused.module.backend == backend and fused.module.registry is registry
    assert fused.module.route(x.to(DEVICE)).name == backend
    assert all(not part._prepared for part in parts), "the parts' backend forms were dropped"
    together = torch.cat(fused(x.to(DEVICE)), -1)
    assert together.dtype == dtype
    assert relative_error(together, reference) < TOLERANCE[dtype]
    assert relative_error(together, separate.double().cpu()) < TOLERANCE[dtype]
    # the parts, now views of the fused tensors, build their forms again and compute what they did
    assert torch.equal(torch.cat([part(x.to(DEVICE)) for part in parts], -1), separate)


def test_fusing_fused_gptq_parts_again_leaves_them_and_their_forms_alone():
    """A second engine on one model fuses again: the parts (and an earlier engine's CUDA graphs over their forms)
    must stay valid."""
    parts = gptq_parts(4, 32, True, False, seed=9)
    first, _ = fuse_linears(parts, NAMES)
    x = torch.randn(2, IN_FEATURES, dtype=torch.float64)
    expected = [part(x) for part in parts]  # forms built again from the views
    tensors = [(part.qweight, part.qzeros, part.scales, part.bias) for part in parts]
    forms = [dict(part._prepared) for part in parts]
    again, why = fuse_linears(parts, NAMES)
    assert why is None and same_storage(again.module.qweight, first.module.qweight)
    for part, kept, form in zip(parts, tensors, forms):
        assert all(now is before for now, before in zip((part.qweight, part.qzeros, part.scales, part.bias), kept))
        assert part._prepared == form
    assert all(torch.equal(part(x), want) for part, want in zip(parts, expected))


GPTQ_REFUSALS = {
    "bits": (dict(bits=3), "k_proj has bits 3 and q_proj 4"),
    "group size": (dict(group_size=64), "k_proj has group size 64 and q_proj 32"),
    "act order": (dict(act_order=True), "order their input rows differently (g_idx, act order)"),
    "format": (dict(checkpoint_format="gptq"), "k_proj has checkpoint format gptq and q_proj gptq_v2"),
    "bias": (dict(bias=False), "q_proj has a bias and the other does not"),
}


@pytest.mark.parametrize("case", list(GPTQ_REFUSALS))
def test_gptq_parts_that_differ_are_refused_with_the_reason(case):
    settings, reason = GPTQ_REFUSALS[case]
    q = gptq_parts(4, 32, False, False, seed=5, sizes=(64,))[0]
    k = gptq_parts(**{**dict(bits=4, group_size=32, act_order=False, symmetric=False, seed=6, sizes=(32,)),
                      **settings})[0]
    before = [t.clone() for t in (q.qweight, k.qweight)]
    fused, why = fuse_linears([q, k], ("q_proj", "k_proj"))
    assert fused is None and reason in why
    assert torch.equal(q.qweight, before[0]) and torch.equal(k.qweight, before[1]), "refused parts are untouched"


def test_mixed_kinds_backends_and_widths_are_refused():
    torch.manual_seed(0)
    q = gptq_parts(4, 32, False, False, seed=7, sizes=(64,))[0]
    k = gptq_parts(4, 32, False, False, seed=8, sizes=(32,))[0]
    float_k = nn.Linear(IN_FEATURES, 32)
    assert "k_proj is a Linear and q_proj a QuantLinear" in fuse_linears([q, float_k], ("q_proj", "k_proj"))[1]
    k.set_backend("torch")
    assert "routed to backend torch and q_proj to auto" in fuse_linears([q, k], ("q_proj", "k_proj"))[1]
    assert "v_proj takes 96 inputs and q_proj 160" in fuse_linears(
        [nn.Linear(IN_FEATURES, 8), nn.Linear(IN_FEATURES, 8), nn.Linear(96, 8)], NAMES)[1]

    class ScaledLinear(nn.Linear):  # a subclass computes something else: never fused as a plain linear
        def forward(self, x):
            return 2 * super().forward(x)

    assert "k_proj is a ScaledLinear" in fuse_linears([nn.Linear(8, 8), ScaledLinear(8, 8)], ("q_proj", "k_proj"))[1]
    half = nn.Linear(8, 8).half()
    assert "torch.float16" in fuse_linears([nn.Linear(8, 8), half], ("q_proj", "k_proj"))[1]
    assert fuse_linears([nn.Linear(8, 8)], ("q_proj",))[0] is None
    on_meta = [nn.Linear(8, 8, device="meta"), nn.Linear(8, 8, device="meta")]
    assert "q_proj's weights are not loaded" in fuse_linears(on_meta, ("q_proj", "k_proj"))[1]


# ---- EXL2 ----


def exl2_parts(sizes, seed: int, layout=((6, 64), (4, 64), (3, 32)), perm=None, scale_max=None,
               bias: bool = True) -> list[Exl2Linear]:
    """EXL2 linears of one bit plan, permutation and per-group scale maxima (what fusion needs)."""
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(IN_FEATURES, generator=gen) if perm is None else perm
    scale_max = (torch.rand(len(layout), generator=gen) * 0.2 + 0.01).half() if scale_max is None else scale_max
    parts = []
    for n in sizes:
        weight = Exl2Weight(
            codes=torch.cat([torch.randint(0, 1 << b, (r, n), generator=gen) for b, r in layout]).to(torch.int32),
            qscale=torch.randint(1, 17, (len(layout), n), generator=gen, dtype=torch.int32),
            scale_max=scale_max, group_bits=tuple(b for b, _ in layout), group_sizes=tuple(r for _, r in layout),
            perm=perm)
        parts.append(Exl2Linear.from_weight(weight, torch.randn(n, generator=gen).half() if bias else None))
    return parts


@pytest.mark.parametrize("backend,m,dtype", [("torch", 4, torch.float64), ("triton", 1, torch.float16),
                                             ("triton", 3, torch.bfloat16)])
def test_exl2_fused_output_is_the_parts_outputs(backend, m, dtype, kernels_can_run):
    parts = exl2_parts(QKV_OUT, seed=m)
    for part in parts:
        part.to(DEVICE).set_backend(backend)
    x = torch.randn(m, IN_FEATURES, generator=torch.Generator().manual_seed(m)).to(dtype).to(DEVICE)
    expected = [part(x) for part in parts]
    weights = torch.cat([part.dequantized_weight(torch.float64) for part in parts])
    fused, why = fuse_linears(parts, NAMES)
    assert why is None, why
    assert isinstance(fused.module, Exl2Linear) and fused.module.backend == backend
    assert torch.equal(fused.module.dequantized_weight(torch.float64), weights)
    for got, want, part in zip(fused(x), expected, parts):
        if backend == "torch":
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        else:
            assert relative_error(got, want.double().cpu()) < TOLERANCE[dtype]
        assert same_storage(part.q_weight, fused.module.q_weight) and same_storage(part.q_scale, fused.module.q_scale)
        assert torch.equal(part(x), want), "a part computes what it did"


def test_exl2_parts_whose_layout_differs_are_refused_with_the_reason():
    q = exl2_parts((64,), seed=1)[0]
    same = dict(perm=torch.argsort(q.q_invperm.long()), scale_max=q.q_scale_max)
    cases = {
        "different EXL2 bit plans": exl2_parts((32,), seed=2, layout=((6, 64), (4, 32), (3, 64)), **same),
        "permute their input rows differently (q_invperm)": exl2_parts((32,), seed=3, scale_max=q.q_scale_max),
        "different per-group scale maxima (q_scale_max)": exl2_parts((32,), seed=4, perm=same["perm"]),
        "k_proj has 40 outputs, not a multiple of 32": exl2_parts((40,), seed=5, **same),
    }
    for reason, (k,) in cases.items():
        fused, why = fuse_linears([q, k], ("q_proj", "k_proj"))
        assert fused is None and reason in why, why
    fused, why = fuse_linears([q, exl2_parts((32,), seed=6, **same)[0]], ("q_proj", "k_proj"))
    assert why is None and fused.sizes == (64, 32)
