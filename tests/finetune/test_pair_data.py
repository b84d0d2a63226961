"""Pairs and triplets from JSONL/JSON/CSV/Parquet, the Alpaca seed tasks, the held-out split, and one-line errors
naming the file and the first bad row."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qtool.core.errors import QtoolError
from qtool.finetune.pair_data import PairData, read_pairs, split_pairs

SEED_TASKS = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "alpaca-seed" / "seed_tasks.jsonl"


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_triplets_from_jsonl(tmp_path):
    rows = [{"anchor": f"a{i}", "positive": f"p{i}", "negative": f"n{i}", "extra": i} for i in range(5)]
    data = read_pairs(write_jsonl(tmp_path / "t.jsonl", rows))
    assert data.anchors == [f"a{i}" for i in range(5)] and data.positives == [f"p{i}" for i in range(5)]
    assert data.negatives == [f"n{i}" for i in range(5)] and data.has_negatives and data.groups == list(range(5))


def test_query_document_from_csv_keeps_numbers_as_text(tmp_path):
    (tmp_path / "p.csv").write_text('query,document\nhow many legs has a spider,8\n"a, quoted query","two\nlines"\n')
    data = read_pairs(tmp_path / "p.csv")
    assert data.anchors == ["how many legs has a spider", "a, quoted query"] and data.positives == ["8", "two\nlines"]
    assert data.negatives is None


def test_instruction_output_from_json_and_parquet(tmp_path):
    import pandas as pd

    rows = [{"instruction": "Translate", "input": "chat", "output": "cat"}, {"instruction": "Say hi", "input": "", "output": "hi"}]
    (tmp_path / "a.json").write_text(json.dumps(rows))
    pd.DataFrame(rows).to_parquet(tmp_path / "a.parquet")
    for name in ("a.json", "a.parquet"):
        data = read_pairs(tmp_path / name)
        assert data.anchors == ["Translate\n\nchat", "Say hi"] and data.positives == ["cat", "hi"]


def test_alpaca_seed_tasks_give_instruction_answer_pairs():
    rows = [json.loads(line) for line in SEED_TASKS.read_text().splitlines()]
    data = read_pairs(SEED_TASKS)
    instances = [(row["instruction"], instance) for row in rows for instance in row["instances"]]
    assert len(data) == len(instances) == 175
    for anchor, positive, (instruction, instance) in zip(data.anchors, data.positives, instances):
        assert anchor.startswith(instruction) and positive == instance["output"]
        assert (instance["input"] in anchor) if instance["input"] else anchor == instruction


def test_split_is_deterministic_disjoint_and_keeps_groups_together():
    data = PairData([f"a{i}" for i in range(11)], [f"p{i}" for i in range(11)], None, [0, 0, 1, 2, 2, 2, 3, 4, 5, 6, 7], "memory")
    train, held = split_pairs(data, 0.25, seed=3)
    again_train, again_held = split_pairs(data, 0.25, seed=3)
    assert (train, held) == (again_train, again_held)
    assert len(set(held.groups)) == 2 and not set(held.groups) & set(train.groups)  # round(0.25 * 8 groups)
    assert sorted(train.anchors + held.anchors) == sorted(data.anchors)
    other = [split_pairs(data, 0.25, seed=seed)[1].groups for seed in range(6)]
    assert len({tuple(groups) for groups in other}) > 1  # the seed picks the rows
    assert split_pairs(data, 0, seed=3) == (data, None)
    assert len(split_pairs(data, 0.01, seed=0)[1].groups) >= 1


def one_line(error: pytest.ExceptionInfo) -> str:
    text = error.value.one_line()
    assert "\n" not in text
    return text


@pytest.mark.parametrize("rows,fragments", [
    ([{"anchor": "a", "positive": "p"}, {"anchor": "b", "positive": ""}], ["row 2", "'positive'", "empty"]),
    ([{"anchor": "a", "positive": "p"}, {"anchor": "b"}], ["row 2", "'positive'", "empty"]),
    ([{"query": "q", "document": "d"}, {"query": "q", "document": "d"}, {"query": 7, "document": "d"}], ["row 3", "'query'", "int 7"]),
    ([{"anchor": "a", "positive": "p", "negative": "n"}, {"anchor": "a", "positive": "p", "negative": None}], ["row 2", "'negative'"]),
    ([{"question": "q", "answer": "a"}], ["question, answer", "anchor/positive", "query/document", "instruction/output"]),
    ([{"instruction": "i", "instances": [{"input": "", "output": "o"}]}, {"instruction": "j", "instances": []}], ["row 2", "'instances'"]),
])
def test_bad_rows_name_the_file_and_the_first_bad_row(tmp_path, rows, fragments):
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(QtoolError) as error:
        read_pairs(path)
    text = one_line(error)
    assert str(path) in text and all(fragment in text for fragment in fragments), text


def test_unreadable_files(tmp_path):
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"anchor": "a", "positive": "p"}\n\n{"anchor": "b", "positive": \n')
    with pytest.raises(QtoolError) as error:
        read_pairs(broken)
    assert "line 3 is not JSON" in one_line(error) and str(broken) in one_line(error)

    with pytest.raises(QtoolError) as error:
        read_pairs(tmp_path / "pairs.txt")
    assert ".jsonl, .json, .csv, .parquet" in one_line(error)
    with pytest.raises(QtoolError) as error:
        read_pairs(tmp_path / "absent.jsonl")
    assert "does not exist" in one_line(error)
    for name, text in (("empty.csv", ""), ("header.csv", "anchor,positive\n"), ("blank.jsonl", "\n  \n")):
        (tmp_path / name).write_text(text)
        with pytest.raises(QtoolError) as error:
            read_pairs(tmp_path / name)
        assert "holds no rows" in one_line(error)
