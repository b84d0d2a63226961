"""Pairs and triplets for contrastive training, read through `datasets` from JSONL/JSON/CSV/Parquet: columns
anchor/positive[/negative], query/document[/negative], or instruction[/input]/output; the Alpaca seed-task layout
(instruction + instances of input/output) gives instruction -> answer pairs. And the held-out split, drawn the
same way for the same seed."""

from __future__ import annotations

import csv
import json
import random
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qtool.core.errors import QtoolError

DATA_SUFFIXES = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
# (anchor column, positive column); each layout may add a `negative` column (hard negatives, triplets).
PAIR_LAYOUTS = (("anchor", "positive"), ("query", "document"), ("instruction", "output"))
SEED_TASK_COLUMNS = ("instruction", "instances")


@dataclass(frozen=True)
class PairData:
    """Parallel lists: anchors[i] should retrieve positives[i]; negatives[i] (when given) should not. `groups[i]`
    names the source row, so that the pairs of one row (a seed task's instances) fall on one side of a split."""

    anchors: list[str]
    positives: list[str]
    negatives: list[str] | None
    groups: list[int]
    source: str

    def __len__(self) -> int:
        return len(self.anchors)

    @property
    def has_negatives(self) -> bool:
        return self.negatives is not None

    def subset(self, indices: list[int]) -> PairData:
        pick = lambda values: [values[i] for i in indices]  # noqa: E731
        return PairData(pick(self.anchors), pick(self.positives), pick(self.negatives) if self.negatives is not None else None,
                        pick(self.groups), self.source)


def read_pairs(path: str | Path) -> PairData:
    """The pairs (or triplets) in a data file; a one-line QtoolError naming the file and the first bad row."""
    path = Path(path).expanduser()
    builder = DATA_SUFFIXES.get(path.suffix.lower())
    if builder is None:
        raise QtoolError(f"pair data {path}: unknown file type {path.suffix or '(none)'!r}", f"give a {', '.join(DATA_SUFFIXES)} file")
    if not path.is_file():
        raise QtoolError(f"pair data {path} does not exist", "give a JSONL, JSON, CSV or Parquet file of pairs or triplets")
    rows, columns = _load_rows(path, builder) if _has_rows(path, builder) else ([], [])
    if not rows:
        raise QtoolError(f"pair data {path} holds no rows", "give at least two pairs")
    if all(column in columns for column in SEED_TASK_COLUMNS):
        return _seed_task_pairs(path, rows)
    for anchor_column, positive_column in PAIR_LAYOUTS:
        if anchor_column in columns and positive_column in columns:
            return _column_pairs(path, rows, anchor_column, positive_column, "negative" if "negative" in columns else None)
    layouts = "; ".join("/".join(layout) + "[/negative]" for layout in PAIR_LAYOUTS)
    raise QtoolError(f"pair data {path}: columns {', '.join(columns) or '(none)'} name no pairs",
                     f"give columns {layouts}, or Alpaca seed tasks (instruction, instances)")


def split_pairs(data: PairData, eval_fraction: float, seed: int) -> tuple[PairData, PairData | None]:
    """(train, held-out): a seeded shuffle of the source rows, the first round(fraction * rows) held out (at
    least one when the fraction is above 0); None held out for fraction 0. The same data and seed give the same
    split on any machine (Python's Mersenne Twister, no torch)."""
    if not 0 <= eval_fraction < 1:
        raise QtoolError(f"--eval-fraction {eval_fraction} is out of range", "give a fraction in [0, 1), e.g. 0.2")
    if eval_fraction == 0:
        return data, None
    groups = sorted(set(data.groups))
    random.Random(seed).shuffle(groups)
    held = set(groups[: max(1, round(eval_fraction * len(groups)))])
    train = [i for i, group in enumerate(data.groups) if group not in held]
    held_out = [i for i, group in enumerate(data.groups) if group in held]
    if len(train) < 2:
        raise QtoolError(f"--eval-fraction {eval_fraction} leaves {len(train)} training pair(s) of {len(data)} in {data.source}",
                         "give more pairs or a smaller --eval-fraction (in-batch negatives need at least 2)")
    return data.subset(train), data.subset(held_out)


def _load_rows(path: Path, builder: str) -> tuple[list[dict[str, Any]], list[str]]:
    import datasets

    datasets.disable_progress_bars()
    options: dict[str, Any] = {}
    if builder == "csv":
        # every column as text: a CSV answer "42" is a string, not an int the pair check would refuse
        header = _csv_header(path)
        options["features"] = datasets.Features({name: datasets.Value("string") for name in header})
    # a throwaway cache: the files are small, and a cache keyed on path + mtime would outlive edits made within a second
    with tempfile.TemporaryDirectory(prefix="qtool-pairs-") as cache:
        try:
            table = datasets.load_dataset(builder, data_files=str(path), split="train", cache_dir=cache, keep_in_memory=True, **options)
        except Exception as exc:  # datasets wraps pyarrow's and pandas' parse errors in its own types
            raise QtoolError(f"pair data {path}: {_parse_problem(path, builder, exc)}", f"give valid {builder.upper()} rows of pairs or triplets") from exc
    return table.to_list(), list(table.column_names)


def _has_rows(path: Path, builder: str) -> bool:
    """False for a text file with nothing past its (CSV) header, which `datasets` refuses with a puzzling error."""
    if builder == "parquet":
        return True
    with open(path, newline="", encoding="utf-8", errors="replace") as handle:
        if builder == "csv":
            rows = csv.reader(handle)
            return next(rows, None) is not None and next(rows, None) is not None
        return any(line.strip() for line in handle)


def _csv_header(path: Path) -> list[str]:
    with open(path, newline="", encoding="utf-8") as handle:
        header = next(csv.reader(handle), [])
    if not header:
        raise QtoolError(f"pair data {path} has no header row", "give a CSV whose first row names the columns, e.g. anchor,positive")
    return header


def _parse_problem(path: Path, builder: str, exc: Exception) -> str:
    """What is wrong with an unreadable file, at its first bad line when it is JSON Lines."""
    if builder == "json" and path.suffix.lower() == ".jsonl":
        with open(path, encoding="utf-8", errors="replace") as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as error:
                    return f"line {number} is not JSON ({error.msg})"
                if not isinstance(row, dict):
                    return f"line {number} is not a JSON object"
    cause = exc.__cause__ or exc
    text = str(cause).strip().splitlines()
    return f"cannot read the file ({text[0] if text else type(cause).__name__})"


def _text(path: Path, row: int, column: str, value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        found = "empty" if value is None or value == "" else f"{type(value).__name__} {value!r}"[:60]
        raise QtoolError(f"pair data {path}: row {row} column {column!r} is {found}", "every anchor, positive and negative must be non-empty text")
    return value


def _column_pairs(path: Path, rows: list[dict[str, Any]], anchor_column: str, positive_column: str, negative_column: str | None) -> PairData:
    anchors, positives, negatives = [], [], []
    for number, row in enumerate(rows, start=1):
        anchor = _text(path, number, anchor_column, row.get(anchor_column))
        if anchor_column == "instruction" and isinstance(row.get("input"), str) and row["input"].strip():
            anchor = f"{anchor}\n\n{row['input']}"  # the answer answers the instruction applied to its input
        anchors.append(anchor)
        positives.append(_text(path, number, positive_column, row.get(positive_column)))
        if negative_column is not None:
            negatives.append(_text(path, number, negative_column, row.get(negative_column)))
    return PairData(anchors, positives, negatives if negative_column is not None else None, list(range(len(rows))), str(path))


def _seed_task_pairs(path: Path, rows: list[dict[str, Any]]) -> PairData:
    """One pair per instance: the instruction (with the instance's input, when it has one) -> its output."""
    anchors, positives, groups = [], [], []
    for number, row in enumerate(rows, start=1):
        instruction = _text(path, number, "instruction", row.get("instruction"))
        instances = row.get("instances")
        if not isinstance(instances, list) or not instances:
            raise QtoolError(f"pair data {path}: row {number} column 'instances' is not a list of input/output objects", "give each seed task at least one instance")
        for instance in instances:
            if not isinstance(instance, dict):
                raise QtoolError(f"pair data {path}: row {number} has an instance that is not an object", "give instances as {\"input\": ..., \"output\": ...}")
            given = instance.get("input")
            anchors.append(f"{instruction}\n\n{given}" if isinstance(given, str) and given.strip() else instruction)
            positives.append(_text(path, number, "instances.output", instance.get("output")))
            groups.append(number - 1)
    return PairData(anchors, positives, None, groups, str(path))
