"""`pric-collector serve` on gunicorn (gthread workers), started programmatically.

The master process never serves a request: `pric-collector serve` checks everything once
in it (database, models, keys, rate-limit storage), binds the listening socket itself (so
that a taken port is a one-line error, and port 0 picks a free one), then hands that
socket to gunicorn's arbiter. Each worker process builds its own app after the fork (its
own database connections, group-commit store and limiter connection): nothing that holds
a connection or a lock crosses a fork.

Signals (gunicorn's): TERM stops gracefully (requests in flight finish, up to
--graceful-timeout), INT/QUIT stop at once, HUP reloads: new workers build the app again
(models, attestations and keys re-read), then the old ones stop gracefully; the socket
stays open throughout. A worker is recycled after --max-requests requests (plus up to
--max-requests-jitter, so that workers do not restart together).
"""

from __future__ import annotations

import logging
import os
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from gunicorn import sock as gunicorn_sock
from gunicorn.app.base import BaseApplication
from gunicorn.arbiter import Arbiter

from protocol import routes

log = logging.getLogger("collector")


@dataclass(frozen=True)
class ServerOptions:
    """gunicorn's settings that `pric-collector serve` exposes (see its flags)."""

    workers: int = 1
    threads: int = 8
    timeout_s: int = 60
    graceful_timeout_s: int = 30
    keepalive_s: int = 5
    max_requests: int = 10_000
    max_requests_jitter: int = 1_000
    quiet: bool = False

    def settings(self) -> dict[str, Any]:
        return {
            "worker_class": "gthread",
            "workers": self.workers,
            "threads": self.threads,
            "timeout": self.timeout_s,
            "graceful_timeout": self.graceful_timeout_s,
            "keepalive": self.keepalive_s,
            "max_requests": self.max_requests,
            "max_requests_jitter": self.max_requests_jitter if self.max_requests else 0,
            # request line and headers: bounded before the app sees anything
            "limit_request_line": routes.MAX_REQUEST_LINE_BYTES,
            "limit_request_fields": routes.MAX_REQUEST_HEADERS,
            "limit_request_field_size": routes.MAX_REQUEST_HEADER_BYTES,
            "preload_app": False,  # each worker builds its own app (connections never cross a fork)
            "loglevel": "warning" if self.quiet else "info",
            "accesslog": None,  # the app writes its own JSON access log (collector.access)
            "errorlog": "-",
            "proc_name": "pric-collector",
            "control_socket_disable": True,  # no extra socket in the working directory
        }


def listen(host: str, port: int, backlog: int = 2048) -> socket.socket:
    """A listening TCP socket (port 0: a free one), handed to gunicorn's workers."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return socket.create_server((host.strip("[]"), port), family=family, backlog=backlog)


class CollectorServer(BaseApplication):
    """gunicorn on an already listening socket; `factory()` builds each worker's app.

    `on_reload()` runs in the master on SIGHUP before new workers start (the start-up
    checks again, logged once rather than once per worker)."""

    def __init__(self, factory: Callable[[], Any], listener: socket.socket, options: ServerOptions,
                 on_reload: Callable[[], None] | None = None) -> None:
        self._factory = factory
        self._listener = listener
        self._options = options
        self._on_reload = on_reload
        super().__init__(prog="pric-collector")

    def load_config(self) -> None:
        host, port = self._listener.getsockname()[:2]
        for key, value in self._options.settings().items():
            if key == "control_socket_disable" and key not in self.cfg.settings:
                continue  # gunicorn before 24 has no control socket
            self.cfg.set(key, value)
        self.cfg.set("bind", [f"[{host}]:{port}" if self._listener.family == socket.AF_INET6 else f"{host}:{port}"])
        self.cfg.set("on_reload", self._reloaded)
        self.cfg.set("worker_exit", _worker_exit)

    def _reloaded(self, _arbiter: Arbiter) -> None:
        if self._on_reload is not None:
            try:
                self._on_reload()
            except Exception as exc:  # noqa: BLE001 - the old workers keep serving; the new ones will fail loudly
                print(f"pric-collector: reload check failed: {type(exc).__name__}: {str(exc).splitlines()[0]}",
                      file=sys.stderr, flush=True)

    def load(self) -> Any:
        # The master has logged what the registry refuses or allows; workers stay quiet about it.
        registry_log = logging.getLogger("collector.registry")
        level = registry_log.level
        registry_log.setLevel(logging.CRITICAL)
        try:
            return self._factory()
        finally:
            registry_log.setLevel(level)

    def run(self) -> int:
        """Serve until stopped; the arbiter's exit status (0 after TERM or INT)."""
        arbiter = Arbiter(self)
        kind = gunicorn_sock.TCP6Socket if self._listener.family == socket.AF_INET6 else gunicorn_sock.TCPSocket
        # gunicorn takes the descriptor over (and closes it); ours stays open for the caller.
        arbiter.LISTENERS = [kind(self._listener.getsockname()[:2], self.cfg, arbiter.log,
                                  fd=os.dup(self._listener.fileno()))]
        try:
            arbiter.run()
        except SystemExit as exc:
            return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        return 0


def _worker_exit(_arbiter: Arbiter, worker: Any) -> None:
    """A stopping worker closes its database connections (on SQLite: checkpoints the WAL)."""
    app = getattr(worker, "wsgi", None)
    pric = getattr(app, "extensions", {}).get("pric") if app is not None else None
    if pric is not None:
        pric.db.dispose()
