"""bench/kernels/read_floor.py's read-only kernel (under the interpreter on a CPU): every grid it is timed with reads
every word of the buffer once, whatever the buffer's length against the block, or its time would not be a floor."""

import numpy as np
import pytest
import torch
import triton

from bench_scripts import load_bench_script

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="module")
def read_floor():
    return load_bench_script("kernels/read_floor")


@pytest.mark.parametrize("n_words", [2048 * 3, 2048 * 5 + 7, 8192 * 2 + 2048, 300])
def test_every_grid_reads_every_word_once(read_floor, n_words):
    gen = torch.Generator().manual_seed(n_words)
    src = torch.randint(-(1 << 31), 1 << 31, (n_words,), dtype=torch.int32, generator=gen).to(DEVICE)
    out = torch.empty(triton.cdiv(n_words, min(read_floor.READ_BLOCKS)) + 1, dtype=torch.int32, device=DEVICE)
    configs = read_floor.read_configs(n_words, num_sms=3)
    assert len(set(configs)) == len(configs) >= 4
    want = read_floor.words_xor(src)
    assert want == np.bitwise_xor.reduce(src.cpu().numpy())
    for block, warps, programs in configs:
        out.fill_(0x5A5A5A5A)  # what a program that never stored would leave
        read_floor.check_read_covers_buffer(src, out, block, warps, programs, want)
        # a word read twice (or dropped) changes the fold: flip one word and the fold must change with it
        src[n_words // 2] ^= 0x10
        read_floor.check_read_covers_buffer(src, out, block, warps, programs, want ^ 0x10)
        src[n_words // 2] ^= 0x10


def test_the_check_rejects_a_grid_that_skips_words(read_floor):
    gen = torch.Generator().manual_seed(1)
    src = torch.randint(-(1 << 31), 1 << 31, (2048 * 4,), dtype=torch.int32, generator=gen).to(DEVICE)
    out = torch.zeros(8, dtype=torch.int32, device=DEVICE)
    want = read_floor.words_xor(src)
    read_floor.check_read_covers_buffer(src, out, 2048, 1, 4, want)
    out.zero_()  # or the left-out program's XOR would still be there from the full launch
    with pytest.raises(RuntimeError, match="skipped words"):
        read_floor.check_read_covers_buffer(src, out, 2048, 1, 4, want, grid=3)  # one program's range left out
