"""Start `pric-collector serve` (or another server printing the same line) as a child
process on a free loopback port; used by the durability test and the benchmarks."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

SERVING_RE = re.compile(r"serving on (http://127\.0\.0\.1:\d+)")


def start_process(argv: Sequence[str], timeout_s: float = 60.0,
                  new_session: bool = False) -> tuple[subprocess.Popen, str]:
    """Run `argv`, wait for its 'serving on http://127.0.0.1:PORT' line: (process, base URL).
    `new_session`: the server and its workers in a process group of their own (os.killpg)."""
    proc = subprocess.Popen(list(argv), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            start_new_session=new_session)
    deadline = time.monotonic() + timeout_s
    line = ""
    while time.monotonic() < deadline:
        line = proc.stdout.readline()  # type: ignore[union-attr]
        if m := SERVING_RE.search(line):
            return proc, m.group(1)
        if proc.poll() is not None:
            break
    proc.kill()
    proc.wait(timeout=10)
    raise RuntimeError(f"server did not start (last line {line.strip()!r})")


def start_collector(data_dir: str | Path, models_dir: str | Path, *extra: str,
                    threads: int = 4) -> tuple[subprocess.Popen, str]:
    """`pric-collector serve` on 127.0.0.1, a free port, quiet logs."""
    return start_process([
        sys.executable, "-m", "collector.cli", "serve", "--data-dir", str(data_dir), "--models-dir", str(models_dir),
        "--host", "127.0.0.1", "--port", "0", "--quiet", "--threads", str(threads), *extra,
    ])


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
