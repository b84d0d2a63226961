"""Fine-tuning data: every file type and kind, labels against an independent tokenization, and each bad input as
one QtoolError naming the file, the row and what was expected."""

from __future__ import annotations

import json
import random

import pytest

from qtool.core.errors import QtoolError
from qtool.finetune.data import IGNORE, load_examples
from qtool.finetune.records import load_records


@pytest.fixture(scope="module")
def chat_tokenizer(make_tiny_tokenizer, tiny_chat_template):
    return make_tiny_tokenizer(chat_template=tiny_chat_template)


def sentence(rng: random.Random, words) -> str:
    return " ".join(rng.choice(words) for _ in range(rng.randint(2, 9)))


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_text_file_rows_are_paragraphs_with_loss_on_every_token_but_the_first(tmp_path, chat_tokenizer, tiny_words):
    rng = random.Random(1)
    paragraphs = [sentence(rng, tiny_words) + "\n" + sentence(rng, tiny_words) for _ in range(5)]
    path = tmp_path / "train.txt"
    path.write_text("\n\n".join(paragraphs) + "\n")
    data = load_examples(path, chat_tokenizer, seqlen=256)
    assert data.kind == "text" and len(data.examples) == 5
    for paragraph, example in zip(paragraphs, data.examples):
        expected = chat_tokenizer(paragraph)["input_ids"] + [chat_tokenizer.eos_token_id]
        assert example.input_ids == expected
        assert example.labels == [IGNORE] + expected[1:]


def test_long_text_is_split_into_seqlen_pieces(tmp_path, chat_tokenizer, tiny_words):
    rng = random.Random(2)
    text = " ".join(rng.choice(tiny_words) for _ in range(200))
    write_jsonl(tmp_path / "t.jsonl", [{"text": text}])
    data = load_examples(tmp_path / "t.jsonl", chat_tokenizer, seqlen=37)
    joined = [token for example in data.examples for token in example.input_ids]
    assert joined == chat_tokenizer(text)["input_ids"] + [chat_tokenizer.eos_token_id]
    assert all(len(e.input_ids) <= 37 for e in data.examples) and len(data.examples) > 2


def test_prompt_completion_csv_has_loss_on_the_completion_only(tmp_path, chat_tokenizer, tiny_words):
    rng = random.Random(3)
    pairs = [(sentence(rng, tiny_words), sentence(rng, tiny_words)) for _ in range(4)]
    path = tmp_path / "pc.csv"
    path.write_text("prompt,completion\n" + "".join(f"{p},{c}\n" for p, c in pairs))
    data = load_examples(path, chat_tokenizer, seqlen=256)
    assert data.kind == "prompt_completion"
    for (prompt, completion), example in zip(pairs, data.examples):
        prompt_ids = chat_tokenizer(prompt)["input_ids"]
        learned = [t for t in example.labels if t != IGNORE]
        assert example.input_ids[: len(prompt_ids)] == prompt_ids
        assert learned == chat_tokenizer(completion, add_special_tokens=False)["input_ids"] + [chat_tokenizer.eos_token_id]


def test_chat_parquet_learns_the_assistant_turns_only(tmp_path, chat_tokenizer, tiny_words):
    pandas = pytest.importorskip("pandas")
    rng = random.Random(4)
    conversations = []
    for _ in range(3):
        turns = [{"role": "system", "content": sentence(rng, tiny_words)}]
        for _ in range(rng.randint(1, 3)):
            turns += [{"role": "user", "content": sentence(rng, tiny_words)}, {"role": "assistant", "content": sentence(rng, tiny_words)}]
        conversations.append(turns)
    path = tmp_path / "chat.parquet"
    pandas.DataFrame({"messages": conversations}).to_parquet(path)
    data = load_examples(path, chat_tokenizer, seqlen=512)
    assert data.kind == "chat"
    for turns, example in zip(conversations, data.examples):
        full = chat_tokenizer.apply_chat_template(turns, tokenize=False)
        assert example.input_ids == chat_tokenizer(full, add_special_tokens=False)["input_ids"]
        # the learned tokens, decoded in runs, are exactly the assistant replies with their end-of-turn marks
        runs, current = [], []
        for token, label in zip(example.input_ids, example.labels):
            if label != IGNORE:
                current.append(token)
            elif current:
                runs.append(current)
                current = []
        if current:
            runs.append(current)
        replies = [t["content"] + "<|im_end|>\n" for t in turns if t["role"] == "assistant"]
        assert [chat_tokenizer.decode(run) for run in runs] == replies


@pytest.mark.parametrize("row, kind", [
    ({"anchor": "a b", "positive": "c d"}, "pairs"),
    ({"anchor": "a b", "positive": "c d", "negative": "e"}, "triplets"),
])
def test_pairs_and_triplets_are_named_and_not_trained_as_a_causal_lm(tmp_path, chat_tokenizer, row, kind):
    path = tmp_path / "pairs.json"
    path.write_text(json.dumps([row, row]))
    assert load_records(path).kind == kind
    with pytest.raises(QtoolError, match="trains sentence embeddings"):
        load_examples(path, chat_tokenizer, seqlen=64)


@pytest.mark.parametrize("lines, message", [
    (['{"text": "a"}', '{"text": "b"', '{"text": "c"}'], r"bad.jsonl: line 2 is not JSON"),
    (['{"text": "a"}', '[1, 2]'], r"bad.jsonl: line 2 is \[1, 2\] \(expected one JSON object per line\)"),
    (['{"text": "a"}', '{"text": "b"}', '{"text": ""}'], r"bad.jsonl: row 3: 'text' is \"\" \(expected a non-empty string\)"),
    (['{"prompt": "a", "completion": "b"}', '{"prompt": "a", "completion": 5}'], r"bad.jsonl: row 2: 'completion' is 5"),
    (['{"prompt": "a", "completion": "b"}', '{"prompt": "a"}'], r"bad.jsonl: row 2: no 'completion'"),
    (['{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}',
      '{"messages": [{"role": "usr", "content": "a"}, {"role": "assistant", "content": "b"}]}'], r"row 2: messages\[0\] has the role 'usr'"),
    (['{"messages": [{"role": "user", "content": "a"}]}'], r"row 1: no assistant message"),
    (['{"question": "a", "answer": "b"}'], r"row 1 has the columns \['answer', 'question'\], which name no kind of data"),
])
def test_bad_rows_name_the_file_and_row(tmp_path, chat_tokenizer, lines, message):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(QtoolError, match=message) as caught:
        load_examples(path, chat_tokenizer, seqlen=64)
    assert "\n" not in caught.value.one_line()


def test_chat_needs_a_template(tmp_path, make_tiny_tokenizer):
    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}])
    with pytest.raises(QtoolError, match="needs a tokenizer with a chat template"):
        load_examples(path, make_tiny_tokenizer(), seqlen=64)


def test_missing_files_and_unknown_types(tmp_path, chat_tokenizer):
    with pytest.raises(QtoolError, match=r"--data .*nope.jsonl: no such file"):
        load_examples(tmp_path / "nope.jsonl", chat_tokenizer, seqlen=64)
    other = tmp_path / "data.xml"
    other.write_text("<a/>")
    with pytest.raises(QtoolError, match=r"unknown file type '.xml'"):
        load_examples(other, chat_tokenizer, seqlen=64)


def test_an_uncached_hub_dataset_offline_is_one_error(monkeypatch, chat_tokenizer):
    import datasets.config

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(QtoolError, match=r"--data nosuch-owner/nosuch-data: the dataset is unavailable: it is not in the local cache"):
        load_examples("nosuch-owner/nosuch-data", chat_tokenizer, seqlen=64)


def test_truncation_counts_and_drops_examples_left_without_labels(tmp_path, chat_tokenizer, tiny_words):
    long_prompt = " ".join(tiny_words * 3)
    path = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": long_prompt, "completion": "paris"}, {"prompt": "what", "completion": "the city"}])
    data = load_examples(path, chat_tokenizer, seqlen=16)
    assert (data.truncated, data.dropped, len(data.examples)) == (1, 1, 1)
