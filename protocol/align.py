"""Face alignment, defined once: the client, the training data loader and the audit all turn
a photo into faces here, so what a model is trained and audited on is what a device sends.

    photo ─► protocol.preprocess.load_image (EXIF orientation; JPEGs decoded at reduced
             scale, longest side ≥ DETECT_DRAFT_MIN) ─► at most DETECT_SIDE px for the detector
          ─► protocol.faces.FaceDetector: boxes + 5 landmarks
          ─► per face: similarity transform (Umeyama least squares, no reflection) from its
             landmarks to the template, checked (size, scale, angle, residual)
          ─► warp from the smallest decode that holds the face at the resolution the model
             keeps (the detection's decode, else a larger JPEG draft or the full decode,
             made once per photo) into the frame
          → an RGB image of `frame` (width, height): the CelebA aligned frame; the model
            card's crop_box and resize then apply unchanged (protocol.preprocess.prepare).

The template is where the detector puts the five landmarks on the aligned CelebA crops of
the training data (mean over celeba-10k's train split, measured by `python -m
research.scenes template`), so an aligned photo is framed like the crops the models saw.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple

import numpy as np
from PIL import Image

from protocol.errors import FaceError, ModelIntegrityError
from protocol.faces import Face, FaceDetector, DetectorSpec

ALIGN_METHOD = "similarity-5pt"
# celeba-10k's aligned crops: 89x109, half of CelebA's 178x218 aligned frame
CELEBA_FRAME = (89, 109)
# mean detected landmarks on celeba-10k train crops (research/scenes.py template; see
# docs/results-faces.md): left eye, right eye, nose, mouth left, mouth right, frame pixels
CELEBA_TEMPLATE = ((34.815, 55.866), (54.209, 55.838), (44.206, 67.777), (35.713, 76.575), (53.209, 76.529))
# the detection image's longest side at most (larger photos are scaled down for detection)
DETECT_SIDE = 1024
# a photo larger than DETECT_SIDE is decoded for detection at the smallest JPEG draft (1/2,
# 1/4, 1/8) whose longest side is at least this, and searched at DETECT_SIDE: a 4000x3000
# photo's 1/4 draft (1000x750) costs 19 ms of CPU where its 1/2 draft reduced to 1024 px
# cost 40 + 21 (measured)
DETECT_DRAFT_MIN = 960
# a face whose eyes are closer than this (photo pixels) is too small to align
MIN_EYE_PX = 6.0
# a transform is degenerate when it turns the face further than this (degrees) ...
MAX_ANGLE = 75.0
# ... or when the landmarks do not fit the template's shape: RMS residual (frame pixels)
# above this fraction of the template's eye distance
MAX_RESIDUAL = 0.4
FRAME_RANGE = (16, 1024)
# a face is cut from a decode with at least this many pixels per pixel the model keeps
# (Aligner.photo's `detail`), so no model input pixel is made up by upsampling
CUT_MARGIN = 1.25


@dataclass(frozen=True)
class AlignmentSpec:
    """The alignment section of a model card: the detector (files + settings), the output
    frame (width, height) and the template (5 landmark positions in frame pixels)."""

    detector: DetectorSpec
    frame: tuple[int, int] = CELEBA_FRAME
    template: tuple[tuple[float, float], ...] = CELEBA_TEMPLATE
    method: str = ALIGN_METHOD

    def problems(self) -> list[str]:
        out = [f"alignment: {p}" for p in (self.detector.problems() if isinstance(self.detector, DetectorSpec)
                                           else ["detector must be an object"])]
        lo, hi = FRAME_RANGE
        f = self.frame
        frame_ok = (isinstance(f, (tuple, list)) and len(f) == 2
                    and all(isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi for v in f))
        if not frame_ok:
            out.append(f"alignment frame must be 2 integers (width, height) in [{lo}, {hi}]")
        t = self.template
        if not (isinstance(t, (tuple, list)) and len(t) == 5
                and all(isinstance(p, (tuple, list)) and len(p) == 2
                        and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                                for v in p) for p in t)):
            out.append("alignment template must be 5 points (x, y) of finite numbers")
        elif frame_ok:
            if not all(0 <= x <= f[0] and 0 <= y <= f[1] for x, y in t):
                out.append("alignment template points must lie inside the frame")
            elif math.dist(t[0], t[1]) < 2:
                out.append("alignment template eyes must be at least 2 pixels apart")
        if self.method != ALIGN_METHOD:
            out.append(f"alignment method {str(self.method)[:40]!r} must be {ALIGN_METHOD!r}")
        return out

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["template"] = [list(p) for p in self.template]
        d["frame"] = list(self.frame)
        return d

    @classmethod
    def from_dict(cls, d: Any) -> "AlignmentSpec":
        if not isinstance(d, dict):
            raise ModelIntegrityError("alignment section must be a JSON object")
        d = dict(d)
        det = DetectorSpec.from_dict(d.pop("detector", None))
        try:
            tpl = d.pop("template", CELEBA_TEMPLATE)
            template = tuple(tuple(p) if isinstance(p, list) else p for p in tpl) if isinstance(tpl, list) else tpl
            frame = d.pop("frame", CELEBA_FRAME)
            return cls(detector=det, template=template, frame=tuple(frame) if isinstance(frame, list) else frame, **d)
        except TypeError as exc:
            raise ModelIntegrityError(f"alignment section is malformed: {str(exc)[:200]}") from None


def default_alignment(detector_dir: str | Path) -> AlignmentSpec:
    """The CelebA alignment with the detector shipped in `detector_dir` (its card)."""
    from protocol.faces import DetectorCard

    return AlignmentSpec(detector=DetectorCard.load(detector_dir).spec)


# --- the similarity transform -------------------------------------------------------------
class Similarity(NamedTuple):
    """dst = A @ src + t, A = scale * rotation (no reflection), in pixel-index coordinates."""

    A: np.ndarray   # (2, 2)
    t: np.ndarray   # (2,)
    scale: float
    angle: float    # degrees
    rms: float      # residual at the landmarks, destination pixels

    def apply(self, pts: np.ndarray) -> np.ndarray:
        return np.asarray(pts, np.float64) @ self.A.T + self.t


def umeyama(src: np.ndarray, dst: np.ndarray) -> Similarity:
    """Least-squares similarity (Umeyama 1991) taking points src (N, 2) onto dst (N, 2),
    rotation without reflection."""
    src, dst = np.asarray(src, np.float64), np.asarray(dst, np.float64)
    mu_s, mu_d = src.mean(0), dst.mean(0)
    s0, d0 = src - mu_s, dst - mu_d
    var_s = (s0 ** 2).sum() / len(src)
    cov = d0.T @ s0 / len(src)
    U, D, Vt = np.linalg.svd(cov)
    S = np.eye(2)
    if np.linalg.det(U) * np.linalg.det(Vt) < 0:
        S[1, 1] = -1
    R = U @ S @ Vt
    scale = float((D * np.diag(S)).sum() / var_s) if var_s > 0 else float("nan")
    A = scale * R
    t = mu_d - A @ mu_s
    rms = float(np.sqrt(((src @ A.T + t - dst) ** 2).sum(1).mean()))
    return Similarity(A, t, scale, float(np.degrees(np.arctan2(R[1, 0], R[0, 0]))), rms)


def face_transform(landmarks: np.ndarray, spec: AlignmentSpec, where: str = "face") -> Similarity:
    """The transform taking a face's landmarks (photo pixels) onto the template; FaceError
    (one line, naming `where`) when the face is too small or the transform is degenerate."""
    pts = np.asarray(landmarks, np.float64)
    if pts.shape != (5, 2) or not np.isfinite(pts).all():
        raise FaceError(f"{where}: landmarks are not 5 finite points")
    eyes = float(np.hypot(*(pts[1] - pts[0])))
    if eyes < MIN_EYE_PX:
        raise FaceError(f"{where}: face too small to align (eyes {eyes:.1f} px apart, need {MIN_EYE_PX:g})")
    template = np.asarray(spec.template, np.float64)
    sim = umeyama(pts, template)
    tpl_eyes = float(np.hypot(*(template[1] - template[0])))
    if not (math.isfinite(sim.scale) and sim.scale > 0):
        raise FaceError(f"{where}: degenerate alignment transform (scale {sim.scale:g})")
    if abs(sim.angle) > MAX_ANGLE:
        raise FaceError(f"{where}: degenerate alignment transform (turned {sim.angle:.0f} degrees)")
    if sim.rms > MAX_RESIDUAL * tpl_eyes:
        raise FaceError(f"{where}: degenerate alignment transform (landmarks fit the template "
                        f"{sim.rms:.1f} px RMS, more than {MAX_RESIDUAL * tpl_eyes:.1f})")
    return sim


def warp(img: Image.Image, sim: Similarity, frame: tuple[int, int]) -> Image.Image:
    """The frame (width, height) cut from `img` by the transform: bilinear, after a box
    reduction of the face's region when it has ≥ 2 photo pixels per frame pixel (no
    aliasing from large faces); outside the photo is black."""
    A, t = sim.A, sim.t
    fw, fh = frame
    k = 1.0 / sim.scale  # photo pixels per frame pixel
    if k >= 2:
        inv = np.linalg.inv(A)
        corners = (np.array([[0, 0], [fw, 0], [0, fh], [fw, fh]], np.float64) - t) @ inv.T
        lo = np.floor(corners.min(0)) - 2
        hi = np.ceil(corners.max(0)) + 2
        box = (int(max(0, lo[0])), int(max(0, lo[1])), int(min(img.width, hi[0])), int(min(img.height, hi[1])))
        if box[2] - box[0] >= 2 and box[3] - box[1] >= 2:
            r = int(k)
            img = img.reduce(r, box=box)
            # photo index p = r * q + box_origin + (r - 1) / 2 for reduced index q
            off = np.array(box[:2], np.float64) + (r - 1) / 2
            t = A @ off + t
            A = A * r
    # PIL samples output pixel (x, y) at (a, b, c, d, e, f) @ (x + .5, y + .5, 1) in
    # continuous coordinates (pixel i spans [i, i + 1)); ours are pixel indices
    inv = np.linalg.inv(A)
    c = -inv @ t + 0.5 - inv @ np.array([0.5, 0.5])
    data = (inv[0, 0], inv[0, 1], c[0], inv[1, 0], inv[1, 1], c[1])
    return img.transform((fw, fh), Image.Transform.AFFINE, data, resample=Image.Resampling.BILINEAR)


# --- photos -------------------------------------------------------------------------------
class AlignedFace(NamedTuple):
    """One face of a photo: its index (largest first), the face in the full photo's pixels,
    and the aligned frame (RGB) or why it could not be aligned."""

    index: int
    face: Face
    image: Image.Image | None
    error: FaceError | None


@dataclass
class PhotoFaces:
    """The faces of one photo: aligned (or not, with a reason), and how many were left out
    for being smaller than min_face."""

    faces: list[AlignedFace] = field(default_factory=list)
    small: int = 0


class Aligner:
    """A model card's alignment on this device: the detector (hashes checked) and the warp."""

    def __init__(self, spec: AlignmentSpec, directory: str | Path, threads: int = 1) -> None:
        problems = spec.problems()
        if problems:
            raise ModelIntegrityError("; ".join(problems))
        self.spec = spec
        self.detector = FaceDetector(spec.detector, directory, threads=threads)

    def align(self, img: Image.Image, face: Face, where: str = "face") -> Image.Image:
        return warp(img, face_transform(face.landmarks, self.spec, where), tuple(self.spec.frame))

    def centre_face(self, img: Image.Image, name: str = "photo") -> Image.Image:
        """The aligned face nearest the centre of an upright image (a data set's crop, whose
        labels describe that face); FaceError when there is none or it cannot be aligned."""
        faces = self.detector.detect(img)
        if not faces:
            raise FaceError(f"{name}: no face found")
        c = np.array(img.size, np.float64)
        face = min(faces, key=lambda f: float(np.abs(f.box[:2] + f.box[2:] - c).sum()))
        return self.align(img, face, name)

    def photo(self, source: str | Path | bytes | BinaryIO, name: str | None = None, *,
              max_pixels: int | None = None, which: str = "all", min_face: float = 0.0,
              detail: float = 1.0) -> PhotoFaces:
        """Every face of a photo (or the largest: which="largest"), aligned. Faces whose box
        is smaller than min_face photo pixels are counted, not aligned. ImageError for a
        photo that cannot be decoded (protocol.preprocess.load_image).

        `detail`: the fraction of the frame's resolution the caller keeps (a model card's
        input pixels per frame pixel, model_detail; 1: all of it). Each face is cut from
        the smallest decode that still has CUT_MARGIN pixels per kept pixel: the reduced
        decode made for detection when the face is large enough in it, else the smallest
        JPEG draft scale (1/4, 1/2) or the full decode that is, each made at most once."""
        from protocol.preprocess import MAX_PIXELS, load_image

        label = name or (str(source) if isinstance(source, (str, Path)) else "<bytes>")
        limit = max_pixels or MAX_PIXELS
        if isinstance(source, (str, Path)):
            source = Path(source).read_bytes()
        # reduced-scale decode (JPEG draft) whose longest side is still ≥ DETECT_DRAFT_MIN
        full_size = _full_size(source)
        decoded = load_image(source, _draft_spec(full_size, DETECT_DRAFT_MIN), max_pixels=limit, name=label)
        det, r, zoom = decoded, 1.0, 1.0
        if max(decoded.size) > DETECT_SIDE:
            r = DETECT_SIDE / max(decoded.size)
            det = decoded.resize((max(1, round(decoded.width * r)), max(1, round(decoded.height * r))),
                                 Image.Resampling.BOX)
        elif full_size and max(full_size) > DETECT_SIDE:
            # a draft a little smaller than DETECT_SIDE (a 4000 px photo's 1/4: 1000 px) is
            # searched as if it were DETECT_SIDE px (its pyramid made from it at those scales,
            # no enlarged copy), so the smallest face found, in the photo's pixels, stays
            # min_face * longest side / DETECT_SIDE
            zoom = DETECT_SIDE / max(decoded.size)
        kx = full_size[0] / decoded.width if full_size else 1.0  # full photo px per decoded px
        # the decodes made so far: their width → the image (the first is the detection's)
        decodes = {decoded.width: decoded}
        keep = min(1.0, max(float(detail), 1e-3)) * CUT_MARGIN
        out = PhotoFaces()
        for face in self.detector.detect(det, zoom):
            if which == "largest" and out.faces:
                break
            face = Face(face.box / r, face.score, face.landmarks / r).scaled(kx)  # in full-photo pixels
            if face.size < min_face:
                out.small += 1
                continue
            where = f"face {len(out.faces) + 1}"
            try:
                sim = face_transform(face.landmarks, self.spec, where)  # checked in photo pixels
                img = decoded
                if full_size and sim.scale * keep * full_size[0] > decoded.width:
                    # too few pixels in the detection's decode: the smallest draft that has enough
                    need = _draft_spec(full_size, math.ceil(sim.scale * keep * max(full_size)))
                    width = _draft_width(full_size, source, need)
                    if width not in decodes:
                        decodes[width] = load_image(source, need, max_pixels=limit, name=label)
                    img = decodes[width]
                k = img.width / full_size[0] if full_size else 1.0  # source px per full-photo px
                aligned = warp(img, face_transform(face.landmarks * k, self.spec, where), tuple(self.spec.frame))
                out.faces.append(AlignedFace(len(out.faces), face, aligned, None))
            except FaceError as exc:
                out.faces.append(AlignedFace(len(out.faces), face, None, exc))
        return out


def card_aligner(card: Any, model_dir: str | Path) -> "Aligner | None":
    """The aligner a model card asks for (its detector files beside the model), None for a
    card without an alignment section: what the client, the audit and data loaders share."""
    return None if card.alignment is None else Aligner(card.alignment, model_dir)


# `--align` of both trainers (pric-train features and sparse)
ALIGN_HELP = ("face detector folder (e.g. exported_models/face-detector): train on each photo's face found and "
              "aligned to the CelebA template (protocol.align), as the client sends it; the exported card states "
              "the alignment")


def training_aligner(detector_dir: str | Path | None) -> "Aligner | None":
    """`--align DETECTOR_DIR` of the trainers: the CelebA alignment with that detector (None: none)."""
    return None if not detector_dir else Aligner(default_alignment(detector_dir), detector_dir)


def attach_training_alignment(card: Any, detector_dir: str | Path | None, model_dir: str | Path) -> Any:
    """The exported card of a run trained with `--align DETECTOR_DIR`: it states the alignment
    and its detector's files ship (and are attested) with the model. Unchanged without one."""
    return card if not detector_dir else attach(card, default_alignment(detector_dir), detector_dir, model_dir)


def model_detail(frame: tuple[int, int], spec: Any) -> float:
    """A model card's input pixels per frame pixel (protocol.model_card.InputSpec: its
    crop_box of the frame resized to height x width), the larger of the two axes."""
    left, top, right, bottom = spec.crop_box
    return max(spec.width / max((right - left) * frame[0], 1e-9), spec.height / max((bottom - top) * frame[1], 1e-9))


def _draft_spec(size: tuple[int, int] | None, side: int = DETECT_SIDE) -> Any:
    """What load_image's reduced-scale decode is asked for: the longest side ≥ `side`
    whatever the aspect (None: decode as it is). Asked as a square of the shorter side's
    share, so that a photo stored turned (EXIF orientation, compared in its stored
    orientation by the JPEG draft) gets the same scale as an upright one."""
    from protocol.model_card import InputSpec

    if size is None or max(size) <= side:
        return None
    short = max(1, math.ceil(min(size) * side / max(size)))
    return InputSpec(height=short, width=short, crop_box=(0.0, 0.0, 1.0, 1.0))


def _draft_width(size: tuple[int, int], source: bytes, spec: Any) -> int:
    """The upright width load_image(source, spec) decodes to, from the header alone: a
    JPEG draft is 1/1, 1/2, 1/4 or 1/8 of the stored size, asked for as load_image asks;
    other formats are decoded whole."""
    import io

    from protocol.preprocess import _needed_size

    if spec is None:
        return size[0]
    with Image.open(io.BytesIO(source)) as im:
        if im.format not in ("JPEG", "MPO"):
            return size[0]
        turned = im.size != size
        im.draft("RGB", _needed_size(im.size, spec))
        return im.size[1] if turned else im.size[0]


def _full_size(source: bytes) -> tuple[int, int] | None:
    """The photo's upright size from its header (no decode); None when unreadable here
    (load_image then reports it)."""
    import io

    try:
        with Image.open(io.BytesIO(source)) as im:
            w, h = im.size
            if im.getexif().get(0x0112, 1) in (5, 6, 7, 8):
                w, h = h, w
            return w, h
    except Exception:  # noqa: BLE001 - any unreadable photo is load_image's to report
        return None


def attach(card: Any, spec: AlignmentSpec, detector_dir: str | Path | None = None,
           model_dir: str | Path | None = None) -> Any:
    """The card with this alignment, the detector's files added to its extra_files (so they
    are fetched, verified and attested with the model); with both folders, the files are
    copied from detector_dir into model_dir."""
    import dataclasses
    import shutil

    if detector_dir is not None and model_dir is not None:
        for name in spec.detector.files:
            shutil.copyfile(Path(detector_dir) / name, Path(model_dir) / name)
    return dataclasses.replace(card, alignment=spec,
                               extra_files={**card.extra_files, **spec.detector.files}).validate()
