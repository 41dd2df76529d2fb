"""Client throughput with face detection and alignment, ratios measured in one run.

    python benchmarks/faces.py --model-dir MODEL_WITH_ALIGNMENT [--n 20] [--thumbs 200]

1. 12-MP photos (4000x3000 JPEGs, a face of 445x545 px and one of 142x174 px pasted on a
   blurred photo): the client's pipeline with detection (Extractor.stream, one thread)
   vs decoding alone: photos/s and the ratio, against a full-resolution decode and against
   the reduced-scale (draft) decode the client starts with. Goal: >= 0.5 of decode alone.
   Then the same photos with the smaller face at 267x327 px ("12mp_large_faces"), which
   the 1/2 decode holds at the model's resolution: no full decode.
2. Thumbnails (356x436 scenes of research/scenes.py's kind): the pipeline with detection vs
   decode + resize (what a card without alignment does per photo). Goal: >= 0.5. Beside it,
   the same pipeline and model without detection (the card's alignment section removed:
   the fixed box of an unaligned card) against the same decode + resize: the most any
   detector could reach, since the pipeline without one already runs the model and the
   upload's bookkeeping on top of decode + resize.
CPU seconds per photo of each (process time: steadier than wall time on a shared machine),
and where the pipeline's CPU goes: the detector's three networks (calls and crops per
photo), the crops cut for R- and O-Net, and the rest (decode, pyramid resizes, NMS, warp,
the model).

    python benchmarks/faces.py --model-dir MODEL_WITH_ALIGNMENT --memory 2000 [--checkpoints 100,500,1000,2000]

3. Memory: N photos of mixed kinds (per 20: one 12-MP photo with two faces, three 2-MP
   photos with one, one without a face, fifteen 356x436 scenes), each written into a
   temporary folder just before the pipeline reads it and removed after, streamed through
   Extractor.stream with detection; the process's peak RSS (VmHWM) and RSS at each
   checkpoint, one JSON line each. Flat: the client holds one batch, not the photos seen.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from client.models import open_model_dir  # noqa: E402
from client.pipeline import Extractor  # noqa: E402
from protocol.preprocess import load_image, prepare  # noqa: E402


def photo(face: Image.Image, bg: Image.Image, size: tuple[int, int], faces: list[tuple[float, tuple[int, int]]],
          quality: int = 90) -> bytes:
    img = bg.resize(size, Image.Resampling.BILINEAR).filter(ImageFilter.GaussianBlur(4))
    for scale, at in faces:
        img.paste(face.resize((round(face.width * scale), round(face.height * scale)), Image.Resampling.BICUBIC), at)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def timed(fn) -> tuple[float, float]:
    w, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w, time.process_time() - c


class StageClock:
    """CPU time and inputs of each detector stage, by wrapping the detector's callables."""

    def __init__(self, detector) -> None:
        import protocol.faces as faces

        self.ms: dict[str, float] = {}
        self.items: dict[str, int] = {}
        for net in ("pnet", "rnet", "onet"):
            setattr(detector, net, self._wrap(net, getattr(detector, net)))
        faces.crops = self._wrap("crops", faces.crops)

    def _wrap(self, name: str, fn):
        def timed_call(*args):
            c = time.process_time()
            out = fn(*args)
            self.ms[name] = self.ms.get(name, 0.0) + 1e3 * (time.process_time() - c)
            self.items[name] = self.items.get(name, 0) + (len(args[0]) if name != "crops" else len(args[1]))
            return out
        return timed_call

    def reset(self) -> None:
        self.ms.clear()
        self.items.clear()

    def per_photo(self, n: int) -> dict[str, dict[str, float]]:
        return {k: {"cpu_ms": self.ms[k] / n, "inputs": self.items[k] / n} for k in self.ms}


def rss_mib() -> tuple[float, float]:
    """(peak RSS, RSS) of this process, MiB (VmHWM and VmRSS: Linux)."""
    status = Path("/proc/self/status").read_text()
    hwm, rss = (int(re.search(rf"{k}:\s+(\d+)", status).group(1)) for k in ("VmHWM", "VmRSS"))
    return hwm / 1024, rss / 1024


def mixed_photos(folder: Path, n: int, seed: int = 0) -> Iterator[Path]:
    """n photos of mixed kinds (see the module's 3.), each written just before it is
    yielded; the one before is removed then (the pipeline has read it by the time it asks
    for the next), the last when the caller is done. The blurred backgrounds are made
    here, before the first photo (blurring 12 MP costs more than the pipeline): their
    ~130 MiB are part of every RSS figure, the "photos": 0 line."""
    samples = sorted((REPO / "scripts" / "sample_faces" / "images").glob("*.jpg"))
    faces = [Image.open(p).convert("RGB") for p in samples]
    backs = {size: [faces[j].resize(size, Image.Resampling.BILINEAR).filter(ImageFilter.GaussianBlur(4))
                    for j in range(3)] for size in ((4000, 3000), (1600, 1200), (356, 436))}
    return _write_photos(folder, n, faces, backs, np.random.default_rng(seed))


def _write_photos(folder: Path, n: int, faces: list[Image.Image], backs: dict[tuple[int, int], list[Image.Image]],
                  rng: np.random.Generator) -> Iterator[Path]:
    prev: Path | None = None
    try:
        for i in range(n):
            kind = i % 20
            face = faces[int(rng.integers(len(faces)))]
            if kind == 0:
                img = backs[(4000, 3000)][i % 3].copy()
                for scale, at in ((5.0, (800, 900)), (1.6, (2800, 1400))):
                    img.paste(face.resize((round(face.width * scale), round(face.height * scale))), at)
            elif kind <= 3:
                img = backs[(1600, 1200)][i % 3].copy()
                img.paste(face.resize((178, 218)), (int(rng.integers(0, 1400)), int(rng.integers(0, 950))))
            elif kind == 4:
                img = Image.new("RGB", (640, 480), (int(rng.integers(256)), 120, 90))
            else:
                img = backs[(356, 436)][i % 3].copy()
                img.paste(face, (int(rng.integers(0, 260)), int(rng.integers(0, 320))))
            path = folder / f"{i:06d}.jpg"
            img.save(path, "JPEG", quality=90)
            if prev is not None:
                prev.unlink(missing_ok=True)
            prev = path
            yield path
    finally:
        if prev is not None:
            prev.unlink(missing_ok=True)


def memory(ex: Extractor, n: int, checkpoints: list[int]) -> list[dict[str, float]]:
    """Peak RSS and RSS (MiB) after each checkpoint's number of photos through the pipeline."""
    seen, out = 0, []
    marks = sorted(set(checkpoints))

    def tick() -> None:
        nonlocal seen
        seen += 1
        if marks and seen >= marks[0]:
            hwm, rss = rss_mib()
            out.append({"photos": marks.pop(0), "peak_rss_mib": round(hwm, 1), "rss_mib": round(rss, 1)})
            print(json.dumps(out[-1]), flush=True)

    tmp = Path(tempfile.mkdtemp(prefix="pric-faces-mem-"))
    try:
        items = 0
        photos = mixed_photos(tmp, n)
        hwm, rss = rss_mib()
        print(json.dumps({"photos": 0, "peak_rss_mib": round(hwm, 1), "rss_mib": round(rss, 1)}), flush=True)
        for rows in ex.stream(photos, 64, lambda _p, _r: None, tick=tick, workers=1):
            items += len(rows)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    hwm, rss = rss_mib()
    print(json.dumps({"photos_streamed": n, "faces_sent": items, "peak_rss_mib": round(hwm, 1),
                      "rss_mib": round(rss, 1)}), flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-dir", required=True)
    p.add_argument("--n", type=int, default=20, help="12-MP photos (0: only thumbnails)")
    p.add_argument("--thumbs", type=int, default=200)
    p.add_argument("--out", default="runs/bench-faces")
    p.add_argument("--memory", type=int, default=0, metavar="N",
                   help="only the memory check: N mixed photos made on the fly, peak RSS at each checkpoint")
    p.add_argument("--checkpoints", default="100,500,1000,2000", help="photos after which RSS is printed")
    a = p.parse_args(argv)
    model_dir = Path(a.model_dir)
    card = open_model_dir(model_dir)
    if card.alignment is None:
        print(f"{model_dir}: its card has no alignment section", file=sys.stderr)
        return 2
    if a.memory:
        marks = [int(c) for c in a.checkpoints.split(",") if int(c) <= a.memory]
        memory(Extractor(card, model_dir, threads=1), a.memory, marks)
        return 0
    samples = sorted((REPO / "scripts" / "sample_faces" / "images").glob("*.jpg"))
    out = Path(a.out)
    big_dir, large_dir, thumb_dir = out / "12mp", out / "12mp-large-faces", out / "thumbs"
    for d in (big_dir, large_dir, thumb_dir):  # the benchmark's own photos: made afresh each run
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(a.n):
        face, bg = (Image.open(samples[j]).convert("RGB") for j in rng.choice(len(samples), 2, replace=False))
        (big_dir / f"{i:03d}.jpg").write_bytes(photo(face, bg, (4000, 3000), [(5.0, (800, 900)), (1.6, (2800, 1400))]))
        # the same with the smaller face twice as large (~330 px): no face needs the full decode
        (large_dir / f"{i:03d}.jpg").write_bytes(photo(face, bg, (4000, 3000), [(5.0, (800, 900)), (3.0, (2800, 1400))]))
    for i in range(a.thumbs):
        face, bg = (Image.open(samples[j]).convert("RGB") for j in rng.choice(len(samples), 2, replace=False))
        (thumb_dir / f"{i:03d}.jpg").write_bytes(photo(face, bg, (356, 436), [(1.0, (int(rng.integers(0, 260)),
                                                                                     int(rng.integers(0, 320))))]))
    ex = Extractor(card, model_dir, threads=1)
    clock = StageClock(ex.aligner.detector)
    result: dict[str, object] = {"model": card.model_id}
    plain = Extractor(dataclasses.replace(card, alignment=None), model_dir, threads=1)
    for name, folder in (("12mp", big_dir), ("12mp_large_faces", large_dir), ("thumbnails", thumb_dir)):
        if not any(folder.glob("*.jpg")):
            continue
        files = sorted(folder.glob("*.jpg"))
        datas = [f.read_bytes() for f in files]
        skipped: list[str] = []
        clock.reset()
        items: list[int] = []
        pipe = timed(lambda: [items.append(len(rows)) for rows in ex.stream(files, 64, lambda p_, r: skipped.append(p_),
                                                                              workers=1)])
        full = timed(lambda: [load_image(d) for d in datas])
        limits = {"decode (full resolution)": full}
        if name.startswith("12mp"):
            limits["decode (reduced scale, as the client starts)"] = timed(
                lambda: [load_image(d, card.input) for d in datas])
        else:
            limits["decode + resize (a card without alignment)"] = timed(
                lambda: [prepare(load_image(d, card.input), card.input) for d in datas])
        if name == "thumbnails":
            bare = timed(lambda: [None for _ in plain.stream(files, 64, lambda p_, r: None, workers=1)])
        n = len(files)
        row: dict[str, object] = {"photos": n, "faces_sent": sum(items), "skipped": len(skipped),
                                  "pipeline_photos_per_s": n / pipe[0], "pipeline_cpu_ms_per_photo": 1e3 * pipe[1] / n}
        row["detector_stages_per_photo"] = clock.per_photo(n)
        for what, (wall, cpu) in limits.items():
            row[what] = {"photos_per_s": n / wall, "cpu_ms_per_photo": 1e3 * cpu / n,
                         "pipeline_ratio_wall": (n / pipe[0]) / (n / wall), "pipeline_ratio_cpu": cpu / pipe[1]}
            if name == "thumbnails":
                row[what]["without_detection_ratio_wall"] = bare[0] and wall / bare[0]
                row[what]["without_detection_ratio_cpu"] = bare[1] and cpu / bare[1]
                row["pipeline_without_detection_cpu_ms_per_photo"] = 1e3 * bare[1] / n
        result[name] = row
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
