"""validate/dispatch.py: a directory that holds no model is refused with exit 2 and a hint that names what it
does hold."""

from __future__ import annotations

import pytest

from qtool.core.errors import QtoolError
from qtool.validate.dispatch import validate_path


def test_not_a_model_raises_exit_2(tmp_path):
    (tmp_path / "x.gguf").write_bytes(b"GGUF")
    with pytest.raises(QtoolError) as raised:
        validate_path(tmp_path)
    assert raised.value.exit_code == 2
    assert raised.value.hint == "x.gguf is a GGUF file: qtool validate checks safetensors checkpoints"
