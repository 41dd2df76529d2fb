"""Client benchmarks (issue 6). Ratios are measured in one run on this machine.

1. Pipeline (read, sha256, decode with draft, crop, resize, ONNX with the normalisation
   inside; batches of 64 photos, the model run 16 at a time)
   photos/s on celeba-10k vs JPEG decode + resize alone (with and without draft mode), with
   one thread and with the client's default threads (against the better, by median, of the
   1- and N-thread limits). Goal: pipeline >= 0.8 x the decode+resize limit. Also the pipeline with the ONNX run
   replaced by zeros (what the client adds around decode+resize), CPU us per photo of each
   run and of each stage: on a shared machine CPU time is the steadier measure.
2. onnxruntime vs torch eager for the same extractor architecture (training.models,
   random weights, exported with training.export.export_onnx), batch 64. Skipped
   without torch; the client itself never imports torch.
3. Phone-sized photos: 4000x3000 JPEGs made by upscaling celeba faces vs 89x109 files,
   the pipeline vs decode+resize alone on them,
   client pipeline photos/s, and a full-resolution decode (draft disabled) for contrast;
   CPU ms per 12-MP photo of read, sha256, draft decode, crop+resize (what bounds it).
4. Peak memory of `pric-client transform` (a real process, VmHWM) over N and 4N
   photos, and the tracemalloc peak in-process: flat when the transform streams.

    .venv/bin/python benchmarks/bench_client.py [--n 1000] [--model-dir DIR] [--json OUT]

Model: --model-dir, else the first folder of exported_models/ with a card, else the tiny
test model of tests/conftest.py (Conv 8x8 stride 8).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from client.models import open_model_dir  # noqa: E402
from client.pipeline import Extractor, default_workers  # noqa: E402
from protocol.model_card import CARD_FILE, InputSpec  # noqa: E402
from protocol.preprocess import _FILTERS, _needed_size  # noqa: E402


def celeba_images(n: int) -> list[Path]:
    env = os.environ.get("PRIC_CELEBA")
    root = Path(env) if env else REPO.parent / "shared" / "data" / "celeba-10k"
    folder = root / "images" if (root / "images").is_dir() else REPO / "scripts" / "sample_faces" / "images"
    files = sorted(folder.glob("*.jpg"))
    return (files * (n // len(files) + 1))[:n]


def pick_model(arg: str | None, tmp: Path) -> Path:
    if arg:
        return Path(arg)
    exported = sorted(d for d in (REPO / "exported_models").glob("*") if (d / CARD_FILE).is_file())
    if exported:
        return exported[0]
    spec = importlib.util.spec_from_file_location("pric_tests_conftest", REPO / "tests" / "conftest.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    mod.write_tiny_features_model(tmp / "tiny")
    return tmp / "tiny"


def rate(fn: Callable[[], int], repeat: int = 2) -> float:
    """Best photos/s (wall clock) over `repeat` runs of fn (which returns the number of photos)."""
    return max(rates(fn)[0] for _ in range(repeat))


def rates(fn: Callable[[], int]) -> tuple[float, float]:
    """(photos per wall-clock second, photos per CPU second of this process, all threads).
    On a shared machine the CPU-time rate is the steadier measure of cost."""
    w0, c0 = time.perf_counter(), time.process_time()
    n = fn()
    return n / (time.perf_counter() - w0), n / max(time.process_time() - c0, 1e-9)


def decode_resize(files: Sequence[Path], spec: InputSpec, draft: bool) -> int:
    """The limit: JPEG decode (+ draft like the client, or full size) + crop/resize only."""
    for p in files:
        with Image.open(p) as img:
            if draft:
                img.draft("RGB", _needed_size(img.size, spec))
            img = img.convert("RGB")
            w, h = img.size
            l, t, r, b = spec.crop_box
            img.resize((spec.width, spec.height), _FILTERS[spec.resize_filter],
                       box=(round(l * w), round(t * h), round(r * w), round(b * h)))
    return len(files)


def decode_resize_parallel(files: Sequence[Path], spec: InputSpec, workers: int) -> int:
    """The limit with as many decoding threads as the client has threads (Pillow releases the GIL)."""
    from concurrent.futures import ThreadPoolExecutor

    chunks = [files[i::workers] for i in range(workers)]
    with ThreadPoolExecutor(workers) as pool:
        return sum(pool.map(lambda c: decode_resize(c, spec, draft=True), chunks))


def pipeline(files: Sequence[Path], ex: Extractor, batch: int = 64, workers: int = 1) -> int:
    n = 0
    for rows in ex.stream(files, batch, lambda p, r: print(f"skip {p}: {r}", file=sys.stderr), workers=workers):
        n += len(rows)
    return n


def cpu_clock(t: dict[str, float], n: int, unit: float) -> Callable[[str, Callable[[], object]], object]:
    """clock(name, fn): run fn, store its process CPU time per photo (x unit) in t[name]."""

    def clock(name: str, fn: Callable[[], object]) -> object:
        t0 = time.process_time()
        out = fn()
        t[name] = (time.process_time() - t0) / n * unit
        return out

    return clock


def model_macs(path: Path) -> int | None:
    """Multiply-accumulates per photo of the ONNX graph's Conv and MatMul nodes (shape
    inference; None without onnx or when a shape is unknown)."""
    try:
        import onnx
        from onnx import shape_inference
    except ImportError:
        return None
    graph = shape_inference.infer_shapes(onnx.load(str(path))).graph
    weights = {w.name: list(w.dims) for w in graph.initializer}
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
              for v in [*graph.value_info, *graph.output]}
    total = 0
    for node in graph.node:
        if node.op_type not in ("Conv", "MatMul"):
            continue
        w, out = weights.get(node.input[1]), shapes.get(node.output[0])
        if w is None or not out or 0 in out[1:]:
            return None
        per_output = int(np.prod(w[1:])) if node.op_type == "Conv" else w[0]
        total += int(np.prod(out[1:])) * per_output
    return total


def stage_breakdown(files: Sequence[Path], ex: Extractor) -> dict[str, float]:
    """CPU microseconds per photo of each pipeline stage (process CPU time, all threads:
    steadier than wall time on a shared machine), in the order the client runs them."""
    import hashlib

    from protocol.preprocess import load_image, prepare

    spec = ex.card.input
    t: dict[str, float] = {}
    clock = cpu_clock(t, len(files), 1e6)

    datas = clock("read", lambda: [p.read_bytes() for p in files])
    clock("sha256", lambda: [hashlib.sha256(d).hexdigest() for d in datas])
    imgs = clock("decode (load_image)", lambda: [load_image(d, spec) for d in datas])
    arrs = clock("crop+resize (prepare)", lambda: [prepare(i, spec) for i in imgs])
    stacks = clock("stack (batches of 64)", lambda: [np.stack(arrs[i:i + 64]) for i in range(0, len(arrs), 64)])
    # the card's graph as it is: uint8 pixels in for a device graph, else normalised first
    clock("model (the card's graph)", lambda: [ex.transform(x) for x in stacks])
    return t


class NoModelExtractor(Extractor):
    """The client pipeline with the ONNX run replaced by zeros: what the client itself adds
    to decode+resize (read, sha256, EXIF check, batching), without the model."""

    def transform(self, pixels: np.ndarray) -> np.ndarray:
        return np.zeros((len(pixels), *self.out_shape), dtype=self.card.output.dtype)


def phone_breakdown(files: Sequence[Path], spec: InputSpec) -> dict[str, float]:
    """CPU milliseconds per 12-MP photo: file read, sha256, JPEG decode in draft mode
    (libjpeg still entropy-decodes every coefficient), EXIF check + RGB, crop+resize,
    and a full-resolution decode for contrast."""
    import hashlib
    import io

    from protocol.preprocess import load_image, prepare

    t: dict[str, float] = {}
    clock = cpu_clock(t, len(files), 1e3)

    def decode(d: bytes, size: tuple[int, int] | None) -> Image.Image:
        img = Image.open(io.BytesIO(d))
        if size:
            img.draft("RGB", size)
        img.load()
        return img

    datas = clock("read", lambda: [p.read_bytes() for p in files])
    clock("sha256", lambda: [hashlib.sha256(d).hexdigest() for d in datas])
    small = clock("decode at 1/8 (draft)", lambda: [decode(d, _needed_size((0, 0), spec)) for d in datas])
    t["draft_size"] = list(small[0].size)  # type: ignore[index]
    imgs = clock("load_image (draft + EXIF + RGB)", lambda: [load_image(d, spec) for d in datas])
    clock("crop+resize (prepare)", lambda: [prepare(i, spec) for i in imgs])
    clock("full-resolution decode", lambda: [decode(d, None) for d in datas])
    return t


def bench_ort_vs_torch(files: Sequence[Path], spec: InputSpec, tmp: Path, reps: int = 20) -> dict:
    try:
        import torch

        from training.export import export_onnx
        from training.models import create_model
    except ImportError as exc:
        return {"skipped": f"torch/training not importable ({exc})"}
    from client.models import OnnxModel
    from protocol.preprocess import preprocess

    threads = torch.get_num_threads()
    model = create_model("extractor", input_size=(spec.height, spec.width)).eval()
    path = tmp / "extractor.onnx"
    export_onnx(model, torch.zeros(2, 3, spec.height, spec.width), path, "image", "feature")
    ort_model = OnnxModel(path, "image", "feature", threads=threads)
    x = np.stack([preprocess(p, spec) for p in files[:64]]).astype(np.float32)
    xt = torch.from_numpy(x)
    with torch.inference_mode():
        diff = float(np.abs(model(xt).numpy() - ort_model(x)).max())

        def t_torch() -> int:
            for _ in range(reps):
                model(xt)
            return reps * len(x)

        torch_rate = rate(t_torch, 3)

    def t_ort() -> int:
        for _ in range(reps):
            ort_model(x)
        return reps * len(x)

    ort_rate = rate(t_ort, 3)
    return {"threads": threads, "batch": len(x), "ort_photos_s": ort_rate, "torch_eager_photos_s": torch_rate,
            "ort_over_torch": ort_rate / torch_rate, "max_abs_diff": diff}


def make_phone_photos(faces: Sequence[Path], folder: Path, size: tuple[int, int]) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    rng = np.random.default_rng(0)
    for p in faces:
        q = folder / p.name
        img = Image.open(p).convert("RGB").resize(size, Image.Resampling.BICUBIC)
        if size[0] * size[1] > 1_000_000:
            # sensor-like noise, so the files weigh what phone JPEGs weigh (a few MiB), not 0.5
            arr = np.asarray(img, np.int16) + rng.normal(0, 6, (size[1], size[0], 1)).astype(np.int16)
            img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
        img.save(q, quality=90)
        out.append(q)
    return out


def full_decode_pipeline(files: Sequence[Path], spec: InputSpec) -> int:
    """What the client would cost without draft: full-resolution decode, then crop/resize."""
    return decode_resize(files, spec, draft=False)


def peak_rss_of_transform(paths: Sequence[Path], model_dir: Path, tmp: Path) -> int:
    """Peak RSS (KiB, VmHWM of the process itself: ru_maxrss would count the forking
    parent's pages) of a real client process transforming `paths`."""
    listing = tmp / f"list-{len(paths)}"
    listing.mkdir()
    for n, p in enumerate(paths):  # copies: the client does not follow links out of its paths
        (listing / f"{n:06d}.jpg").write_bytes(p.read_bytes())
    code = (
        "import sys, re\n"
        "from client.cli import main\n"
        f"rc = main(['--home', {str(tmp / 'home')!r}, 'transform', {str(listing)!r}, '--out', "
        f"{str(tmp / f'f{len(paths)}.npz')!r}, '--model-dir', {str(model_dir)!r}])\n"
        "hwm = re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1)\n"
        "print('HWM', rc, hwm)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=600)
    line = [l for l in proc.stdout.splitlines() if l.startswith("HWM")]
    if proc.returncode != 0 or not line or line[0].split()[1] != "0":
        raise RuntimeError(f"transform failed: {proc.stderr[-500:]}")
    return int(line[0].split()[2])


def tracemalloc_peak(files: Sequence[Path], model_dir: Path, tmp: Path) -> int:
    """tracemalloc peak (bytes) of the in-process transform (Python/numpy allocations)."""
    from client.cli import main

    import io

    tracemalloc.start()
    rc = main(["--home", str(tmp / "home"), "transform", *map(str, files), "--out", str(tmp / "tm.npz"),
               "--model-dir", str(model_dir)], out=io.StringIO(), err=io.StringIO())
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert rc == 0
    return peak


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1000, help="celeba photos for the throughput runs")
    ap.add_argument("--phone", type=int, default=12, help="number of 12-MP photos")
    ap.add_argument("--mem-n", type=int, default=500, help="N for the memory runs (also 4N)")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds of the celeba runs")
    ap.add_argument("--model-dir")
    ap.add_argument("--ort-threads", type=int, default=None,
                    help="onnxruntime intra-op threads of the client's model (default: the client's default)")
    ap.add_argument("--json", help="write the figures to this JSON file")
    args = ap.parse_args(argv)
    results: dict = {"cpu_count": os.cpu_count()}
    with tempfile.TemporaryDirectory() as tmpname:
        tmp = Path(tmpname)
        model_dir = pick_model(args.model_dir, tmp)
        card = open_model_dir(model_dir)
        spec = card.input
        ex = Extractor(card, model_dir, threads=args.ort_threads)
        no_model = NoModelExtractor(card, model_dir, threads=args.ort_threads)
        files = celeba_images(args.n)
        results["model"] = card.model_id
        print(f"model {card.model_id} from {model_dir}; {len(files)} photos; {os.cpu_count()} CPUs", flush=True)

        # warm the page cache and onnxruntime
        decode_resize(files, spec, True)
        pipeline(files[:128], ex)
        workers = default_workers()
        # the machine is shared: interleave the runs in rounds and report median ratios
        rounds: dict[str, list[float]] = {"full": [], "draft": [], "pipe1": [], "prep1": [], "drafW": [], "pipeW": []}
        cpu: dict[str, list[float]] = {"draft": [], "pipe1": [], "prep1": [], "pipeW": []}
        for _ in range(args.rounds):
            rounds["full"].append(rates(lambda: decode_resize(files, spec, draft=False))[0])
            w, c = rates(lambda: decode_resize(files, spec, draft=True))
            rounds["draft"].append(w)
            cpu["draft"].append(c)
            w, c = rates(lambda: pipeline(files, ex, workers=1))
            rounds["pipe1"].append(w)
            cpu["pipe1"].append(c)
            w, c = rates(lambda: pipeline(files, no_model, workers=1))
            rounds["prep1"].append(w)
            cpu["prep1"].append(c)
            rounds["drafW"].append(rates(lambda: decode_resize_parallel(files, spec, workers))[0])
            w, c = rates(lambda: pipeline(files, ex, workers=workers))
            rounds["pipeW"].append(w)
            cpu["pipeW"].append(c)
        med = {k: float(np.median(v)) for k, v in rounds.items()}
        r1 = float(np.median(np.array(rounds["pipe1"]) / np.array(rounds["draft"])))
        # against the better of the two limits (1 or `workers` decoding threads) by median
        # rate, per round (the better of each round's pair would be biased upwards by noise)
        best = "drafW" if med["drafW"] > med["draft"] else "draft"
        rw = float(np.median(np.array(rounds["pipeW"]) / np.array(rounds[best])))
        rc = float(np.median(np.array(cpu["pipe1"]) / np.array(cpu["draft"])))
        rp = float(np.median(np.array(rounds["prep1"]) / np.array(rounds["draft"])))
        rpc = float(np.median(np.array(cpu["prep1"]) / np.array(cpu["draft"])))
        cpu_us = {k: 1e6 / float(np.median(v)) for k, v in cpu.items()}
        results["celeba"] = {
            "rounds": args.rounds, "workers": workers, "per_round_photos_s": rounds, "per_round_photos_per_cpu_s": cpu,
            "median_photos_s": med, "ratio_1_thread_vs_draft_limit": r1, "ratio_workers_vs_better_draft_limit": rw,
            "better_limit": best,
            "ratio_cpu_time_1_thread_vs_draft_limit": rc, "load_average": os.getloadavg(),
            "ratio_no_model_1_thread_vs_draft_limit": rp, "ratio_cpu_time_no_model_vs_draft_limit": rpc,
            "median_cpu_us_per_photo": cpu_us,
        }
        print(f"[1] celeba ({args.rounds} interleaved rounds, medians, load average {os.getloadavg()[0]:.1f}): "
              f"decode+resize alone {med['draft']:.0f} photos/s (draft as the client), {med['full']:.0f}/s (full "
              f"decode); client pipeline {med['pipe1']:.0f}/s with 1 thread (ratio {r1:.2f}; per CPU second "
              f"{rc:.2f}), {med['pipeW']:.0f}/s with {workers} threads (the client's default) vs decode+resize on "
              f"{workers} threads {med['drafW']:.0f}/s (ratio to the better limit, {1 if best == 'draft' else workers} "
              f"thread(s): {rw:.2f})  goal >= 0.8",
              flush=True)
        print(f"    without the model (ONNX run replaced by zeros): {med['prep1']:.0f}/s, ratio {rp:.2f} (per CPU "
              f"second {rpc:.2f}); CPU us/photo: " + ", ".join(f"{k} {v:.0f}" for k, v in cpu_us.items()), flush=True)

        stages = stage_breakdown(files, ex)
        results["stages_us_per_photo"] = stages
        print("    stages, CPU us/photo: " + ", ".join(f"{k} {v:.0f}" for k, v in stages.items()), flush=True)
        model_us = stages["model (the card's graph)"]
        macs = model_macs(model_dir / card.file)
        if macs:
            gflops = 2 * macs / (model_us * 1e-6) / 1e9
            results["model_macs_per_photo"] = macs
            results["model_gflop_per_cpu_s"] = gflops
            print(f"    model: {macs / 1e6:.1f} M multiply-adds per photo, {gflops:.0f} GFLOP per CPU second", flush=True)
        ceiling = cpu_us["draft"] / (cpu_us["draft"] + model_us)
        results["celeba"]["ratio_ceiling_with_this_model"] = ceiling
        print(f"    ceiling with this model (limit CPU / (limit + model CPU), same cores): {ceiling:.2f}", flush=True)

        ot = bench_ort_vs_torch(files, spec, tmp)
        results["ort_vs_torch"] = ot
        if "skipped" in ot:
            print(f"[2] onnxruntime vs torch: skipped ({ot['skipped']})")
        else:
            print(f"[2] extractor, batch {ot['batch']}, {ot['threads']} threads: onnxruntime {ot['ort_photos_s']:.0f} "
                  f"photos/s vs torch eager {ot['torch_eager_photos_s']:.0f}/s: ratio {ot['ort_over_torch']:.2f} "
                  f"(max abs diff {ot['max_abs_diff']:.1e})", flush=True)

        faces = celeba_images(args.phone)
        big = make_phone_photos(faces, tmp / "phone12mp", (3000, 4000))
        small = make_phone_photos(faces, tmp / "small", (89, 109))
        mb = np.mean([p.stat().st_size for p in big]) / 2**20
        big_pipe = rate(lambda: pipeline(big, ex), 2)
        big_pipe_w = rate(lambda: pipeline(big, ex, workers=default_workers()), 2)
        small_pipe = rate(lambda: pipeline(small * 8, ex), 2)  # single thread both
        big_full = rate(lambda: full_decode_pipeline(big, spec), 1)
        big_limit = rate(lambda: decode_resize(big, spec, draft=True), 2)  # the limit, as for celeba
        big_cpu = rates(lambda: pipeline(big, ex))[1]
        small_cpu = rates(lambda: pipeline(small * 8, ex))[1]
        parts = phone_breakdown(big, spec)
        results["phone"] = {
            "n_12mp": len(big), "mean_file_mib": mb, "pipeline_12mp_photos_s": big_pipe,
            "pipeline_89x109_photos_s": small_pipe, "full_res_decode_12mp_photos_s": big_full,
            "pipeline_12mp_workers_photos_s": big_pipe_w,
            "draft_speedup_12mp": big_pipe / big_full, "decode_resize_12mp_photos_s": big_limit,
            "ratio_12mp_pipeline_vs_decode_resize": big_pipe / big_limit, "cost_ratio_12mp_vs_small": small_pipe / big_pipe,
            "pipeline_cpu_ms_per_photo_12mp": 1e3 / big_cpu, "pipeline_cpu_ms_per_photo_89x109": 1e3 / small_cpu,
            "breakdown_12mp_cpu_ms": parts,
        }
        print(f"[3] 12-MP JPEGs ({mb:.1f} MiB): pipeline {big_pipe:.1f} photos/s, {big_pipe / big_limit:.2f} of decode+resize "
              f"alone ({big_limit:.1f}/s, draft as the client, one thread each); 89x109: {small_pipe:.0f}/s "
              f"(12 MP costs {small_pipe / big_pipe:.1f}x more per photo); full-resolution decode+resize "
              f"{big_full:.1f}/s (draft is {big_pipe / big_full:.1f}x faster); 12 MP with {default_workers()} threads "
              f"{big_pipe_w:.1f}/s", flush=True)
        print(f"    CPU ms/photo: 12 MP {1e3 / big_cpu:.1f}, 89x109 {1e3 / small_cpu:.2f}; 12-MP parts, CPU ms/photo: "
              + ", ".join(f"{k} {v:.1f}" if isinstance(v, float) else f"{k} {v}" for k, v in parts.items()), flush=True)

        many = celeba_images(4 * args.mem_n)
        rss_small = peak_rss_of_transform(many[: args.mem_n], model_dir, tmp)
        rss_big = peak_rss_of_transform(many, model_dir, tmp)
        tm_small = tracemalloc_peak(many[: args.mem_n], model_dir, tmp)
        tm_big = tracemalloc_peak(many, model_dir, tmp)
        results["memory"] = {
            "n": [args.mem_n, 4 * args.mem_n], "peak_rss_kib_vmhwm": [rss_small, rss_big],
            "tracemalloc_peak_bytes": [tm_small, tm_big],
        }
        print(f"[4] transform peak RSS: N={args.mem_n}: {rss_small / 1024:.0f} MiB, N={4 * args.mem_n}: "
              f"{rss_big / 1024:.0f} MiB; tracemalloc peak {tm_small / 2**20:.1f} MiB vs {tm_big / 2**20:.1f} MiB", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
