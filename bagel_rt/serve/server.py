"""Running the API with uvicorn, with a graceful stop.

On SIGTERM or Ctrl-C the engine stops taking requests (503) at once, uvicorn stops accepting connections and
waits up to ``grace_s`` seconds for the requests in flight — queued ones included, the engine keeps working
through its queue — then the app's shutdown rejects what still waits and stops the running batch.
"""

from __future__ import annotations

import socket

import uvicorn

from .engine import Engine


class GracefulServer(uvicorn.Server):
    """uvicorn's server whose exit signal first closes the engine's intake (and is not re-raised afterwards,
    so a graceful stop exits with status 0)."""

    def __init__(self, config: uvicorn.Config, engine: Engine):
        super().__init__(config)
        self.engine = engine

    def handle_exit(self, sig, frame) -> None:
        self.engine.close()
        if self.should_exit:  # a second signal: stop now, without waiting for requests in flight
            self.force_exit = True
        self.should_exit = True


def make_server(app, engine: Engine, host: str, port: int, grace_s: float = 30.0,
                log_level: str = "info") -> GracefulServer:
    """A server for ``app`` on ``host:port`` (not started: call ``run()``)."""
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=grace_s,
                            access_log=log_level == "debug", lifespan="on")
    return GracefulServer(config, engine)


def bound_socket(host: str, port: int) -> socket.socket:
    """A listening-ready TCP socket on ``host:port`` (port 0: a free one), with SO_REUSEADDR so a restarted
    server can bind the port of one that was killed."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    return sock
