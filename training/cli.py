"""pric-train: the model builder's training command.

    pric-train features --data DIR --private Male --primary Smiling --out RUN [...]   # PRIC extractor
    pric-train sparse   --data DIR --L 8 --m 256 --k 24 --out RUN [...]               # sparse autoencoder
    pric-train check    RUN                                                           # fresh-attacker check of a run

`pric-train --help` lists the commands; `pric-train features --help` and `pric-train
sparse --help` their flags. Without a command the flags of earlier releases still work:
`pric-train --data ...` trains features and `pric-train --mode sparse ...` the sparse
autoencoder.

Exit codes: 0 ok, 2 bad argument or input, 1 other errors.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

COMMANDS = ("features", "sparse", "check")


def _runner(command: str) -> Callable[[Sequence[str]], int]:
    # imported on use: each trainer imports torch and its own modules
    if command == "features":
        from training.train import main as run
    elif command == "check":
        from training.check import main as run
    else:
        from training.sparse.train import main as run
    return run


def _legacy_command(argv: Sequence[str]) -> str:
    """The command that an argv without one means: `--mode sparse` (in either spelling)
    selects the sparse trainer, anything else the features trainer."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--mode", choices=("pric", "features", "sparse"), default="features")
    known, _ = p.parse_known_args(argv)
    return "sparse" if known.mode == "sparse" else "features"


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in COMMANDS:
        return _runner(argv[0])(argv[1:])
    if argv in ([], ["-h"], ["--help"]):
        print(__doc__.strip())
        return 0 if argv else 2
    try:
        command = _legacy_command(argv)
    except SystemExit as exc:  # argparse already printed the one-line reason
        return int(exc.code or 2)
    return _runner(command)(argv)


if __name__ == "__main__":
    raise SystemExit(main())
