"""The participant's page vs the Python client (issue 20), ratios measured in one run.

1. Thumbnails: celeba-10k photos (89x109), photos/s of the page's pipeline (read, sha256,
   item id, decode, crop + the resize port, onnxruntime-web, 16 photos a run, one thread)
   vs the Python client's (client.pipeline.Extractor.stream, 1 thread and its default).
2. Phone photos: 4000x3000 JPEGs made by upscaling celeba faces (benchmarks/bench_client's
   make_phone_photos), the same two rates.
3. Renderer memory: peak resident size (VmHWM) of the page's renderer process in each run.
5. Faces (--scenes N): a model card with alignment (pric-male-decision with the CelebA
   alignment, as `python -m research.scenes attach` makes it): photos/s of the page's
   detector + aligner + model vs the Python client's (--faces all), on N scenes of two
   celeba faces pasted at 1.4-2.2x on a blurred background (520x400) and on 12-MP copies of
   a few of them, with the faces found by each.
4. Large JPEGs: how far the page's model inputs are from the client's, which decodes them
   at reduced scale (Pillow's draft mode): mean and max |Δ| in levels, and the share of
   equal decisions of the decision model, on 178x218 (celeba's original size) and on the
   12-MP photos; with WebCodecs' ImageDecoder at the draft's size (what the page does) and
   without it (a browser that lacks it: every pixel decoded, then the resize port).

    .venv/bin/python benchmarks/bench_web.py [--n 1000] [--big 16] [--scenes 40] [--json OUT]

Needs Debian's chromium, Playwright for Python and node_modules (make setup).
"""

from __future__ import annotations

import argparse
import base64
import importlib.util
import json
import os
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from client.pipeline import Extractor, default_workers  # noqa: E402
from protocol.model_card import load_card  # noqa: E402

MODELS = {"pric-male@6": REPO / "exported_models" / "pric-male",
          "pric-male-decision@2": REPO / "exported_models" / "pric-male-decision"}
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"]

# a browser without WebCodecs' ImageDecoder (the page then decodes every pixel)
NO_IMAGEDECODER = "delete window.ImageDecoder;"

PAGE_RUN = """async ([token, modelId, keep]) => {
  const api = await import('/app/static/js/api.js');
  const { modelInputs } = await import('/app/static/js/photos.js');
  const { Model } = await import('/app/static/js/model.js');
  const { itemKey, itemId, sha256 } = await import('/app/static/js/ids.js');
  const card = await api.call(`/api/v1/models/${modelId}`, { token });
  const file = await api.modelFile(token, modelId, card.file);
  const m = await Model.load(card, file.data);
  const key = await itemKey(crypto.getRandomValues(new Uint8Array(32)));
  const files = Array.from(document.getElementById('bench').files);
  const t0 = performance.now();
  let chunk = [], n = 0; const kept = [], outs = [];
  const run = async () => { if (chunk.length) { for (const y of await m.run(chunk)) { if (keep) outs.push(Array.from(y)); n++; } chunk = []; } };
  for (const f of files) {
    const bytes = new Uint8Array(await f.arrayBuffer());
    await itemId(key, await sha256(bytes), card.sha256);
    const x = (await modelInputs(bytes, card))[0];
    if (keep) kept.push(x);
    chunk.push(x);
    if (chunk.length >= 16) await run();
  }
  await run();
  const secs = (performance.now() - t0) / 1000;
  let pixels = '';
  if (keep) { const all = new Uint8Array(kept.length * kept[0].length); kept.forEach((a, i) => all.set(a, i * a.length));
    for (let i = 0; i < all.length; i += 0x8000) pixels += String.fromCharCode(...all.subarray(i, i + 0x8000)); pixels = btoa(pixels); }
  return { n, secs, pixels, outs };
}"""


FACES_RUN = """async ([token, keep]) => {
  const api = await import('/app/static/js/api.js');
  const P = await import('/app/static/js/photos.js');
  const { Model } = await import('/app/static/js/model.js');
  const { itemKey, itemId, faceDigest, sha256 } = await import('/app/static/js/ids.js');
  const card = await api.modelCard(token);
  const m = await Model.load(card, (await api.modelFile(token, card.model_id, card.file)).data);
  const files = {};
  for (const n of ['pnet.onnx', 'rnet.onnx', 'onet.onnx']) files[n] = (await api.modelFile(token, card.model_id, n)).data;
  const detector = await P.loadDetector(card, files);
  const key = await itemKey(crypto.getRandomValues(new Uint8Array(32)));
  const t0 = performance.now();
  let faces = 0;
  for (const f of Array.from(document.getElementById('bench').files)) {
    const bytes = new Uint8Array(await f.arrayBuffer());
    const photo = await sha256(bytes);
    try {
      const got = await P.photoItems(bytes, card, detector);
      for (const it of got.items) await itemId(key, await faceDigest(photo, it.face), card.sha256);
      if (got.items.length) await m.run(got.items.map((it) => it.pixels));
      faces += got.items.length;
    } catch (e) { if (!(e instanceof P.PhotoError)) throw e; }
  }
  return { n: document.getElementById('bench').files.length, faces, secs: (performance.now() - t0) / 1000 };
}"""


def make_scenes(faces: Sequence[Path], folder: Path, n: int) -> list[Path]:
    """n scenes of two faces each on a blurred background (tests/web/test_faces.py's kind)."""
    from PIL import ImageFilter

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    out = []
    for k in range(n):
        bg = Image.open(faces[(3 * k) % len(faces)]).convert("RGB").resize((520, 400)).filter(ImageFilter.GaussianBlur(8))
        for j, x in enumerate((30, 280)):
            s = float(rng.uniform(1.4, 2.2))
            face = Image.open(faces[(3 * k + j + 1) % len(faces)]).convert("RGB").resize(
                (int(89 * s), int(109 * s)), Image.Resampling.BICUBIC)
            bg.paste(face, (x + int(rng.integers(0, 20)), int(rng.integers(0, 400 - face.height))))
        out.append(folder / f"scene{k:04d}.jpg")
        bg.save(out[-1], quality=92)
    return out


def faces_bench(browser, tmp: Path, thumbs: Sequence[Path], n: int, in_context) -> dict:
    """Section 5: the page vs the Python client on scenes, with a card that finds faces."""
    import dataclasses
    import shutil

    from werkzeug.serving import make_server

    from collector.app import create_app
    from protocol.align import attach, default_alignment

    src, det = MODELS["pric-male-decision@2"], REPO / "exported_models" / "face-detector"
    model_dir = tmp / "models-aligned" / "aligned"
    model_dir.mkdir(parents=True)
    card = load_card(src)
    for name in [card.file, *card.extra_files]:
        shutil.copyfile(src / name, model_dir / name)
    card = attach(dataclasses.replace(card, version=f"{card.version}+aligned"), default_alignment(det), det, model_dir)
    card.save(model_dir)
    # a benchmark's own unsigned card: the collector serves it unattested, the page's
    # modules are driven directly (the participant's flow would refuse it)
    app = create_app({"DATA_DIR": str(tmp / "data-aligned"), "MODELS_DIR": str(model_dir.parent),
                      "CURRENT_MODEL": card.model_id, "READ_LIMIT_PER_MIN": 0, "ALLOW_UNATTESTED": True})
    server = make_server("127.0.0.1", 0, app, threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}"
    token = app.test_client().post("/api/v1/participants").get_json()["token"]
    scenes = make_scenes(thumbs, tmp / "scenes", n)
    big = []
    for p in scenes[:4]:
        big.append(tmp / "scenes" / f"12mp-{p.name}")
        Image.open(p).resize((4000, 3077), Image.Resampling.BICUBIC).save(big[-1], quality=90)
    out = {}
    for label, files in (("scenes_520x400", scenes), ("scenes_12mp", big)):
        page = in_context(url, files, FACES_RUN, [token, False])
        ex = Extractor(card, model_dir, faces="all")
        t0 = time.perf_counter()
        py_faces = sum(len(rows) for rows in ex.stream(files, 64, lambda p, r: None, workers=1))
        py = len(files) / (time.perf_counter() - t0)
        rate = page["n"] / page["secs"]
        out[label] = {"photos": len(files), "page_photos_per_s": rate, "python_1_thread_photos_per_s": py,
                      "page_over_python_1_thread": rate / py, "page_faces": page["faces"], "python_faces": py_faces,
                      "renderer_peak_mib": page["renderer_peak_mib"]}
        print(f"faces {label}: page {rate:.1f} photos/s, Python client {py:.1f} (1 thread): ratio {rate / py:.3f}; "
              f"faces found page {page['faces']} / client {py_faces}; renderer peak {page['renderer_peak_mib']:.0f} MiB",
              flush=True)
    server.shutdown()
    return out


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def descendants(pid: int) -> list[int]:
    kids: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            kids.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [pid]
    while todo:
        for k in kids.get(todo.pop(), []):
            out.append(k)
            todo.append(k)
    return out


def renderer_peak_mib() -> float:
    """Largest VmHWM of this process's chromium renderers."""
    peak = 0
    for pid in descendants(os.getpid()):
        try:
            if b"--type=renderer" not in Path(f"/proc/{pid}/cmdline").read_bytes():
                continue
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    peak = max(peak, int(line.split()[1]))
        except OSError:
            continue
    return peak / 1024


def python_rate(files: Sequence[Path], model_dir: Path, workers: int) -> float:
    ex = Extractor(load_card(model_dir), model_dir)
    t0 = time.perf_counter()
    n = sum(len(rows) for rows in ex.stream(files, 64, lambda p, r: None, workers=workers))
    return n / (time.perf_counter() - t0)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1000, help="thumbnails (default 1000)")
    ap.add_argument("--big", type=int, default=16, help="12-MP photos (default 16)")
    ap.add_argument("--scenes", type=int, default=40, help="scenes with two faces each (default 40; 0: skip)")
    ap.add_argument("--json", type=Path, help="write the figures here")
    args = ap.parse_args(argv)
    from playwright.sync_api import sync_playwright
    from werkzeug.serving import make_server

    from collector.app import create_app

    bc = _load("bench_client", REPO / "benchmarks" / "bench_client.py")
    thumbs = bc.celeba_images(args.n)
    tmp = Path(tempfile.mkdtemp(prefix="pric-bench-web-"))
    mid = bc.make_phone_photos(thumbs[:200], tmp / "178x218", (178, 218))
    big = bc.make_phone_photos(thumbs[:args.big], tmp / "12mp", (3000, 4000))
    app = create_app({"DATA_DIR": str(tmp / "data"), "MODELS_DIR": str(REPO / "exported_models"),
                      "CURRENT_MODEL": "pric-male@6", "READ_LIMIT_PER_MIN": 0})
    server = make_server("127.0.0.1", 0, app, threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}"
    token = app.test_client().post("/api/v1/participants").get_json()["token"]
    out: dict = {"n_thumbnails": len(thumbs), "n_12mp": len(big), "python_workers": default_workers()}

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS, headless=True)

        def in_page(files: Sequence[Path], model_id: str, keep: bool, init: str | None = None) -> dict:
            ctx = browser.new_context()
            page = ctx.new_page()
            if init:
                page.add_init_script(init)
            page.set_default_timeout(600_000)
            page.goto(url + "/app/")
            page.evaluate("() => { const i = document.createElement('input'); i.type = 'file'; i.multiple = true; "
                          "i.id = 'bench'; document.body.append(i); }")
            page.set_input_files("#bench", [str(p) for p in files])
            got = page.evaluate(PAGE_RUN, [token, model_id, keep])
            got["renderer_peak_mib"] = renderer_peak_mib()
            ctx.close()
            return got

        for label, files in (("thumbnails", thumbs), ("12mp", big)):
            page = in_page(files, "pric-male@6", False)
            py1 = python_rate(files, MODELS["pric-male@6"], 1)
            pyn = python_rate(files, MODELS["pric-male@6"], default_workers())
            rate = page["n"] / page["secs"]
            out[label] = {"page_photos_per_s": rate, "python_1_thread_photos_per_s": py1,
                          "python_default_photos_per_s": pyn, "page_over_python_1_thread": rate / py1,
                          "page_over_python_default": rate / pyn, "renderer_peak_mib": page["renderer_peak_mib"]}
            print(f"{label}: page {rate:.1f} photos/s, Python client {py1:.1f} (1 thread) / {pyn:.1f} "
                  f"({default_workers()} threads): ratio {rate / py1:.3f} / {rate / pyn:.3f}; renderer peak "
                  f"{page['renderer_peak_mib']:.0f} MiB", flush=True)

        card = load_card(MODELS["pric-male-decision@2"])
        ex = Extractor(card, MODELS["pric-male-decision@2"])
        for label, files, init in (("178x218", mid, None), ("12mp", big, None),
                                   ("178x218_no_imagedecoder", mid, NO_IMAGEDECODER),
                                   ("12mp_no_imagedecoder", big, NO_IMAGEDECODER)):
            page = in_page(files, "pric-male-decision@2", True, init)
            px = np.frombuffer(base64.b64decode(page["pixels"]), np.uint8).reshape(len(files), 64, 64, 3)
            ours = np.stack([ex.decode(p.read_bytes(), p) for p in files])
            diff = np.abs(px.astype(np.int16) - ours.astype(np.int16))
            same = float(np.mean((np.asarray(page["outs"])[:, 0] > 0) == (ex.transform(ours).reshape(-1) > 0)))
            out[f"large_jpeg_{label}"] = {"photos": len(files), "mean_abs_levels": float(diff.mean()),
                                          "max_abs_levels": int(diff.max()), "decisions_equal": same,
                                          "page_photos_per_s": page["n"] / page["secs"],
                                          "renderer_peak_mib": page["renderer_peak_mib"]}
            print(f"large JPEG {label}: page vs client (draft decode): inputs differ by {diff.mean():.2f} levels on "
                  f"average (max {diff.max()}); decisions equal on {same:.1%} of {len(files)} photos; "
                  f"page {page['n'] / page['secs']:.1f} photos/s (inputs kept), renderer peak "
                  f"{page['renderer_peak_mib']:.0f} MiB", flush=True)
        def in_context(base: str, files: Sequence[Path], script: str, arg: list) -> dict:
            ctx = browser.new_context()
            page = ctx.new_page()
            page.set_default_timeout(600_000)
            page.goto(base + "/app/")
            page.evaluate("() => { const i = document.createElement('input'); i.type = 'file'; i.multiple = true; "
                          "i.id = 'bench'; document.body.append(i); }")
            page.set_input_files("#bench", [str(p) for p in files])
            got = page.evaluate(script, arg)
            got["renderer_peak_mib"] = renderer_peak_mib()
            ctx.close()
            return got

        if args.scenes:
            out["faces"] = faces_bench(browser, tmp, thumbs, args.scenes, in_context)
        browser.close()
    server.shutdown()
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
