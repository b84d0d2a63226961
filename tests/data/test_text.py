"""Evaluation and calibration text: files, wikitext without a network (quick, clear failure), and
reproducible calibration windows."""

from __future__ import annotations

import time

import pytest
import torch

from qtool.core.errors import QtoolError
from qtool.data.text import calibration_windows, join_wikitext_rows, load_eval_text


def test_file_is_read_with_any_newline_convention(tmp_path):
    path = tmp_path / "wiki.test.raw"
    path.write_bytes(b" = Title = \r\n Some text . \r\n")
    assert load_eval_text(path) == " = Title = \n Some text . \n"


def test_wikitext_rows_join_back_into_the_raw_file():
    # Hugging Face rows end with their newline and blank lines are empty rows.
    rows = ["", " = Robert Boulter = \n", "", " Robert Boulter is an actor . \n", ""]
    assert join_wikitext_rows(rows) == " = Robert Boulter = \n Robert Boulter is an actor . \n"


@pytest.mark.parametrize(
    "name, content, match",
    [
        ("absent.txt", None, "absent.txt: no such file"),
        ("empty.txt", b"", "empty.txt: the file is empty"),
        ("blank.txt", b" \n\n", "blank.txt: the file is empty"),
        ("latin1.txt", "caf\xe9".encode("latin-1"), "latin1.txt: not UTF-8 text"),
    ],
)
def test_bad_files_name_the_file(tmp_path, name, content, match):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(QtoolError, match=match):
        load_eval_text(path)


def test_directory_is_not_a_text_file(tmp_path):
    with pytest.raises(QtoolError, match="not a regular file"):
        load_eval_text(tmp_path)


def test_wikitext_unreachable_fails_fast_with_file_hint(monkeypatch):
    import datasets.config

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # the discard port: connection refused at once
    start = time.perf_counter()
    with pytest.raises(QtoolError, match="Hub cannot be reached") as info:
        load_eval_text("wikitext")
    assert time.perf_counter() - start < 10
    assert "--perplexity ../shared/data/wikitext-2-raw/wiki.test.raw" in info.value.hint


def test_wikitext_offline_without_cache_fails_fast(monkeypatch, tmp_path):
    import datasets.config

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path))
    start = time.perf_counter()
    with pytest.raises(QtoolError, match="not in the local cache") as info:
        load_eval_text("wikitext")
    assert time.perf_counter() - start < 10
    assert "wiki.test.raw" in info.value.hint


@pytest.fixture(scope="module")
def tokenizer(make_tiny_tokenizer):
    return make_tiny_tokenizer()


@pytest.fixture
def calibration_file(tmp_path, tiny_words):
    path = tmp_path / "calibration.txt"
    path.write_text("\n".join(" ".join(tiny_words[(i * 7 + j) % len(tiny_words)] for j in range(9)) for i in range(40)))
    return path


def test_calibration_windows_are_slices_of_the_text_without_special_tokens(tokenizer, calibration_file):
    ids = tokenizer.backend_tokenizer.encode(calibration_file.read_text(), add_special_tokens=False).ids
    windows = calibration_windows(tokenizer, calibration_file, samples=6, seqlen=17, seed=0)
    assert len(windows) == 6
    starts = set()
    for window in windows:
        assert window.dtype == torch.int64 and window.shape == (17,)
        found = [s for s in range(len(ids) - 16) if ids[s : s + 17] == window.tolist()]
        assert found, "each window must be a contiguous run of the tokenized text"
        starts.add(found[0])
    assert len(starts) > 1


def test_calibration_windows_follow_the_seed(tokenizer, calibration_file):
    first = calibration_windows(tokenizer, calibration_file, samples=5, seqlen=11, seed=7)
    again = calibration_windows(tokenizer, calibration_file, samples=5, seqlen=11, seed=7)
    other = calibration_windows(tokenizer, calibration_file, samples=5, seqlen=11, seed=8)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not all(torch.equal(a, b) for a, b in zip(first, other))


def test_calibration_window_may_span_the_whole_text(tokenizer, calibration_file):
    count = len(tokenizer.backend_tokenizer.encode(calibration_file.read_text(), add_special_tokens=False).ids)
    windows = calibration_windows(tokenizer, calibration_file, samples=3, seqlen=count, seed=0)
    assert all(w.numel() == count for w in windows)
    with pytest.raises(QtoolError, match=f"the text has {count} tokens, fewer than --seqlen {count + 1}"):
        calibration_windows(tokenizer, calibration_file, samples=3, seqlen=count + 1, seed=0)


@pytest.mark.parametrize("samples, seqlen, match", [(0, 8, "--samples 0"), (4, 0, "--seqlen 0")])
def test_calibration_rejects_bad_counts(tokenizer, calibration_file, samples, seqlen, match):
    with pytest.raises(QtoolError, match=match):
        calibration_windows(tokenizer, calibration_file, samples=samples, seqlen=seqlen, seed=0)


def test_calibration_missing_file_names_the_option(tokenizer, tmp_path):
    with pytest.raises(QtoolError, match="--calibration .*nope.txt: no such file"):
        calibration_windows(tokenizer, tmp_path / "nope.txt", samples=1, seqlen=4, seed=0)
