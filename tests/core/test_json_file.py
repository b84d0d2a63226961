"""core/json_file.py: every way a JSON file can fail is one QtoolError naming the file, with the caller's fix."""

from __future__ import annotations

import pytest

from qtool.core.errors import QtoolError
from qtool.core.json_file import read_json_file


def test_reads_an_object(tmp_path):
    path = tmp_path / "config.json"
    path.write_text('{"a": 1}')
    assert read_json_file(path, "fix it") == {"a": 1}


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "{path} is missing"),
        ('{"a": 1,', "{path} is not valid JSON: Expecting property name enclosed in double quotes at line 1 column 9"),
        ("[1, 2]", "{path} must hold a JSON object, not a list"),
        (b"\xff\xfe{}", "{path} cannot be read: "),
    ],
    ids=["missing", "invalid", "list", "not-utf8"],
)
def test_each_failure_is_one_error_naming_the_file(tmp_path, content, message):
    path = tmp_path / "config.json"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    with pytest.raises(QtoolError) as caught:
        read_json_file(path, "restore it")
    assert caught.value.message.startswith(message.format(path=path))
    assert caught.value.hint == "restore it"


def test_a_directory_is_unreadable(tmp_path):
    with pytest.raises(QtoolError, match="cannot be read"):
        read_json_file(tmp_path, "restore it")
