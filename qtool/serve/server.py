"""Running the app under uvicorn with a graceful end: Ctrl-C or SIGTERM marks the server as draining (new requests
get 503, /health says so), uvicorn stops listening and waits for the requests in flight (up to drain_timeout_s),
then the app's lifespan stops the engines' threads."""

from __future__ import annotations

import logging
from typing import Any

import uvicorn
from fastapi import FastAPI

from qtool.serve.settings import ServeSettings

logger = logging.getLogger(__name__)


class DrainingServer(uvicorn.Server):
    """uvicorn's server whose exit signal first marks the app as draining."""

    def __init__(self, app: FastAPI, config: uvicorn.Config):
        super().__init__(config)
        self.qtool_app = app

    def handle_exit(self, sig: int, frame: Any) -> None:
        state = self.qtool_app.state.server
        if not state.draining:
            state.draining = True
            logger.warning("draining: %d request(s) in flight; new requests get 503", state.in_flight)
        super().handle_exit(sig, frame)  # a second Ctrl-C forces the exit
        # the drain answers the signal: uvicorn would raise it again once it returns (a KeyboardInterrupt, or death
        # by SIGTERM), and a drained server exits 0
        self._captured_signals.clear()

    @property
    def port(self) -> int:
        """The port it listens on (after start-up; port 0 asks for any free one)."""
        return self.servers[0].sockets[0].getsockname()[1]


def build_server(app: FastAPI, settings: ServeSettings, log_level: str = "info") -> DrainingServer:
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=log_level, lifespan="on",
                            timeout_graceful_shutdown=settings.drain_timeout_s, access_log=False)
    return DrainingServer(app, config)


def run_server(app: FastAPI, settings: ServeSettings) -> None:
    """Serve until Ctrl-C / SIGTERM, then drain and return."""
    settings.check()
    build_server(app, settings).run()
