"""Serving the viewer with uvicorn: loopback by default, a fresh token per start, a printed link."""

from __future__ import annotations

import errno
import ipaddress
import logging
import secrets
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from mil.view.app import create_app
from mil.view.data import ViewerData

logger = logging.getLogger(__name__)

DEFAULT_PORT = 8765
LOOPBACK = "127.0.0.1"


class ViewerStartError(ValueError):
    """The server cannot listen where asked; the message says what to change."""


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port`` (port 0: any free port); busy ports get a clear error."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # accepted connections inherit it
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise ViewerStartError(f"port {port} on {host} is in use (another `mil view`?): "
                                   "pass --port N, or --port 0 for any free port") from None
        raise ViewerStartError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.listen(128)
    return sock


@dataclass
class Viewer:
    """A running (or ready) viewer: ``url`` is the link to open, token included."""

    data: ViewerData
    host: str = LOOPBACK
    port: int = DEFAULT_PORT
    token: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    _sock: socket.socket | None = None
    _server: object | None = None
    _thread: threading.Thread | None = None

    def __post_init__(self) -> None:
        self._sock = bind(self.host, self.port)
        self.port = self._sock.getsockname()[1]

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        if host in ("0.0.0.0", "[::]"):
            host = socket.gethostname()
        return f"http://{host}:{self.port}/?token={self.token}"

    def _uvicorn(self):
        import uvicorn

        config = uvicorn.Config(create_app(self.data, self.token), log_level="warning", access_log=False,
                                timeout_graceful_shutdown=2)
        return uvicorn.Server(config)

    def serve_forever(self) -> None:
        """Serve until Ctrl-C (uvicorn handles the signal)."""
        self._server = self._uvicorn()
        try:
            self._server.run(sockets=[self._sock])
        finally:
            self.data.close()

    def start(self) -> Viewer:
        """Serve from a background thread (tests, notebooks); returns once the server accepts requests."""
        self._server = self._uvicorn()
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._sock]}, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise ViewerStartError("the viewer's server did not start; see the log")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self._sock is not None:
            self._sock.close()
        self.data.close()


def open_viewer(run_dir: str | Path, overrides: list[str], host: str = LOOPBACK, port: int = DEFAULT_PORT,
                predictions: str | Path | None = None, top_k: int = 12) -> Viewer:
    """Load the run and its cohort and bind the port; call ``serve_forever()`` or ``start()`` next.

    ``overrides`` (YAML files or ``key=value``) are merged over the run's config, as for
    ``mil heatmap`` (``slides.dir=...``, ``cohort.*`` for another cohort). ``predictions``: a
    ``predictions.csv`` to show (default: the run's own when the cohort is the run's).
    Raises FileNotFoundError for a folder that is not a finished run, and
    :class:`ViewerStartError` when the port cannot be bound.
    """
    if not is_loopback(host):
        logger.warning("serving on %s: anyone who can reach this host and has the link can see the slides; "
                       "prefer the default 127.0.0.1 with an SSH tunnel", host)
    data = ViewerData(run_dir, overrides, predictions=predictions, top_k=top_k)
    return Viewer(data, host=host, port=port)
