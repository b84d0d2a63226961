"""`qtool serve`: unsafe or contradictory flags are refused in one line before any model loads; a real server
started as a process answers the openai client and exits 0 after draining on Ctrl-C (SIGINT) or SIGTERM."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import openai
import pytest
from typer.testing import CliRunner

from cli_checks import one_line_error, save_model_dir
from qtool.cli.main import app

REPO = Path(__file__).resolve().parents[2]


def test_other_hosts_need_an_api_key(tmp_path):
    result = CliRunner().invoke(app, ["serve", str(tmp_path / "absent"), "--host", "0.0.0.0"], env={"QTOOL_API_KEY": ""})
    line = one_line_error(result)
    assert "--host 0.0.0.0" in line and "--api-key" in line


def test_api_key_from_the_environment_is_taken(tmp_path):
    # with the key from QTOOL_API_KEY the host is accepted: what fails next is the missing model
    result = CliRunner().invoke(app, ["serve", str(tmp_path / "absent"), "--host", "0.0.0.0", "--device", "cpu"],
                                env={"QTOOL_API_KEY": "k"})
    line = one_line_error(result)
    assert "absent" in line and "--api-key" not in line


def test_one_name_per_model(tmp_path):
    result = CliRunner().invoke(app, ["serve", "a", "b", "--name", "x", "--device", "cpu"])
    line = one_line_error(result)
    assert "1 --name for 2 models" in line


def test_the_same_name_twice_is_refused():
    result = CliRunner().invoke(app, ["serve", "a", "b", "--name", "x", "--name", "x", "--device", "cpu"])
    assert "'x' is given twice" in one_line_error(result)


@pytest.mark.parametrize("stop_signal", [signal.SIGINT, pytest.param(signal.SIGTERM, marks=pytest.mark.slow)])
def test_serve_answers_then_drains_and_exits(tmp_path, make_tiny_llama, make_tiny_tokenizer, tiny_chat_template,
                                             stop_signal):
    model_dir = save_model_dir(tmp_path / "tiny", make_tiny_llama(), make_tiny_tokenizer(chat_template=tiny_chat_template))
    env = {**os.environ, "PYTHONPATH": str(REPO), "QTOOL_API_KEY": "k-1"}
    process = subprocess.Popen([sys.executable, "-m", "qtool", "serve", str(model_dir), "--name", "tiny", "--port", "0",
                                "--device", "cpu", "--cache-blocks", "64", "--max-batch", "4"],
                               env=env, stderr=subprocess.PIPE, text=True)
    try:
        seen, port = [], None
        deadline = time.monotonic() + 120
        while port is None and time.monotonic() < deadline:
            line = process.stderr.readline()
            assert line, "".join(seen)
            seen.append(line)
            found = re.search(r"Uvicorn running on http://127\.0\.0\.1:(\d+)", line)
            port = int(found.group(1)) if found else None
        assert port, "".join(seen)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k-1", max_retries=0)
        reply = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                               max_tokens=4, temperature=0)
        assert reply.usage.completion_tokens <= 4 and reply.choices[0].message.role == "assistant"
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="wrong", max_retries=0).models.list()
        process.send_signal(stop_signal)
        assert process.wait(60) == 0
        rest = process.stderr.read()
        assert "Traceback" not in rest and "draining" in rest
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
