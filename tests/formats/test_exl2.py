"""EXL2 tensors of one linear: read back by a dequantizer written here from the layout description alone (bit by
bit, numpy float16 for the scale arithmetic), compared with what the writer was given; mixed widths,
odd output widths (padding), permutations; and the reader's refusals. (The bit streams: test_bitpack.py.)"""

import numpy as np
import pytest
import torch

from qtool.core.errors import QtoolError
from qtool.formats.exl2 import (
    Exl2Weight,
    exl2_tensors_from_weight,
    expected_exl2_shapes,
    weight_from_exl2_tensors,
)
from qtool.kernels.exl2_dequant_ref import dequantize_exl2


def random_exl2(in_features, out_features, layout, seed, scale_max_range=(1e-3, 0.2), identity_perm=False):
    """layout: [(bits, rows), ...] widest first. Scale maxima span float16's normal and (after /256)
    subnormal range, so both roundings of the scale are exercised."""
    gen = torch.Generator().manual_seed(seed)
    bits = tuple(b for b, _ in layout)
    sizes = tuple(r for _, r in layout)
    assert sum(sizes) == in_features
    codes = torch.cat([torch.randint(0, 1 << b, (r, out_features), generator=gen) for b, r in layout]).to(torch.int32)
    low, high = scale_max_range
    scale_max = torch.exp(torch.empty(len(layout)).uniform_(np.log(low), np.log(high), generator=gen)).half()
    qscale = torch.randint(1, 17, (len(layout), out_features), generator=gen, dtype=torch.int32)
    perm = torch.arange(in_features) if identity_perm else torch.randperm(in_features, generator=gen)
    return Exl2Weight(codes, qscale, scale_max, bits, sizes, perm)


def independent_dequantize(tensors, out_features):
    """weight [out, in] float64 from the layout description: q_groups = (bits, first q_weight row) pairs;
    each group a little-endian bit stream down each column; code - 2**(bits-1) times
    fp16(level**2 * fp16(q_scale_max/256)), level = 4-bit field + 1; input i is stored at row q_invperm[i]."""
    words = tensors["q_weight"].numpy().view(np.uint32)
    qscale = tensors["q_scale"].numpy().view(np.uint32)
    scale_max = tensors["q_scale_max"].numpy().astype(np.float16)
    groups = tensors["q_groups"].numpy().astype(np.int64).reshape(-1, 2)
    invperm = tensors["q_invperm"].numpy().astype(np.int64)
    stored = []
    for g, (bits, start) in enumerate(groups):
        end = groups[g + 1][1] if g + 1 < len(groups) else words.shape[0]
        rows = (end - start) * 32 // bits
        block = words[start:end].astype(np.uint64)
        codes = np.zeros((rows, out_features), dtype=np.int64)
        for j in range(rows):
            for t in range(bits):
                position = j * bits + t
                bit = (block[position // 32, :out_features] >> np.uint64(position % 32)) & np.uint64(1)
                codes[j] += bit.astype(np.int64) << t
        unit = np.float16(np.float32(scale_max[g]) / np.float32(256))
        levels = np.array([((int(qscale[g, n // 8]) >> (4 * (n % 8))) & 15) + 1 for n in range(out_features)])
        scales = np.array([np.float16(np.float32(level * level) * np.float32(unit)) for level in levels], dtype=np.float64)
        stored.append((codes - (1 << (int(bits) - 1))) * scales[None, :])
    stored = np.concatenate(stored)
    return torch.from_numpy(stored[invperm].T.copy())


LAYOUTS = {
    "uniform-4": (128, [(4, 128)]),
    "8/6/5/4/3/2": (224, [(8, 32), (6, 32), (5, 64), (4, 32), (3, 32), (2, 32)]),
    "6/5 odd groups": (160, [(6, 96), (5, 64)]),
    "3/2": (96, [(3, 32), (3, 32), (2, 32)]),
    "8 only": (64, [(8, 32), (8, 32)]),
}


@pytest.mark.parametrize("out_features", [32, 45, 77])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_writer_matches_independent_reading(layout, out_features):
    in_features, groups = LAYOUTS[layout]
    w = random_exl2(in_features, out_features, groups, seed=len(layout) + out_features)
    tensors = exl2_tensors_from_weight(w)
    expected = independent_dequantize(tensors, out_features)
    assert torch.equal(w.dequantize(torch.float32).double(), expected)
    shapes = expected_exl2_shapes(in_features, out_features, w.group_bits, w.group_sizes)
    for name, tensor in tensors.items():
        assert (tuple(tensor.shape), tensor.dtype) == shapes[name], name
    assert tensors["q_weight"].shape[1] % 32 == 0 and tensors["q_weight"].shape[1] >= out_features


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_round_trip_and_reference_dequantizer(layout):
    in_features, groups = LAYOUTS[layout]
    w = random_exl2(in_features, 45, groups, seed=3)
    tensors = exl2_tensors_from_weight(w)
    back = weight_from_exl2_tensors(tensors, 45)
    for field in ("codes", "qscale", "scale_max", "perm"):
        assert torch.equal(getattr(back, field), getattr(w, field)), field
    assert (back.group_bits, back.group_sizes) == (w.group_bits, w.group_sizes)
    expected = independent_dequantize(tensors, 45)
    args = [tensors[k] for k in ("q_weight", "q_invperm", "q_scale", "q_scale_max", "q_groups")]
    assert torch.equal(dequantize_exl2(*args, 45, torch.float32).double(), expected)
    # float16: the exact product rounded once, as ExLlamaV2's __hmul does
    assert torch.equal(dequantize_exl2(*args, 45, torch.float16), expected.to(torch.float16))
    assert torch.equal(w.dequantize(torch.float16), expected.to(torch.float16))


def test_q_groups_and_permutation_as_described():
    w = random_exl2(160, 32, [(6, 96), (5, 64)], seed=9)
    tensors = exl2_tensors_from_weight(w)
    # (bits, first packed row): 96 six-bit rows take 18 words per column
    assert tensors["q_groups"].tolist() == [6, 0, 5, 18]
    assert tensors["q_weight"].shape[0] == 18 + 10
    assert torch.equal(tensors["q_perm"].long(), w.perm)
    assert torch.equal(tensors["q_invperm"].long()[w.perm], torch.arange(160))


def test_file_without_q_perm_reads_the_same():
    """ExLlamaV2's converter writes only q_invperm."""
    w = random_exl2(96, 40, [(4, 64), (3, 32)], seed=4)
    tensors = exl2_tensors_from_weight(w)
    del tensors["q_perm"]
    assert torch.equal(weight_from_exl2_tensors(tensors, 40).dequantize(), w.dequantize())


def bad(tensors, **changes):
    out = dict(tensors)
    out.update(changes)
    return out


@pytest.fixture
def good():
    w = random_exl2(96, 40, [(4, 64), (3, 32)], seed=2)
    return exl2_tensors_from_weight(w)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda t: {k: v for k, v in t.items() if k != "q_scale"}, "missing EXL2 tensor"),
        (lambda t: bad(t, q_weight=t["q_weight"].to(torch.int64)), "q_weight must be a 2-D int32"),
        (lambda t: bad(t, q_groups=torch.tensor([4, 0, 3], dtype=torch.int16)), "pairs"),
        (lambda t: bad(t, q_groups=torch.tensor([7, 0, 3, 8], dtype=torch.int16)), "group 0 has 7 bits"),
        (lambda t: bad(t, q_groups=torch.tensor([3, 0, 4, 3], dtype=torch.int16)), "increase"),
        (lambda t: bad(t, q_groups=torch.tensor([4, 1, 3, 8], dtype=torch.int16)), "starts at packed row 1"),
        (lambda t: bad(t, q_groups=torch.tensor([4, 0, 3, 9], dtype=torch.int16)), "no whole number"),
        (lambda t: bad(t, q_scale=t["q_scale"][:1]), "q_scale has shape"),
        (lambda t: bad(t, q_scale_max=t["q_scale_max"][:1]), "q_scale_max has"),
        (lambda t: bad(t, q_scale_max=torch.tensor([float("inf"), 1.0]).half()), "not finite"),
        (lambda t: bad(t, q_invperm=t["q_invperm"][:-1]), "q_invperm must be an integer vector of 96"),
        (lambda t: bad(t, q_invperm=torch.zeros(96, dtype=torch.int32)), "not a permutation"),
        (lambda t: bad(t, q_invperm=t["q_invperm"] + 1), "outside 0..95"),
        (lambda t: bad(t, q_perm=torch.arange(96, dtype=torch.int32).flip(0)), "q_perm is not the inverse"),
    ],
)
def test_reader_refuses_bad_tensors(good, mutate, message):
    with pytest.raises(QtoolError, match=message):
        weight_from_exl2_tensors(mutate(good), 40, name="layer")


def test_reader_refuses_wrong_width(good):
    with pytest.raises(QtoolError, match="columns for a linear of 70 outputs"):
        weight_from_exl2_tensors(good, 70)


@pytest.mark.parametrize(
    "layout, in_features, message",
    [
        ([(7, 32)], 32, "7 bits"),
        ([(3, 32), (4, 32)], 64, "increase"),
        ([(4, 48)], 48, "in_features 48"),
        ([(4, 16), (4, 48)], 64, "16 rows"),
    ],
)
def test_writer_refuses_layouts_exllamav2_cannot_load(layout, in_features, message):
    w = Exl2Weight(
        codes=torch.zeros(in_features, 8, dtype=torch.int32),
        qscale=torch.ones(len(layout), 8, dtype=torch.int32),
        scale_max=torch.ones(len(layout)).half(),
        group_bits=tuple(b for b, _ in layout),
        group_sizes=tuple(r for _, r in layout),
        perm=torch.arange(in_features),
    )
    with pytest.raises(QtoolError, match=message):
        exl2_tensors_from_weight(w)


def test_writer_refuses_code_beyond_its_width():
    w = random_exl2(64, 8, [(4, 32), (2, 32)], seed=1)
    w.codes[40, 3] = 4  # a 2-bit row
    with pytest.raises(QtoolError, match="exceeds its group's bit width"):
        exl2_tensors_from_weight(w)
