"""The engine's per-token ops: the torch references (engine_ops_ref.py) against float64 loops written here one
sequence / token / head at a time (and paged attention against the runtime's prefill attention), then each Triton
kernel (engine_ops_triton.py) against its reference on fresh random inputs: float16/bfloat16/float32, odd sizes,
GQA groups, sliding windows, empty and padded sequences, split-K, strided views of fused projections. Outputs are
poisoned with NaN first so every element must be written; cache memory a kernel must not use is poisoned too.
On a CPU the kernels run under the Triton interpreter; on a GPU the same tests run the compiled kernels."""

import math

import pytest
import torch
from kernel_env import DEVICE


from qtool.kernels import engine_ops, engine_ops_triton
from qtool.kernels.engine_ops_ref import (
    add_rms_norm_ref,
    paged_decode_attention_ref,
    rope_and_cache_ref,
    silu_mul_ref,
)
from qtool.kernels.engine_ops_triton import (
    add_rms_norm_triton,
    decode_splits,
    paged_decode_attention_triton,
    rope_and_cache_triton,
    silu_mul_triton,
)

# elementwise ops: one rounding of the output; attention: bfloat16 weights times values in the P.V product
TOLERANCE = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
ATTENTION_TOLERANCE = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 3e-2}
DTYPES = [torch.float16, torch.bfloat16, torch.float32]


@pytest.fixture(autouse=True)
def triton_kernels_can_run():
    assert DEVICE == "cuda" or engine_ops_triton.triton_interpreted(), (
        "qtool.kernels.engine_ops_triton was imported before TRITON_INTERPRET=1 was set")


def close(actual, expected, tol, equal_nan=False):
    torch.testing.assert_close(actual.float().cpu(), expected.float().cpu(), atol=tol, rtol=tol, equal_nan=equal_nan)


# ---------------------------------------------------------------------------------------------------------------
# a random paged cache


class PagedCase:
    """Sequences of the given context lengths in a shuffled block pool; block tables padded to max_blocks with
    -1 (the padded entries and every cache position a query must not see can be poisoned)."""

    def __init__(self, contexts, heads, kv_heads, head_dim, block_size, dtype, seed, window=None, extra_blocks=2,
                 query_dtype=None):
        gen = torch.Generator().manual_seed(seed)
        self.contexts, self.window, self.block_size = list(contexts), window, block_size
        needed = [math.ceil(c / block_size) for c in contexts]
        self.max_blocks = max(needed + [1]) + extra_blocks
        num_blocks = sum(needed) + 3
        order = torch.randperm(num_blocks, generator=gen).tolist()
        self.tables = torch.full((len(contexts), self.max_blocks), -1, dtype=torch.int32)
        taken = 0
        for b, n in enumerate(needed):
            self.tables[b, :n] = torch.tensor(order[taken : taken + n], dtype=torch.int32)
            taken += n
        shape = (num_blocks, block_size, kv_heads, head_dim)
        self.key_cache = torch.randn(shape, generator=gen).to(dtype)
        self.value_cache = torch.randn(shape, generator=gen).to(dtype)
        self.query = torch.randn((len(contexts), heads, head_dim), generator=gen).to(query_dtype or dtype)
        self.lens = torch.tensor(contexts, dtype=torch.int32)
        self.scale = head_dim ** -0.5

    def visible(self, b):
        """The positions sequence b's query attends to."""
        c = self.contexts[b]
        lo = 0 if self.window is None else max(c - self.window, 0)
        return range(lo, c)

    def poisoned_caches(self):
        """Copies of the caches with NaN everywhere no query may look (other sequences' unused tails, spare
        blocks, positions before a window)."""
        seen = torch.zeros(self.key_cache.shape[:2], dtype=torch.bool)
        for b in range(len(self.contexts)):
            for p in self.visible(b):
                seen[self.tables[b, p // self.block_size], p % self.block_size] = True
        keys, values = self.key_cache.clone(), self.value_cache.clone()
        keys[~seen] = float("nan")
        values[~seen] = float("nan")
        return keys, values

    def ref(self):
        # the reference gathers every table entry; -1 pads must index somewhere: block 0 (masked out)
        return paged_decode_attention_ref(self.query, self.key_cache, self.value_cache, self.tables.clamp(min=0),
                                          self.lens, self.scale, self.window)


def naive_decode_attention(case: PagedCase) -> torch.Tensor:
    """float64, one sequence and one head at a time."""
    batch, heads, head_dim = case.query.shape
    group = heads // case.key_cache.shape[2]
    out = torch.zeros(batch, heads, head_dim, dtype=torch.float64)
    for b in range(batch):
        positions = list(case.visible(b))
        if not positions:
            continue
        blocks = [int(case.tables[b, p // case.block_size]) for p in positions]
        offsets = [p % case.block_size for p in positions]
        for h in range(heads):
            k = case.key_cache[blocks, offsets, h // group].double()
            v = case.value_cache[blocks, offsets, h // group].double()
            weights = torch.softmax(k @ case.query[b, h].double() * case.scale, dim=0)
            out[b, h] = weights @ v
    return out


# ---------------------------------------------------------------------------------------------------------------
# the references


@pytest.mark.parametrize("window", [None, 1, 20])
@pytest.mark.parametrize("heads,kv_heads", [(8, 2), (6, 3), (4, 4)])
def test_paged_attention_ref_matches_float64_loop(heads, kv_heads, window):
    case = PagedCase([1, 15, 16, 17, 100, 0], heads, kv_heads, 16, 16, torch.float32, seed=heads * 10 + kv_heads,
                     window=window)
    close(case.ref(), naive_decode_attention(case), 1e-5)


@pytest.mark.parametrize("window", [None, 5])
def test_paged_attention_ref_matches_runtime_attention(window):
    """The decode reference equals the runtime's prefill attention for one new token per sequence."""
    from qtool.runtime.engine.attention import AttentionBatch, paged_attention

    case = PagedCase([3, 16, 40], 6, 2, 32, 8, torch.float32, seed=7, window=window)
    tables = [[int(x) for x in row if x >= 0] for row in case.tables]
    batch = AttentionBatch.build(tables, case.contexts, [1] * len(tables), case.block_size)
    expected = paged_attention(case.query, case.key_cache, case.value_cache, batch, case.scale, window)
    close(case.ref(), expected, 1e-5)


@pytest.mark.parametrize("residual", [True, False])
@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_add_rms_norm_ref_matches_float64(residual, offset):
    gen = torch.Generator().manual_seed(3)
    x, r, w = (torch.randn(s, generator=gen) for s in ((5, 200), (5, 200), (200,)))
    summed = (x.double() + r.double()) if residual else x.double()
    normed = summed / torch.sqrt(summed.pow(2).mean(-1, keepdim=True) + 1e-5) * (w.double() + offset)
    got_normed, got_summed = add_rms_norm_ref(x, r if residual else None, w, 1e-5, offset)
    close(got_normed, normed, 1e-5)
    close(got_summed, summed, 1e-6)


def test_silu_mul_ref_matches_float64():
    gen = torch.Generator().manual_seed(4)
    g, u = torch.randn(7, 96, generator=gen) * 4, torch.randn(7, 96, generator=gen)
    gd = g.double()
    close(silu_mul_ref(g, u), gd / (1 + torch.exp(-gd)) * u.double(), 1e-6)


def naive_rope_and_cache(query, key, value, cos, sin, key_cache, value_cache, slots):
    """float64, one token and head at a time: x * cos + rotate_half(x) * sin; cache written slot by slot."""
    half = query.shape[-1] // 2

    def rotate(x, t):
        x = x.double()
        out = torch.empty_like(x)
        for i in range(half):
            out[i] = x[i] * cos[t, i].double() - x[i + half] * sin[t, i].double()
            out[i + half] = x[i + half] * cos[t, i + half].double() + x[i] * sin[t, i + half].double()
        return out

    q_out = torch.stack([torch.stack([rotate(query[t, h], t) for h in range(query.shape[1])])
                         for t in range(query.shape[0])])
    block_size = key_cache.shape[1]
    for t, slot in enumerate(slots.tolist()):
        if slot < 0:
            continue
        for h in range(key.shape[1]):
            key_cache[slot // block_size, slot % block_size, h] = rotate(key[t, h], t).to(key_cache.dtype)
            value_cache[slot // block_size, slot % block_size, h] = value[t, h].to(value_cache.dtype)
    return q_out


def rope_inputs(tokens, heads, kv_heads, head_dim, block_size, dtype, cache_dtype, seed, fused=True):
    """(query, key, value, cos, sin, key_cache, value_cache, slots): q/k/v as views of one fused projection
    output when `fused`, real cos/sin of random positions, the caches NaN-filled, slot -1 on every third token."""
    gen = torch.Generator().manual_seed(seed)
    width = (heads + 2 * kv_heads) * head_dim
    qkv = torch.randn(tokens, width, generator=gen).to(dtype)
    if fused:
        q = qkv[:, : heads * head_dim].view(tokens, heads, head_dim)
        k = qkv[:, heads * head_dim : (heads + kv_heads) * head_dim].view(tokens, kv_heads, head_dim)
        v = qkv[:, (heads + kv_heads) * head_dim :].view(tokens, kv_heads, head_dim)
    else:
        q = torch.randn(tokens, heads, head_dim, generator=gen).to(dtype)
        k = torch.randn(tokens, kv_heads, head_dim, generator=gen).to(dtype)
        v = torch.randn(tokens, kv_heads, head_dim, generator=gen).to(dtype)
    positions = torch.randint(0, 4000, (tokens,), generator=gen).double()
    inv_freq = 10000.0 ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = positions[:, None] * inv_freq[None, :]
    angles = torch.cat((angles, angles), dim=-1)
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    num_blocks = tokens // block_size + 3
    cache_shape = (num_blocks, block_size, kv_heads, head_dim)
    key_cache = torch.full(cache_shape, float("nan"), dtype=cache_dtype)
    value_cache = torch.full(cache_shape, float("nan"), dtype=cache_dtype)
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:tokens]
    slots[::3] = -1
    return q, k, v, cos, sin, key_cache, value_cache, slots


@pytest.mark.parametrize("tokens,heads,kv_heads,head_dim", [(1, 4, 4, 16), (3, 6, 3, 32), (7, 8, 2, 12)])
def test_rope_and_cache_ref_matches_float64_loop(tokens, heads, kv_heads, head_dim):
    inputs = rope_inputs(tokens, heads, kv_heads, head_dim, 8, torch.float32, torch.float32, seed=tokens)
    q, k, v, cos, sin, key_cache, value_cache, slots = inputs
    expected_keys, expected_values = key_cache.double(), value_cache.double()
    expected_q = naive_rope_and_cache(q, k, v, cos, sin, expected_keys, expected_values, slots)
    got_q = rope_and_cache_ref(*inputs)
    close(got_q, expected_q, 1e-5)
    close(key_cache, expected_keys, 1e-5, equal_nan=True)
    close(value_cache, expected_values, 0, equal_nan=True)


# ---------------------------------------------------------------------------------------------------------------
# the Triton kernels against the references

# (contexts, heads, kv_heads, head_dim, block_size, window, splits, dtype)
ATTENTION_CASES = [
    ([1, 15, 16, 17, 100, 0], 8, 2, 64, 16, None, 1, torch.float16),
    ([1, 15, 16, 17, 100, 0], 8, 2, 64, 16, None, 3, torch.bfloat16),
    ([1, 15, 16, 17, 100, 0], 6, 3, 32, 16, 17, 1, torch.float32),
    ([1, 15, 16, 17, 100, 0], 6, 3, 32, 16, 17, 4, torch.float16),
    ([100, 0, 17], 4, 4, 128, 16, 1, 2, torch.bfloat16),
    ([100, 33, 1], 4, 4, 16, 8, 40, 7, torch.float32),
    ([0, 0], 8, 2, 16, 16, None, 2, torch.float16),
    ([130, 64], 8, 2, 96, 32, None, None, torch.bfloat16),  # head_dim 96: padded to 128 with masks
    ([100, 5], 8, 8, 256, 16, 64, None, torch.float16),
    ([70], 16, 2, 64, 16, None, 5, torch.float16),  # group 8
]


@pytest.mark.parametrize("contexts,heads,kv_heads,head_dim,block_size,window,splits,dtype", ATTENTION_CASES)
def test_paged_decode_attention_matches_reference(contexts, heads, kv_heads, head_dim, block_size, window, splits,
                                                  dtype):
    case = PagedCase(contexts, heads, kv_heads, head_dim, block_size, dtype, seed=len(contexts) * head_dim,
                     window=window)
    expected = case.ref()
    keys, values = case.poisoned_caches()
    out = torch.full(case.query.shape, float("nan"), dtype=dtype, device=DEVICE)
    got = paged_decode_attention_triton(case.query.to(DEVICE), keys.to(DEVICE), values.to(DEVICE),
                                        case.tables.to(DEVICE), case.lens.to(DEVICE), case.scale, window,
                                        num_splits=splits, out=out)
    assert got is out
    assert not torch.isnan(got).any(), "an output row was left unwritten or read poisoned cache memory"
    close(got, expected, ATTENTION_TOLERANCE[dtype])
    assert (got[case.lens == 0] == 0).all()


def test_paged_decode_attention_mixed_dtypes_and_strided_query():
    """A float32 query over a bfloat16 cache (the float32 dot path), the query a view of a wider tensor."""
    case = PagedCase([9, 40], 8, 2, 32, 16, torch.bfloat16, seed=11, query_dtype=torch.float32)
    wide = torch.randn(2, 8, 32 * 3)
    wide[:, :, :32] = case.query
    query = wide[:, :, :32]
    got = paged_decode_attention_triton(query.to(DEVICE), case.key_cache.to(DEVICE), case.value_cache.to(DEVICE),
                                        case.tables.to(DEVICE), case.lens.to(DEVICE), case.scale, None, num_splits=2)
    close(got, case.ref(), 2e-5)


def test_decode_splits_rule():
    # batch x kv heads fill the GPU: one program per (sequence, kv head)
    assert decode_splits(64, 8, 128, 16, 128, 132) == 1
    assert decode_splits(1, 32, 32, 16, 128, 132) > 1
    # a small batch over a long context: about two programs per SM
    assert 2 * 132 <= 8 * decode_splits(1, 8, 1024, 16, 128, 132) < 2 * 132 + 8
    # ... unless a split would get fewer than two tiles of the longest context
    tiles = 128 * 16 // engine_ops_triton.decode_tile_tokens(128)
    assert decode_splits(1, 8, 128, 16, 128, 132) == tiles // 2
    # a short context is not split below two tiles
    assert decode_splits(1, 8, 4, 16, 128, 132) == 1


@pytest.mark.parametrize("rows,hidden", [((1,), 96), ((3,), 200), ((7,), 4096), ((2, 3), 200)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_add_rms_norm_matches_reference(rows, hidden, dtype):
    gen = torch.Generator().manual_seed(hidden + len(rows))
    x = torch.randn(*rows, hidden, generator=gen).to(dtype)
    residual = torch.randn(*rows, hidden, generator=gen).to(dtype)
    weight = torch.randn(hidden, generator=gen).to(dtype)
    for res, offset in ((residual, 0.0), (None, 1.0)):
        normed_ref, summed_ref = add_rms_norm_ref(x, res, weight, 1e-6, offset)
        out = tuple(torch.full(x.shape, float("nan"), dtype=dtype, device=DEVICE) for _ in range(2))
        normed, summed = add_rms_norm_triton(x.to(DEVICE), None if res is None else res.to(DEVICE),
                                             weight.to(DEVICE), 1e-6, offset, out=out)
        assert normed is out[0]
        close(normed, normed_ref, TOLERANCE[dtype])
        if res is None:
            assert torch.equal(summed.cpu(), x) and torch.isnan(out[1]).all()  # x itself, the buffer untouched
        else:
            assert summed is out[1]
            assert torch.equal(summed.cpu(), summed_ref)  # the same one rounding as torch's add


def test_add_rms_norm_float32_weight_and_strided_rows():
    """A bfloat16 activation with a float32 weight (Gemma keeps its norms in float32), x a row-strided view."""
    gen = torch.Generator().manual_seed(5)
    wide = torch.randn(3, 400, generator=gen).to(torch.bfloat16)
    x = wide[:, 100:300]
    residual = torch.randn(3, 200, generator=gen).to(torch.bfloat16)
    weight = torch.randn(200, generator=gen)
    normed_ref, summed_ref = add_rms_norm_ref(x, residual, weight, 1e-5, 1.0)
    normed, summed = add_rms_norm_triton(x.to(DEVICE), residual.to(DEVICE), weight.to(DEVICE), 1e-5, 1.0)
    close(normed, normed_ref, TOLERANCE[torch.bfloat16])
    assert torch.equal(summed.cpu(), summed_ref)


@pytest.mark.parametrize("rows,width", [((1,), 96), ((3,), 200), ((7,), 1100), ((2, 3), 200)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul_matches_reference(rows, width, dtype):
    gen = torch.Generator().manual_seed(width)
    fused = (torch.randn(*rows, 2 * width, generator=gen) * 3).to(dtype)  # a gate/up projection's output
    gate, up = fused[..., :width], fused[..., width:]
    out = torch.full(gate.shape, float("nan"), dtype=dtype, device=DEVICE)
    fused_dev = fused.to(DEVICE)
    got = silu_mul_triton(fused_dev[..., :width], fused_dev[..., width:], out=out)
    assert got is out
    close(got, silu_mul_ref(gate, up), TOLERANCE[dtype])


# (tokens, heads, kv_heads, head_dim, block_size, dtype, cache dtype, fused qkv)
ROPE_CASES = [
    (1, 8, 2, 64, 16, torch.float16, torch.float16, True),
    (3, 6, 3, 32, 16, torch.bfloat16, torch.bfloat16, True),
    (7, 4, 4, 128, 8, torch.float32, torch.float32, False),
    (7, 8, 2, 96, 16, torch.float16, torch.float16, True),  # half 48: masked to 64
    (3, 4, 2, 16, 16, torch.float32, torch.bfloat16, True),  # rounded to float32 then to the cache's bfloat16
]


@pytest.mark.parametrize("tokens,heads,kv_heads,head_dim,block_size,dtype,cache_dtype,fused", ROPE_CASES)
def test_rope_and_cache_matches_reference(tokens, heads, kv_heads, head_dim, block_size, dtype, cache_dtype, fused):
    inputs = rope_inputs(tokens, heads, kv_heads, head_dim, block_size, dtype, cache_dtype, seed=tokens + head_dim,
                         fused=fused)
    q, k, v, cos, sin, key_cache, value_cache, slots = inputs
    ref_keys, ref_values = key_cache.clone(), value_cache.clone()
    expected_q = rope_and_cache_ref(q, k, v, cos, sin, ref_keys, ref_values, slots)
    dev = [t.to(DEVICE) for t in inputs]
    if fused:  # keep q/k/v views of one device tensor, as a fused projection gives them
        qkv = torch.cat([t.reshape(tokens, -1) for t in inputs[:3]], dim=1).to(DEVICE)
        split = [heads * head_dim, kv_heads * head_dim, kv_heads * head_dim]
        dev[:3] = [part.view(tokens, -1, head_dim) for part in qkv.split(split, dim=1)]
        assert tokens == 1 or not dev[0].is_contiguous()
    out = torch.full(q.shape, float("nan"), dtype=dtype, device=DEVICE)
    got = rope_and_cache_triton(*dev, out=out)
    assert got is out
    close(got, expected_q, TOLERANCE[dtype])
    # written slots match; every other cache element is still the NaN it was
    close(dev[5], ref_keys, TOLERANCE[cache_dtype], equal_nan=True)
    close(dev[6], ref_values, 0, equal_nan=True)


# ---------------------------------------------------------------------------------------------------------------
# dispatch


def test_engine_ops_route_cpu_tensors_to_the_references():
    case = PagedCase([5, 20], 4, 2, 16, 8, torch.float32, seed=2)
    assert engine_ops.triton_problem(case.query) is not None
    tables = case.tables.clamp(min=0)
    got = engine_ops.paged_decode_attention(case.query, case.key_cache, case.value_cache, tables, case.lens,
                                            case.scale, None)
    assert torch.equal(got, case.ref())
    x, r, w = torch.randn(3, 96), torch.randn(3, 96), torch.randn(96)
    assert all(torch.equal(a, b) for a, b in zip(engine_ops.add_rms_norm(x, r, w, 1e-6, 1.0),
                                                  add_rms_norm_ref(x, r, w, 1e-6, 1.0)))
    assert torch.equal(engine_ops.silu_mul(x, r), silu_mul_ref(x, r))
    inputs = rope_inputs(3, 4, 2, 16, 8, torch.float32, torch.float32, seed=1)
    caches = [inputs[5].clone(), inputs[6].clone()]
    got_q = engine_ops.rope_and_cache(*inputs)
    expected_q = rope_and_cache_ref(*inputs[:5], *caches, inputs[7])
    assert torch.equal(got_q, expected_q)
    torch.testing.assert_close(inputs[5], caches[0], rtol=0, atol=0, equal_nan=True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton path serves CUDA tensors")
def test_engine_ops_route_cuda_tensors_to_triton_and_capture_in_a_graph():
    """On a GPU the dispatch takes the kernels, and a captured attention replays right for new context lengths
    (the split count and grid come from static shapes)."""
    case = PagedCase([30, 200, 7], 32, 8, 128, 16, torch.bfloat16, seed=9)
    q, kc, vc, tables, lens = (t.cuda() for t in (case.query, case.key_cache, case.value_cache,
                                                  case.tables.clamp(min=0), case.lens))
    assert engine_ops.triton_problem(q) is None
    direct = paged_decode_attention_triton(q, kc, vc, tables, lens, case.scale)
    assert torch.equal(engine_ops.paged_decode_attention(q, kc, vc, tables, lens, case.scale), direct)
    out = torch.empty_like(q)
    paged_decode_attention_triton(q, kc, vc, tables, lens, case.scale, out=out)  # compile before capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        paged_decode_attention_triton(q, kc, vc, tables, lens, case.scale, out=out)
    lens.copy_(torch.tensor([1, 150, 0], dtype=torch.int32))
    graph.replay()
    case.lens = lens.cpu()
    case.contexts = case.lens.tolist()
    close(out, case.ref(), ATTENTION_TOLERANCE[torch.bfloat16])


def test_paged_decode_attention_refuses_what_the_kernel_cannot_take():
    """A head_dim over the kernel's limit is named (the dispatch then runs the reference), and a query that does
    not fit the cache is a one-line QtoolError."""
    from qtool.core.errors import QtoolError

    wide = torch.zeros(1, 2, 512)
    cache = torch.zeros(2, 16, 1, 512)
    assert "head_dim 512" in engine_ops_triton.paged_decode_attention_problem(wide, cache)
    assert engine_ops.paged_decode_attention_problem(wide, cache) is not None
    with pytest.raises(QtoolError, match="head_dim 512"):
        paged_decode_attention_triton(wide, cache, cache, torch.zeros(1, 1, dtype=torch.int32),
                                      torch.ones(1, dtype=torch.int32), 1.0)
    with pytest.raises(QtoolError, match="does not fit"):
        paged_decode_attention_triton(torch.zeros(1, 3, 16), torch.zeros(2, 16, 2, 16), torch.zeros(2, 16, 2, 16),
                                      torch.zeros(1, 1, dtype=torch.int32), torch.ones(1, dtype=torch.int32), 1.0)
