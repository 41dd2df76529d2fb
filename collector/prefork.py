"""Serve a WSGI app on waitress from one process or several forked worker processes.

One Python process runs the app's Python code on one core at a time (the GIL); forked
workers sharing one listening socket let the collector use every core. The kernel hands
each new connection to one of the workers. Each worker builds its own app after the fork
(its own database connections and threads). Workers die with the parent (Linux
PR_SET_PDEATHSIG, and a watchdog thread elsewhere), the parent forwards SIGTERM/SIGINT
and restarts a worker that exits, unless they keep dying.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable

RESTART_WINDOW_S = 10.0
MAX_RESTARTS_IN_WINDOW = 5


def listen(host: str, port: int, backlog: int = 1024) -> socket.socket:
    """A listening TCP socket (port 0: a free one), inherited by forked workers."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return socket.create_server((host, port), family=family, backlog=backlog)


def _guarded_channel():
    """waitress's HTTP channel whose parser answers 400 to a Content-Length over Python's
    4,300-digit limit for int(): waitress 3.0.2 checks it is all digits, then int() raises a
    ValueError it does not catch, and the connection was closed without an answer."""
    from waitress.channel import HTTPChannel
    from waitress.parser import HTTPRequestParser, ParsingError

    class Parser(HTTPRequestParser):
        def parse_header(self, header_plus):  # noqa: ANN001, ANN201 - waitress's signature
            try:
                return super().parse_header(header_plus)
            except ValueError:
                raise ParsingError("Content-Length is invalid") from None

    class Channel(HTTPChannel):
        parser_class = Parser

    return Channel


def serve_socket(app, sock: socket.socket, threads: int, **waitress_kw) -> None:
    """Run waitress on an already listening socket until stopped."""
    import waitress

    server = waitress.create_server(app, sockets=[sock], threads=threads, **waitress_kw)
    server.channel_class = _guarded_channel()
    try:
        server.run()
    except KeyboardInterrupt:
        pass
    finally:
        server.close()


def _die_with_parent(parent: int) -> None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass

    def watch() -> None:
        while True:
            if os.getppid() != parent:
                os._exit(0)
            time.sleep(0.5)

    if os.getppid() != parent:
        os._exit(0)
    threading.Thread(target=watch, daemon=True, name="parent-watchdog").start()


def run_workers(work: Callable[[], None], workers: int) -> int:
    """Fork `workers` processes each running `work()`; supervise them until SIGTERM/SIGINT.

    Returns the exit status for the parent: 0 when stopped by a signal, 1 when workers kept
    dying (more than MAX_RESTARTS_IN_WINDOW exits within RESTART_WINDOW_S)."""
    parent = os.getpid()
    children: dict[int, int] = {}
    stopping = False

    def spawn(slot: int) -> None:
        pid = os.fork()
        if pid == 0:  # worker
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides
            code = 0
            try:
                _die_with_parent(parent)
                work()
            except BaseException:  # noqa: BLE001 - report and leave with a failure status
                import traceback

                traceback.print_exc()
                code = 1
            finally:
                sys.stderr.flush()
                os._exit(code)
        children[pid] = slot

    def stop(_signum=None, _frame=None) -> None:
        nonlocal stopping
        stopping = True
        for pid in list(children):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    for slot in range(workers):
        spawn(slot)
    exits: list[float] = []
    status = 0
    while children:
        try:
            pid, _ = os.wait()
        except ChildProcessError:
            break
        except InterruptedError:
            continue
        slot = children.pop(pid, None)
        if slot is None or stopping:
            continue
        now = time.monotonic()
        exits = [t for t in exits if now - t < RESTART_WINDOW_S] + [now]
        if len(exits) > MAX_RESTARTS_IN_WINDOW:
            print(f"pric-collector: workers exited {len(exits)} times in {RESTART_WINDOW_S:g} s; stopping",
                  file=sys.stderr, flush=True)
            status = 1
            stop()
            continue
        print(f"pric-collector: worker {pid} exited; starting another", file=sys.stderr, flush=True)
        spawn(slot)
    return status
