"""Face detection with five landmarks, defined once: MTCNN (P-, R-, O-Net, exported to ONNX
by training/detector) run through protocol.runtime.OnnxModel, with its pre- and
post-processing here in numpy and Pillow.

    upright RGB photo ─► image pyramid (P-Net windows of 12 px cover faces ≥ min_face px)
        ─► P-Net on every level: face probability + box regression per window
        ─► NMS per level (IoU 0.5), NMS over levels (0.7), regression, square boxes
        ─► R-Net on 24x24 crops: score, NMS (0.7), regression, square boxes
        ─► O-Net on 48x48 crops: score, 5 landmarks, regression, NMS (0.7, over the smaller box)
        → [Face(box, score, landmarks (5, 2))]   (left eye, right eye, nose, mouth left,
                                                  mouth right; "left" = image left)

The detector's files and settings are a `DetectorSpec`: shipped with its own card
(`detector_card.json` in exported_models/face-detector), and copied into the alignment
section of an extractor's model card (protocol.align), where the attestation binds them.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from collections.abc import Iterator
from typing import Any, NamedTuple

import numpy as np
from PIL import Image

from protocol.errors import ModelIntegrityError

DETECTOR_CARD_FILE = "detector_card.json"
DETECTOR_FILES = ("pnet.onnx", "rnet.onnx", "onet.onnx")
LANDMARKS = ("left_eye", "right_eye", "nose", "mouth_left", "mouth_right")
# Bounds on what a card may ask of the detector (a card comes from the collector).
MIN_FACE_RANGE = (12, 4096)
# Candidates handed from one stage to the next at most: a photo of noise or of a crowd
# cannot make the R-/O-Net run on an unbounded number of crops.
MAX_CANDIDATES = 2000
# the last NMS drops a box lying inside a better one (MTCNN's "min" overlap: face parts),
# unless its area is below this fraction of the other's (measured on research/scenes.py:
# plain "min" lost 24 of 608 faces pasted over a blurred large face; IoU alone kept a second
# box on 1.5% of the test crops; this bound neither)
NESTED_FACE = 1 / 9
_SHA256_HEX = frozenset("0123456789abcdef")


@dataclass(frozen=True)
class DetectorSpec:
    """The detector's files (name → sha256) and settings."""

    name: str
    version: str
    files: dict[str, str]
    thresholds: tuple[float, float, float] = (0.6, 0.7, 0.7)
    factor: float = 0.709  # pyramid: each level is this much smaller than the previous
    min_face: int = 20     # smallest face searched, pixels of the detection image
    landmarks: tuple[str, ...] = LANDMARKS

    @property
    def model_id(self) -> str:
        return f"{self.name}@{self.version}"

    def problems(self) -> list[str]:
        """What is wrong with this spec (empty: valid). Types before values: hostile cards."""
        from protocol.model_card import FILE_RE, NAME_RE

        out: list[str] = []
        for what, value in (("name", self.name), ("version", self.version)):
            if not isinstance(value, str) or not NAME_RE.fullmatch(value):
                out.append(f"detector {what} {str(value)[:40]!r} is not a valid name")
        if not isinstance(self.files, dict) or set(self.files) != set(DETECTOR_FILES):
            out.append(f"detector files must be exactly {list(DETECTOR_FILES)}")
        else:
            for f, digest in self.files.items():
                if not (isinstance(f, str) and FILE_RE.fullmatch(f)):
                    out.append(f"detector file {str(f)[:40]!r} must be a bare file name")
                if not (isinstance(digest, str) and len(digest) == 64 and set(digest) <= _SHA256_HEX):
                    out.append(f"detector file {str(f)[:40]}: sha256 must be 64 lowercase hex digits")
        t = self.thresholds
        if not (isinstance(t, (tuple, list)) and len(t) == 3 and all(_finite(v) and 0 < v < 1 for v in t)):
            out.append("detector thresholds must be 3 numbers in (0, 1)")
        if not (_finite(self.factor) and 0.3 <= self.factor <= 0.9):
            out.append("detector factor must be a number in [0.3, 0.9]")
        lo, hi = MIN_FACE_RANGE
        if not (isinstance(self.min_face, int) and not isinstance(self.min_face, bool) and lo <= self.min_face <= hi):
            out.append(f"detector min_face must be an integer in [{lo}, {hi}]")
        if tuple(self.landmarks) != LANDMARKS:
            out.append(f"detector landmarks must be {list(LANDMARKS)}")
        return out

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Any) -> "DetectorSpec":
        if not isinstance(d, dict):
            raise ModelIntegrityError("detector section must be a JSON object")
        try:
            spec = cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})
        except TypeError as exc:
            raise ModelIntegrityError(f"detector section is malformed: {str(exc)[:200]}") from None
        return spec


def _finite(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@dataclass(frozen=True)
class DetectorCard:
    """`detector_card.json`: the detector's spec, where its weights come from, a description."""

    spec: DetectorSpec
    source: dict[str, Any] = field(default_factory=dict)
    description: str = ""

    def validate(self) -> "DetectorCard":
        problems = self.spec.problems()
        if not isinstance(self.source, dict) or not isinstance(self.description, str):
            problems.append("source must be an object and description text")
        if problems:
            raise ModelIntegrityError("detector card: " + "; ".join(problems))
        return self

    def to_json(self) -> str:
        return json.dumps({"detector": self.spec.to_dict(), "source": self.source,
                           "description": self.description}, indent=2, sort_keys=True)

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / DETECTOR_CARD_FILE
        path.write_text(self.to_json() + "\n")
        return path

    @classmethod
    def load(cls, directory: str | Path) -> "DetectorCard":
        path = Path(directory) / DETECTOR_CARD_FILE
        try:
            d = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise ModelIntegrityError(f"{path}: cannot read detector card ({type(exc).__name__})") from None
        if not isinstance(d, dict):
            raise ModelIntegrityError(f"{path}: detector card must be a JSON object")
        return cls(spec=DetectorSpec.from_dict(d.get("detector")), source=d.get("source", {}),
                   description=d.get("description", "")).validate()


class Face(NamedTuple):
    """One detected face in the coordinates of the image it was found in."""

    box: np.ndarray        # float (4,): x1, y1, x2, y2
    score: float
    landmarks: np.ndarray  # float (5, 2): x, y of LANDMARKS

    @property
    def size(self) -> float:
        """The box's longer side, pixels."""
        return float(max(self.box[2] - self.box[0], self.box[3] - self.box[1]))

    def scaled(self, k: float) -> "Face":
        """The same face in an image k times larger."""
        return Face(self.box * k, self.score, self.landmarks * k)


# --- post-processing, numpy ---------------------------------------------------------------
def nms(boxes: np.ndarray, scores: np.ndarray, threshold: float, method: str = "union",
        nested: float = 0.0) -> np.ndarray:
    """Greedy non-maximum suppression: indices of the kept boxes, best score first. A box
    is dropped when its overlap with a kept one exceeds `threshold`; overlap is IoU
    ("union") or intersection over the smaller box ("min"). With "min", a box whose area
    is below `nested` times the other's is never dropped for lying inside it (a small face
    inside a large face's box is another face, not a part of it). Boxes are x1, y1, x2, y2
    inclusive pixel corners (MTCNN's convention: area = (x2 - x1 + 1)(y2 - y1 + 1))."""
    if len(boxes) == 0:
        return np.zeros(0, dtype=np.int64)
    x1, y1, x2, y2 = (boxes[:, i].astype(np.float64) for i in range(4))
    area = (x2 - x1 + 1) * (y2 - y1 + 1)
    order = np.argsort(-np.asarray(scores, np.float64), kind="stable")
    keep = []
    while order.size:
        i, rest = order[0], order[1:]
        keep.append(i)
        w = np.maximum(0.0, np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]) + 1)
        h = np.maximum(0.0, np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]) + 1)
        inter = w * h
        if method == "min":
            small, large = np.minimum(area[i], area[rest]), np.maximum(area[i], area[rest])
            overlap = np.where(small >= nested * large, inter / small, inter / (area[i] + area[rest] - inter))
        else:
            overlap = inter / (area[i] + area[rest] - inter)
        order = rest[overlap <= threshold]
    return np.asarray(keep, dtype=np.int64)


def pyramid_scales(height: float, width: float, min_face: int, factor: float) -> list[float]:
    """Scales of the image pyramid: at the first, a min_face face is 12 px (P-Net's window);
    each next level is `factor` smaller, down to a shorter side of 12 px."""
    m = 12.0 / min_face
    side = min(height, width) * m
    scales = []
    while side >= 12:
        scales.append(m * factor ** len(scales))
        side *= factor
    return scales


def windows_to_boxes(out: np.ndarray, scale: float, threshold: float) -> np.ndarray:
    """P-Net output of one level (5, H', W') → candidate boxes (K, 9): x1, y1, x2, y2 in the
    original image, score, and the 4 regression offsets. Window (i, j) covers pixels
    [2j, 2j + 12) x [2i, 2i + 12) of the scaled image (stride 2, 12 px cells)."""
    prob = out[4]
    ii, jj = np.nonzero(prob >= threshold)
    if ii.size == 0:
        return np.zeros((0, 9), np.float32)
    q1x, q1y = np.floor((2 * jj + 1) / scale), np.floor((2 * ii + 1) / scale)
    q2x, q2y = np.floor((2 * jj + 12) / scale), np.floor((2 * ii + 12) / scale)
    reg = out[:4, ii, jj].T
    return np.column_stack([q1x, q1y, q2x, q2y, prob[ii, jj], reg]).astype(np.float32)


def regress(boxes: np.ndarray, reg: np.ndarray, plus_one: bool = True) -> np.ndarray:
    """Boxes moved by the regression offsets (fractions of the box's width and height)."""
    w = boxes[:, 2] - boxes[:, 0] + (1 if plus_one else 0)
    h = boxes[:, 3] - boxes[:, 1] + (1 if plus_one else 0)
    out = boxes.copy()
    out[:, 0] += reg[:, 0] * w
    out[:, 1] += reg[:, 1] * h
    out[:, 2] += reg[:, 2] * w
    out[:, 3] += reg[:, 3] * h
    return out


def square(boxes: np.ndarray) -> np.ndarray:
    """Each box made square around its centre, side = its longer side."""
    out = boxes.copy()
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    side = np.maximum(w, h)
    out[:, 0] = boxes[:, 0] + w * 0.5 - side * 0.5
    out[:, 1] = boxes[:, 1] + h * 0.5 - side * 0.5
    out[:, 2] = out[:, 0] + side
    out[:, 3] = out[:, 1] + side
    return out


def crops(img: Image.Image, boxes: np.ndarray, size: int) -> np.ndarray:
    """float32 (K, 3, size, size): each box's pixels [x1 - 1, x2] x [y1 - 1, y2] (MTCNN's
    1-based corners, truncated to integers), zero outside the image, resized (box filter)."""
    out = np.zeros((len(boxes), size, size, 3), np.uint8)
    for k, (x1, y1, x2, y2) in enumerate(np.trunc(boxes[:, :4]).astype(np.int64)):
        left, top, right, bottom = x1 - 1, y1 - 1, max(x2, x1), max(y2, y1)
        # PIL fills the part of a crop outside the image with zeros, as MTCNN's padding does.
        # (Image.resize(box=...) without the crop is 15% cheaper here but not the same
        # pixels: up to 110 levels apart on some crops, measured)
        patch = img.crop((int(left), int(top), int(right), int(bottom)))
        out[k] = np.asarray(patch.resize((size, size), Image.Resampling.BOX))
    return out.transpose(0, 3, 1, 2).astype(np.float32)


def pyramid(img: Image.Image, scales: list[float]) -> Iterator[tuple[float, np.ndarray]]:
    """(scale, float32 (1, 3, H, W)) of each pyramid level, largest first. Each level is
    resized (box filter) from the one before it rather than from the photo: a 1024x768
    detection image's 11 levels read 1.4 M pixels instead of 8.7 M."""
    w, h = img.size
    prev = img
    for scale in scales:
        prev = prev.resize((int(w * scale + 1), int(h * scale + 1)), Image.Resampling.BOX)
        # one pass from uint8 HWC to float32 CHW (no float HWC copy in between)
        yield scale, np.ascontiguousarray(np.asarray(prev).transpose(2, 0, 1)[None], dtype=np.float32)


class FaceDetector:
    """The detector of a DetectorSpec, its files read from `directory` and checked against
    the spec's sha256 before onnxruntime sees them (the bytes checked are the bytes run)."""

    def __init__(self, spec: DetectorSpec, directory: str | Path, threads: int = 1) -> None:
        from protocol.runtime import OnnxModel

        problems = spec.problems()
        if problems:
            raise ModelIntegrityError(f"detector {spec.model_id}: " + "; ".join(problems))
        self.spec = spec
        nets = []
        for file in DETECTOR_FILES:
            path = Path(directory) / file
            try:
                graph = path.read_bytes()
            except OSError as exc:
                raise ModelIntegrityError(f"{path}: cannot read detector file ({exc.strerror or exc})") from None
            if hashlib.sha256(graph).hexdigest() != spec.files[file]:
                raise ModelIntegrityError(f"{path}: sha256 differs from the card's; refusing to use "
                                          f"detector {spec.model_id}")
            nets.append(OnnxModel(path, threads=threads, graph=graph))
        self.pnet, self.rnet, self.onet = nets

    def detect(self, img: Image.Image, zoom: float = 1.0) -> list[Face]:
        """Faces in an upright RGB image, largest first (ties: higher score). `zoom`: the
        image is searched as if enlarged this much (its pyramid covers faces from
        min_face / zoom of its pixels), the faces are given in its own pixels."""
        t1, t2, t3 = self.spec.thresholds
        w, h = img.size
        # stage 1: P-Net over the pyramid
        found = []
        scales = [s * zoom for s in pyramid_scales(h * zoom, w * zoom, self.spec.min_face, self.spec.factor)]
        for scale, level in pyramid(img, scales):
            out = self.pnet(level)[0]
            boxes = windows_to_boxes(out, scale, t1)
            found.append(boxes[nms(boxes[:, :4], boxes[:, 4], 0.5)])
        boxes = np.concatenate(found) if found else np.zeros((0, 9), np.float32)
        boxes = boxes[nms(boxes[:, :4], boxes[:, 4], 0.7)][:MAX_CANDIDATES]
        if len(boxes) == 0:
            return []
        boxes = square(regress(boxes[:, :5], boxes[:, 5:9], plus_one=False))
        # stage 2: R-Net
        out = self.rnet(crops(img, boxes, 24))
        keep = out[:, 4] > t2
        boxes = np.column_stack([boxes[keep, :4], out[keep, 4]])
        reg = out[keep, :4]
        pick = nms(boxes[:, :4], boxes[:, 4], 0.7)[:MAX_CANDIDATES]
        if len(pick) == 0:
            return []
        boxes = square(regress(boxes[pick], reg[pick]))
        # stage 3: O-Net, landmarks
        out = self.onet(crops(img, boxes, 48))
        keep = out[:, 14] > t3
        if not keep.any():
            return []
        boxes = np.column_stack([np.trunc(boxes[keep, :4]), out[keep, 14]])
        out = out[keep]
        bw = boxes[:, 2] - boxes[:, 0] + 1
        bh = boxes[:, 3] - boxes[:, 1] + 1
        xs = bw[:, None] * out[:, 4:9] + boxes[:, 0:1] - 1
        ys = bh[:, None] * out[:, 9:14] + boxes[:, 1:2] - 1
        points = np.stack([xs, ys], axis=2)
        boxes = regress(boxes, out[:, :4])
        pick = nms(boxes[:, :4], boxes[:, 4], 0.7, method="min", nested=NESTED_FACE)
        faces = [Face(boxes[i, :4].astype(np.float64), float(boxes[i, 4]), points[i].astype(np.float64))
                 for i in pick]
        faces.sort(key=lambda f: (-f.size, -f.score))
        return faces
