"""Files as context: labelled blocks in front of the last user message, the prompt counted as the chat template
renders it, and the fitting policy (oldest turns first, then file tails, the last file first) against counts made
here from the tokenizer directly."""

from __future__ import annotations

import random

import pytest

from qtool.core.errors import QtoolError
from qtool.runtime.context_files import (CUT_MARKER, ContextFile, context_file_from_bytes, file_block, fit_context,
                                         read_context_file, with_files)


def words(rng: random.Random, n: int, vocabulary) -> str:
    return " ".join(rng.choice(vocabulary) for _ in range(n))


def template_tokens(tokenizer, messages) -> int:
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return len(tokenizer.encode(text, add_special_tokens=False))


def test_files_become_labelled_blocks_before_the_last_user_message():
    files = [ContextFile("a.py", "print(1)"), ContextFile("notes.md", "# notes")]
    messages = [{"role": "system", "content": "s"}, {"role": "user", "content": "old"},
                {"role": "assistant", "content": "r"}, {"role": "user", "content": "explain"}]
    out = with_files(messages, files)
    assert out[:3] == messages[:3]
    assert out[3]["content"] == '<file name="a.py">\nprint(1)\n</file>\n\n<file name="notes.md">\n# notes\n</file>\n\nexplain'
    assert file_block(files[0]) in out[3]["content"] and messages[3]["content"] == "explain"  # the input is untouched


def test_fitting_prompt_is_counted_as_the_template_renders_it(tokenizer, tiny_words):
    rng = random.Random(1)
    files = [ContextFile("a.txt", words(rng, 37, tiny_words)), ContextFile("b.txt", words(rng, 23, tiny_words))]
    messages = [{"role": "user", "content": words(rng, 5, tiny_words)}]
    fit = fit_context(tokenizer, messages, files, context_length=4096, reserve_tokens=10)
    assert fit.cuts == [] and fit.dropped_turns == []
    assert fit.prompt_tokens == fit.original_tokens == template_tokens(tokenizer, with_files(messages, files))
    assert [f.tokens for f in fit.files] == [len(tokenizer.encode(f.text, add_special_tokens=False)) for f in files]
    assert all(f.cut_tokens == 0 for f in fit.files)


def test_oldest_turns_go_first_then_the_last_files_tail(tokenizer, tiny_words):
    rng = random.Random(2)
    system = {"role": "system", "content": words(rng, 4, tiny_words)}
    turns = []
    for _ in range(3):
        turns += [{"role": "user", "content": words(rng, 15, tiny_words)}, {"role": "assistant", "content": words(rng, 15, tiny_words)}]
    last = {"role": "user", "content": words(rng, 6, tiny_words)}
    files = [ContextFile("first.txt", words(rng, 40, tiny_words)), ContextFile("second.txt", words(rng, 60, tiny_words))]
    messages = [system, *turns, last]
    without_turns = template_tokens(tokenizer, with_files([system, last], files))
    first_alone = template_tokens(tokenizer, with_files([system, last], files[:1] + [ContextFile("second.txt", "")]))
    # a budget that needs every old turn gone and part, not all, of the second file
    budget = (without_turns + first_alone) // 2 + 12
    fit = fit_context(tokenizer, messages, files, context_length=budget + 16, reserve_tokens=16)
    assert fit.dropped_turns == turns  # oldest first, each user turn with its reply
    assert len([c for c in fit.cuts if c.startswith("dropped")]) == 3
    assert fit.files[0].cut_tokens == 0 and file_block(files[0]) in fit.messages[-1]["content"]
    second = fit.files[1]
    assert 0 < second.kept_tokens < second.tokens
    head = tokenizer.decode(tokenizer.encode(files[1].text, add_special_tokens=False)[: second.kept_tokens])
    assert file_block(ContextFile("second.txt", head + CUT_MARKER.format(tokens=second.cut_tokens))) in fit.messages[-1]["content"]
    assert fit.prompt_tokens == template_tokens(tokenizer, fit.messages) <= budget
    # the cut is the smallest one: a single token more of the head would not fit
    longer = tokenizer.decode(tokenizer.encode(files[1].text, add_special_tokens=False)[: second.kept_tokens + 1])
    bigger = [system, {"role": "user", "content": fit.messages[-1]["content"].replace(
        file_block(ContextFile("second.txt", head + CUT_MARKER.format(tokens=second.cut_tokens))),
        file_block(ContextFile("second.txt", longer + CUT_MARKER.format(tokens=second.cut_tokens - 1))))}]
    assert template_tokens(tokenizer, bigger) > budget
    assert fit.messages[0] == system and fit.messages[-1]["content"].endswith(last["content"])


def test_a_prompt_that_cannot_fit_is_refused(tokenizer, tiny_words):
    rng = random.Random(3)
    messages = [{"role": "system", "content": words(rng, 80, tiny_words)}, {"role": "user", "content": "hi"}]
    with pytest.raises(QtoolError, match="even with every earlier turn dropped"):
        fit_context(tokenizer, messages, [ContextFile("a.txt", "the fox")], context_length=60, reserve_tokens=8)
    with pytest.raises(QtoolError, match="leave no room"):
        fit_context(tokenizer, messages, [], context_length=8, reserve_tokens=8)


def test_unknown_context_length_cuts_nothing(tokenizer):
    fit = fit_context(tokenizer, [{"role": "user", "content": "the fox"}], [ContextFile("a", "dog " * 500)], None, 10)
    assert fit.cuts == [] and fit.budget is None


def test_pdf_binary_and_non_utf8_files_are_refused(tmp_path):
    with pytest.raises(QtoolError, match="PDF files are not read"):
        context_file_from_bytes("paper.pdf", b"%PDF-1.7\n...")
    with pytest.raises(QtoolError, match="binary"):
        context_file_from_bytes("x.bin", bytes(range(256)))
    with pytest.raises(QtoolError, match="not UTF-8"):
        context_file_from_bytes("latin.txt", "café".encode("latin-1"))
    with pytest.raises(QtoolError, match="does not exist"):
        read_context_file(tmp_path / "missing.py")
    with pytest.raises(QtoolError, match="is a directory"):
        read_context_file(tmp_path)
    (tmp_path / "a.py").write_text("\ufeffprint('é')\n", encoding="utf-8")
    assert read_context_file(tmp_path / "a.py") == ContextFile("a.py", "print('é')\n")


def test_raw_mode_counts_the_plain_text(make_tiny_tokenizer):
    tokenizer = make_tiny_tokenizer()
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the fox"}]
    fit = fit_context(tokenizer, messages, [ContextFile("a.txt", "lazy dog")], 256, 4, raw=True)
    text = 'be brief\n\n<file name="a.txt">\nlazy dog\n</file>\n\nthe fox'
    assert fit.prompt_tokens == len(tokenizer(text)["input_ids"])
