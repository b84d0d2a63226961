"""Fixtures of the server tests: a tiny random Llama with the tiny ChatML tokenizer served by uvicorn on a free
loopback port in a background thread (the real HTTP path: streaming, disconnects, draining), one torch thread."""

from __future__ import annotations

import importlib.util
import threading
import time
from pathlib import Path

import pytest
import torch

from qtool.runtime.engine import EngineConfig
from qtool.serve.app import create_app
from qtool.serve.model_pool import ServedModel
from qtool.serve.server import build_server
from qtool.serve.settings import ServeSettings

API_KEY = "test-key-123"
SMALL_ENGINE = EngineConfig(num_blocks=256, max_num_seqs=16, max_num_batched_tokens=512)


class RunningServer:
    """uvicorn serving `app` in a thread; `url` once started; stop() drains it as Ctrl-C would."""

    def __init__(self, app, settings: ServeSettings):
        self.app = app
        self.server = build_server(app, settings, log_level="warning")
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def start(self) -> "RunningServer":
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{self.server.port}"
        return self

    def stop(self) -> None:
        self.server.handle_exit(2, None)  # what SIGINT does
        self.thread.join(30)


def _tests_conftest():
    # tests/conftest.py by path (--import-mode=importlib gives conftest files no importable name), for its
    # build_tiny_llama in module-scoped fixtures
    spec = importlib.util.spec_from_file_location("qtool_tests_root_conftest", Path(__file__).parents[1] / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def served_tiny(name: str, make_tiny_tokenizer, tiny_chat_template, seed: int = 0, engine=SMALL_ENGINE, **overrides):
    model = _tests_conftest().build_tiny_llama(seed=seed, **overrides)
    tokenizer = make_tiny_tokenizer(chat_template=tiny_chat_template)
    return ServedModel(name, model, tokenizer, engine)


@pytest.fixture(scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def make_served(make_tiny_tokenizer, tiny_chat_template):
    """make_served(name, seed=0, engine=SMALL_ENGINE, **config overrides) -> a ServedModel of a tiny random Llama."""
    def make(name: str, seed: int = 0, engine: EngineConfig = SMALL_ENGINE, **overrides) -> ServedModel:
        return served_tiny(name, make_tiny_tokenizer, tiny_chat_template, seed, engine, **overrides)
    return make


@pytest.fixture(scope="module")
def start_server():
    """start_server(models, settings) -> a RunningServer; every one started is stopped at the module's end."""
    started = []

    def start(models, settings: ServeSettings = ServeSettings(port=0)) -> RunningServer:
        server = RunningServer(create_app(models, settings), settings).start()
        started.append(server)
        return server

    yield start
    for server in started:
        if server.thread.is_alive():
            server.stop()
