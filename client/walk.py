"""Which files the client reads: the given files, and every regular file under the given
folders (recursively, in sorted order). Symbolic links are resolved and followed only
when their target lies inside one of the given paths; links pointing elsewhere, broken
links, and special files (FIFOs, devices, sockets) are reported and skipped. Each real
file is yielded once even when reachable by several paths.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

SkipFn = Callable[[str, str], None]
"""on_skip(path, reason): called once for each entry that is not read."""


def _inside(path: Path, roots: list[Path]) -> bool:
    return any(path == r or r in path.parents for r in roots)


def _link_target(link: Path, roots: list[Path], on_skip: SkipFn) -> Path | None:
    """The target of a symbolic link if it exists inside the given paths, else report it."""
    try:
        target = link.resolve(strict=True)
    except (OSError, RuntimeError):
        on_skip(str(link), "broken symbolic link")
        return None
    if not _inside(target, roots):
        on_skip(str(link), "symbolic link points outside the given paths; not followed")
        return None
    return target


def iter_files(paths: Iterable[str | Path], on_skip: SkipFn) -> Iterator[Path]:
    """Yield the real paths of the regular files to read, in a stable order."""
    given = [Path(p) for p in paths]
    roots: list[Path] = []
    for p in given:
        try:
            roots.append(p.resolve(strict=True))
        except (OSError, RuntimeError):
            continue
    seen: set[Path] = set()

    def accept(real: Path, shown: str) -> Iterator[Path]:
        try:
            mode = real.stat().st_mode
        except OSError as exc:
            on_skip(shown, f"cannot read file ({exc.strerror or exc})")
            return
        if not stat.S_ISREG(mode):
            on_skip(shown, "not a regular file")
            return
        if real not in seen:
            seen.add(real)
            yield real

    for p in given:
        shown = str(p)
        try:
            real = p.resolve(strict=True)
        except FileNotFoundError:
            on_skip(shown, "broken symbolic link" if p.is_symlink() else "no such file or folder")
            continue
        except (OSError, RuntimeError) as exc:
            on_skip(shown, f"cannot resolve path ({exc})")
            continue
        if real.is_dir():
            yield from _walk_dir(real, roots, accept, on_skip)
        else:
            yield from accept(real, shown)


def _walk_dir(
    top: Path, roots: list[Path], accept: Callable[[Path, str], Iterator[Path]], on_skip: SkipFn
) -> Iterator[Path]:
    def onerror(exc: OSError) -> None:
        on_skip(str(exc.filename), f"cannot list folder ({exc.strerror or exc})")

    for dirpath, dirnames, filenames in os.walk(top, followlinks=False, onerror=onerror):
        dirnames.sort()
        here = Path(dirpath)
        # symlinked sub-folders are listed in dirnames but not entered (followlinks=False)
        for d in dirnames:
            link = here / d
            if link.is_symlink():
                # reported if broken or outside; a link to a folder inside the given
                # paths is walked there already
                _link_target(link, roots, on_skip)
        for name in sorted(filenames):
            path = here / name
            if path.is_symlink():
                target = _link_target(path, roots, on_skip)
                if target is not None:
                    yield from accept(target, str(path))
            else:
                yield from accept(path, str(path))
