"""The GPU's prefill attention against the torch reference (attention.paged_attention): ragged chunks, a cached
prefix before a chunk, one-token decodes mixed in, GQA, sliding windows, Gemma 2's logit softcap. SDPA per sequence runs here; torch's flash
varlen kernel on the device (gpu)."""

from __future__ import annotations

import pytest
import torch

from qtool.runtime.engine.attention import AttentionBatch, cache_slots, paged_attention, write_kv
from qtool.runtime.engine.kv_quant import QuantizedKVCache
from qtool.runtime.engine.prefill_attention import GatheredBatch, PrefillAttention, sdpa_attention, varlen_options
from tests.helpers.key_rope import standard_key_rope

BLOCK_SIZE = 4
HEADS, KV_HEADS, HEAD_DIM = 6, 2, 16
# (context, new tokens): a whole prompt, a one-token decode, a chunk after a cached prefix, an odd-length prompt
SEQUENCES = [(13, 13), (5, 1), (22, 6), (9, 9)]


def random_step(seed: int, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """(query, key cache, value cache, batch) of a ragged step over a random cache, blocks handed out shuffled."""
    generator = torch.Generator().manual_seed(seed)
    num_blocks = 32
    shape = (num_blocks, BLOCK_SIZE, KV_HEADS, HEAD_DIM)
    key_cache = torch.randn(shape, generator=generator).to(device, dtype)
    value_cache = torch.randn(shape, generator=generator).to(device, dtype)
    free = torch.randperm(num_blocks, generator=generator).tolist()
    tables = []
    for context, _ in SEQUENCES:
        count = -(-context // BLOCK_SIZE)
        tables.append(free[:count])
        free = free[count:]
    batch = AttentionBatch.build(tables, [c for c, _ in SEQUENCES], [n for _, n in SEQUENCES], BLOCK_SIZE, device)
    query = torch.randn(sum(n for _, n in SEQUENCES), HEADS, HEAD_DIM, generator=generator).to(device, dtype)
    return query, key_cache, value_cache, batch


def test_gathered_layout():
    _, _, _, batch = random_step(0)
    gathered = GatheredBatch.build(batch, BLOCK_SIZE, torch.device("cpu"))
    assert gathered.cu_queries.tolist() == [0, 13, 14, 20, 29]
    assert gathered.cu_contexts.tolist() == [0, 13, 18, 40, 49]
    assert (gathered.max_query, gathered.max_context) == (13, 22)
    table = batch.block_tables[2]
    expected = [table[p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE for p in range(22)]
    assert gathered.context_slots[18:40].tolist() == expected


@pytest.mark.parametrize("window", [None, 4, 7])
def test_sdpa_attention_equals_the_reference(window):
    query, key_cache, value_cache, batch = random_step(1)
    expected = paged_attention(query, key_cache, value_cache, batch, 0.3, window)
    got = sdpa_attention(query, key_cache, value_cache, batch, 0.3, window)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_prefill_attention_on_the_cpu_is_sdpa():
    query, key_cache, value_cache, batch = random_step(2)
    attention = PrefillAttention(BLOCK_SIZE, torch.device("cpu"))
    got = attention(query, key_cache, value_cache, batch, 0.25, 5)
    torch.testing.assert_close(got, paged_attention(query, key_cache, value_cache, batch, 0.25, 5),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("window", [None, 4])
def test_a_softcap_takes_the_explicit_path_and_equals_the_reference(window):
    query, key_cache, value_cache, batch = random_step(6)
    expected = paged_attention(query, key_cache, value_cache, batch, 0.3, window, softcap=0.6)
    assert (expected - paged_attention(query, key_cache, value_cache, batch, 0.3, window)).abs().max() > 1e-2
    torch.testing.assert_close(sdpa_attention(query, key_cache, value_cache, batch, 0.3, window, softcap=0.6),
                               expected, rtol=1e-5, atol=1e-5)
    attention = PrefillAttention(BLOCK_SIZE, torch.device("cpu"))
    torch.testing.assert_close(attention(query, key_cache, value_cache, batch, 0.3, window, softcap=0.6), expected,
                               rtol=1e-5, atol=1e-5)


def quantized_layers(kind: str, key_floats: torch.Tensor, value_floats: torch.Tensor):
    """Keys and values [num_blocks, block_size, kv_heads, d] written into one layer of a q8/q4 cache (every block
    in one write; q4 keys as written, no RoPE)."""
    cache = QuantizedKVCache.allocate(kind, 1, *key_floats.shape, key_floats.device)
    keys, values = cache.layer(0)
    slots = torch.arange(key_floats.shape[0] * key_floats.shape[1], device=key_floats.device)
    write_kv(keys, values, slots, key_floats.flatten(0, 1), value_floats.flatten(0, 1))
    return keys, values


@pytest.mark.parametrize("kind", ["q8", "q4"])
@pytest.mark.parametrize("window", [None, 5])
def test_quantized_cache_read_as_the_reference_reads_it(kind, window):
    query, key_floats, value_floats, batch = random_step(4)
    assert_read_as_the_reference_reads_it(query, quantized_layers(kind, key_floats, value_floats),
                                          (key_floats, value_floats), batch, window, {"q8": 0.05, "q4": 0.5}[kind])


def assert_read_as_the_reference_reads_it(query, quantized, floats, batch, window, float_atol: float) -> None:
    """The GPU's prefill attention over a quantized layer equals paged_attention's reading of it (q8: gathered; q4:
    paged_attention itself, on the query's device); both differ, a little (within float_atol), from the float
    caches' attention: the codes hold the keys only to their precision."""
    expected = paged_attention(query, *quantized, batch, 0.25, window)
    attention = PrefillAttention(BLOCK_SIZE, torch.device("cpu"))
    torch.testing.assert_close(attention(query, *quantized, batch, 0.25, window), expected, rtol=1e-5, atol=1e-5)
    from_floats = paged_attention(query, *floats, batch, 0.25, window)
    assert not torch.allclose(expected, from_floats, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(expected, from_floats, rtol=0, atol=float_atol)


def q4_layers_keys_before_rope(key_floats: torch.Tensor, value_floats: torch.Tensor, batch: AttentionBatch):
    """A q4 layer (keys stored before RoPE, as the model runner sets it up) holding each sequence's context of the
    float caches, written at the sequences' own positions; two staging slots for four sequences: some blocks being
    filled are quantized as they stand."""
    cache = QuantizedKVCache.allocate("q4", 1, *key_floats.shape, key_floats.device, staging_slots=2)
    cache.key_ropes = [standard_key_rope(HEAD_DIM)]
    keys, values = cache.layer(0)
    for table, context in zip(batch.block_tables, batch.context_lens):
        slots = cache_slots(table, range(context), BLOCK_SIZE).to(key_floats.device)
        flat = lambda cache: cache.view(-1, KV_HEADS, HEAD_DIM)[slots]  # noqa: E731
        write_kv(keys, values, slots, flat(key_floats), flat(value_floats),
                 torch.arange(context, device=key_floats.device))
    return keys, values


@pytest.mark.parametrize("window", [None, 5])
def test_q4_keys_before_rope_gathered_as_the_reference_reads_them(window):
    """The gathered path hands each context token's position in its own sequence to the cache's RoPE."""
    query, key_floats, value_floats, batch = random_step(6)
    quantized = q4_layers_keys_before_rope(key_floats, value_floats, batch)
    assert_read_as_the_reference_reads_it(query, quantized, (key_floats, value_floats), batch, window, 0.5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="torch's flash varlen attention runs on CUDA")
def test_varlen_attention_reads_q4_keys_before_rope():
    pytest.importorskip("torch.nn.attention.varlen", reason="torch's varlen attention came in torch 2.10")
    query, key_floats, value_floats, batch = random_step(8, "cuda")
    key_cache, value_cache = q4_layers_keys_before_rope(key_floats, value_floats, batch)
    attention = PrefillAttention(BLOCK_SIZE, torch.device("cuda"))
    got = attention(query.bfloat16(), key_cache, value_cache, batch, 0.25)
    assert attention.use_varlen, "the flash varlen kernel ran"
    expected = paged_attention(query, key_cache, value_cache, batch, 0.25)
    torch.testing.assert_close(got.float(), expected, rtol=2e-2, atol=2e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="torch's flash varlen attention runs on CUDA")
@pytest.mark.parametrize("window", [None, 4])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_varlen_attention_equals_the_reference(window, dtype):
    varlen = pytest.importorskip("torch.nn.attention.varlen", reason="torch's varlen attention came in torch 2.10")
    if varlen_options(varlen.varlen_attn, window) is None:
        pytest.skip("this torch's varlen attention has no sliding window")
    query, key_cache, value_cache, batch = random_step(3, "cuda", dtype)
    attention = PrefillAttention(BLOCK_SIZE, torch.device("cuda"))
    got = attention(query, key_cache, value_cache, batch, 0.25, window)
    assert attention.use_varlen, "the flash varlen kernel ran"
    expected = paged_attention(query.float(), key_cache.float(), value_cache.float(), batch, 0.25, window)
    torch.testing.assert_close(got.float(), expected, rtol=2e-2, atol=2e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the softcap's per-sequence path on the GPU")
def test_a_softcap_on_the_gpu_equals_the_reference():
    query, key_cache, value_cache, batch = random_step(7, "cuda", torch.bfloat16)
    attention = PrefillAttention(BLOCK_SIZE, torch.device("cuda"))
    got = attention(query, key_cache, value_cache, batch, 0.25, 4, softcap=0.6)
    expected = paged_attention(query.float(), key_cache.float(), value_cache.float(), batch, 0.25, 4, softcap=0.6)
    torch.testing.assert_close(got.float(), expected, rtol=2e-2, atol=2e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="torch's flash varlen attention runs on CUDA")
@pytest.mark.parametrize("kind", ["q8", "q4"])
def test_varlen_attention_reads_a_quantized_cache(kind):
    """q8 through the flash varlen kernel; q4 (two key sets per query: its own block exact) through paged_attention
    on the GPU."""
    pytest.importorskip("torch.nn.attention.varlen", reason="torch's varlen attention came in torch 2.10")
    query, key_floats, value_floats, batch = random_step(5, "cuda")
    key_cache, value_cache = quantized_layers(kind, key_floats, value_floats)
    attention = PrefillAttention(BLOCK_SIZE, torch.device("cuda"))
    got = attention(query.bfloat16(), key_cache, value_cache, batch, 0.25)
    assert attention.use_varlen, "the flash varlen kernel was not given up"
    expected = paged_attention(query, key_cache, value_cache, batch, 0.25)
    torch.testing.assert_close(got.float(), expected, rtol=2e-2, atol=2e-2)
