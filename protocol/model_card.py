"""The model card: everything a client needs to run a released model, and what it was
trained and audited for. Stored as `model_card.json` beside `model.onnx`.

Nothing downstream hard-codes preprocessing or shapes: they are read from here.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from protocol.errors import ModelIntegrityError

if TYPE_CHECKING:
    from protocol.align import AlignmentSpec

CARD_FILE = "model_card.json"
CARD_SCHEMA_VERSION = 1
KINDS = ("features", "sparse_code")
RESIZE_FILTERS = ("nearest", "bilinear", "bicubic", "lanczos", "box")
DTYPES = ("float32", "float16")

# Bounds of what a card may ask of a participant's device. A card comes from the collector,
# which participants are protected from: without bounds a card asking for a 100000x100000
# input made the client allocate until it died in Image.resize.
MAX_CARD_BYTES = 256 * 1024         # the card's JSON (shipped cards: 1.7-2.8 KB)
MAX_INPUT_SIDE = 1024               # input height and width, pixels (shipped: 64)
MAX_OUTPUT_DIMS = 6
MAX_OUTPUT_ELEMENTS = 1 << 20       # values per photo: 4 MiB of float32, half an upload body
MAX_SPARSE_M = 1 << 16              # code length: indices travel as uint16
MAX_SPARSE_ELEMENTS = 1 << 20       # L * m
MAX_EXTRA_FILES = 8
MAX_TEXT = 100_000                  # description, characters
# model names and versions end up in file names (<home>/models/<name>@<version>) and on the wire
MAX_NAME = 64
NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]{0,%d}" % (MAX_NAME - 1))
FILE_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
SHA256_RE = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class InputSpec:
    """How a photo becomes the model's input.

    `crop_box` is relative (left, top, right, bottom) in [0, 1] of the upright image.
    Pixel values are scaled to [0, 1] then normalised by (x - mean) / std per channel.
    `dtype` says where that normalisation happens:
      "uint8"   the graph takes the prepared pixels, uint8 (N, H, W, 3) in `channel_order`,
                and normalises inside (what pric-export writes: the file a device runs,
                and the auditor runs, is the whole transform after resizing);
      "float32" the graph takes the normalised tensor float32 (N, 3, H, W) (older exports;
                the runner normalises with protocol.preprocess.normalize first).
    """

    height: int = 64
    width: int = 64
    channel_order: str = "RGB"
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    crop_box: tuple[float, float, float, float] = (0.0, 20 / 218, 1.0, 198 / 218)
    resize_filter: str = "bilinear"
    name: str = "image"
    dtype: str = "float32"


# Bits per released sparse value (sign + companded level): the card accepts and the codec
# (protocol.sparse_code) packs exactly this range; finer grids than 10 bits would not
# survive the float16 values on the wire.
VALUE_BITS_RANGE = (2, 10)
INPUT_DTYPES = ("uint8", "float32")


@dataclass(frozen=True)
class OutputSpec:
    """The released array of one photo (batch dimension excluded)."""

    name: str = "feature"
    shape: tuple[int, ...] = (16, 8, 8)
    dtype: str = "float32"


@dataclass(frozen=True)
class SparseSpec:
    """Parameters of a `sparse_code` model: L code maps of length m, k kept values,
    k_fake fake non-zeros added by ambiguation (k' = k + k_fake).

    `value_bits` (optional): the client quantises the true values to a sign and a
    (value_bits - 1)-bit companded magnitude against a per-photo scale before ambiguation,
    and the fakes are drawn on the same grid (`protocol.sparse_code.quantise_code`); the
    compact true code (`pack_compact`) then spends value_bits bits per non-zero. None (the
    default, and every card written before the field existed): float16 values."""

    L: int
    m: int
    k: int
    k_fake: int
    value_bits: int | None = None
    # optional (absent in older cards): `decoys` names the decoy bank shipped in extra_files
    # (protocol.sparse_code.DecoyBank; the client draws fakes from it instead of uniform
    # positions); `wire` "compact" sends the ambiguated code as one uint8 array `code`
    # (protocol.sparse_code.pack_ambiguated, needs value_bits) instead of indices + values
    decoys: str | None = None
    wire: str | None = None
    # `magnitudes` "key": every released entry shows a public magnitude (the decoys file is
    # then protocol.sparse_code.CodeDecoys, whose profile gives them) and the true
    # magnitudes travel in the owner's key (version 2); needs value_bits and decoys
    magnitudes: str | None = None

    @property
    def k_prime(self) -> int:
        return self.k + self.k_fake


@dataclass(frozen=True)
class ModelCard:
    name: str
    version: str
    sha256: str
    kind: str = "features"
    file: str = "model.onnx"
    input: InputSpec = field(default_factory=InputSpec)
    output: OutputSpec = field(default_factory=OutputSpec)
    sparse: SparseSpec | None = None
    # extra files shipped with the model (e.g. {"decoder.onnx": sha256}) for authorised users
    extra_files: dict[str, str] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    audit: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    card_schema_version: int = CARD_SCHEMA_VERSION
    # optional (protocol.align): photos are turned into faces found by the named detector and
    # aligned to the template's frame before crop_box and resize; its files are extra_files
    # (so the attestation binds them). None: the relative crop_box of the whole photo.
    alignment: "AlignmentSpec | None" = None

    @property
    def model_id(self) -> str:
        """Stable identifier used on the wire: `name@version`."""
        return f"{self.name}@{self.version}"

    # --- validation -----------------------------------------------------------------
    def validate(self) -> "ModelCard":
        """Raise ModelIntegrityError listing every problem. Types are checked before values,
        so a hostile card (strings for numbers, nested lists, huge sizes) gets one line, not a
        TypeError or an allocation."""
        problems: list[str] = []
        for what, value in (("name", self.name), ("version", self.version)):
            if isinstance(value, str) and len(value) > MAX_NAME:
                problems.append(f"{what} {_short(value)} is longer than {MAX_NAME} characters")
            elif not isinstance(value, str) or not NAME_RE.fullmatch(value):
                problems.append(f"{what} {_short(value)} must be letters, digits, '_', '.', '+', '-' "
                                "(not starting with '.', '+' or '-')")
        if not isinstance(self.sha256, str) or not SHA256_RE.fullmatch(self.sha256):
            problems.append("sha256 must be 64 lowercase hex digits")
        if not isinstance(self.kind, str) or self.kind not in KINDS:
            problems.append(f"kind {_short(self.kind)} not in {KINDS}")
        if self.kind == "sparse_code" and self.sparse is None:
            problems.append("kind 'sparse_code' needs a 'sparse' section")
        if self.sparse is not None:
            problems += _sparse_problems(self.sparse)
            decoys = getattr(self.sparse, "decoys", None)
            if decoys is not None and (not isinstance(decoys, str) or decoys not in (self.extra_files or {})):
                problems.append(f"sparse.decoys {_short(decoys)} must name one of the card's extra_files")
        problems += _input_problems(self.input) + _output_problems(self.output)
        if not isinstance(self.file, str) or not FILE_RE.fullmatch(self.file):
            problems.append(f"file {_short(self.file)} must be a bare file name")
        if not isinstance(self.extra_files, dict) or len(self.extra_files) > MAX_EXTRA_FILES:
            problems.append(f"extra_files must map at most {MAX_EXTRA_FILES} file names to sha256")
        else:
            for extra, digest in self.extra_files.items():
                if not isinstance(extra, str) or not FILE_RE.fullmatch(extra) or extra == self.file:
                    problems.append(f"extra file {_short(extra)} must be a bare file name other than the model's")
                if not isinstance(digest, str) or not SHA256_RE.fullmatch(digest):
                    problems.append(f"extra file {_short(extra)}: sha256 must be 64 lowercase hex digits")
        if not isinstance(self.training, dict) or not isinstance(self.audit, dict):
            problems.append("training and audit must be JSON objects")
        if not isinstance(self.description, str) or len(self.description) > MAX_TEXT:
            problems.append(f"description must be text of at most {MAX_TEXT} characters")
        if not _is_int(self.card_schema_version):
            problems.append("card_schema_version must be an integer")
        if self.alignment is not None:
            problems += _alignment_problems(self.alignment, self.extra_files)
        if problems:
            raise ModelIntegrityError(f"model card {_short(self.name)}: " + "; ".join(problems))
        return self

    # --- (de)serialisation ------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["model_id"] = self.model_id
        for opt in ("value_bits", "decoys", "wire", "magnitudes"):
            if d.get("sparse") and d["sparse"].get(opt) is None:
                del d["sparse"][opt]  # cards without these fields read (and hash) as before
        if self.alignment is None:
            del d["alignment"]  # cards without alignment read, hash and attest as before
        else:
            d["alignment"] = self.alignment.to_dict()
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelCard":
        try:
            d = dict(d)
            d.pop("model_id", None)
            inp = d.pop("input", {}) or {}
            out = d.pop("output", {}) or {}
            sp = d.pop("sparse", None)
            al = d.pop("alignment", None)
            if al is not None:
                from protocol.align import AlignmentSpec

                d["alignment"] = AlignmentSpec.from_dict(al)
            card = cls(
                input=InputSpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in inp.items()}),
                output=OutputSpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in out.items()}),
                sparse=SparseSpec(**sp) if sp else None,
                **d,
            )
        except (TypeError, ValueError, AttributeError) as exc:
            raise ModelIntegrityError(f"model card is malformed: {str(exc)[:200]}") from None
        return card.validate()

    @classmethod
    def from_json(cls, text: str) -> "ModelCard":
        if len(text) > MAX_CARD_BYTES:
            raise ModelIntegrityError(f"model card is larger than {MAX_CARD_BYTES} bytes")
        try:
            d = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ModelIntegrityError(f"model card is not valid JSON: {exc}") from None
        except RecursionError:
            raise ModelIntegrityError("model card is not valid JSON: nested too deeply") from None
        if not isinstance(d, dict):
            raise ModelIntegrityError("model card must be a JSON object")
        return cls.from_dict(d)

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / CARD_FILE
        path.write_text(self.to_json() + "\n")
        return path


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _numbers(x: object, n: int) -> bool:
    return isinstance(x, (tuple, list)) and len(x) == n and all(_is_number(v) for v in x)


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _input_problems(i: object) -> list[str]:
    if not isinstance(i, InputSpec):
        return ["input must be an object"]
    problems = []
    if not (_is_int(i.height) and _is_int(i.width) and 1 <= i.height <= MAX_INPUT_SIDE and 1 <= i.width <= MAX_INPUT_SIDE):
        problems.append(f"input size {_short(i.height)}x{_short(i.width)} must be integers in 1..{MAX_INPUT_SIDE}")
    if i.channel_order not in ("RGB", "BGR"):
        problems.append(f"channel_order {_short(i.channel_order)} must be RGB or BGR")
    if not (_numbers(i.mean, 3) and _numbers(i.std, 3)) or any(s <= 0 for s in i.std):
        problems.append("mean/std must have 3 finite entries, std > 0")
    if not _numbers(i.crop_box, 4):
        problems.append("crop_box must be 4 finite numbers")
    else:
        l, t, r, b = i.crop_box
        if not (0 <= l < r <= 1 and 0 <= t < b <= 1):
            problems.append(f"crop_box {i.crop_box} must satisfy 0<=left<right<=1, 0<=top<bottom<=1")
    if not isinstance(i.resize_filter, str) or i.resize_filter not in RESIZE_FILTERS:
        problems.append(f"resize_filter {_short(i.resize_filter)} not in {RESIZE_FILTERS}")
    if not isinstance(i.name, str) or not 1 <= len(i.name) <= 128:
        problems.append("input name must be 1-128 characters")
    if i.dtype not in INPUT_DTYPES:
        problems.append(f"input dtype {_short(i.dtype)} not in {INPUT_DTYPES}")
    return problems


def _alignment_problems(a: object, extra_files: object) -> list[str]:
    from protocol.align import AlignmentSpec

    if not isinstance(a, AlignmentSpec):
        return ["alignment must be an object"]
    problems = a.problems()
    if not problems and isinstance(extra_files, dict):
        for name, digest in a.detector.files.items():
            # the detector's files travel, are verified and are attested as the model's own
            if extra_files.get(name) != digest:
                problems.append(f"alignment: detector file {name} must be in extra_files with the same sha256")
    return problems


def _output_problems(o: object) -> list[str]:
    if not isinstance(o, OutputSpec):
        return ["output must be an object"]
    problems = []
    if not isinstance(o.dtype, str) or o.dtype not in DTYPES:
        problems.append(f"output dtype {_short(o.dtype)} not in {DTYPES}")
    shape = o.shape
    if not isinstance(shape, (tuple, list)) or not 1 <= len(shape) <= MAX_OUTPUT_DIMS \
            or not all(_is_int(d) and d >= 1 for d in shape):
        problems.append(f"output shape must be 1-{MAX_OUTPUT_DIMS} positive integers")
    elif math.prod(shape) > MAX_OUTPUT_ELEMENTS:
        problems.append(f"output shape {tuple(shape)} has more than {MAX_OUTPUT_ELEMENTS} values")
    if not isinstance(o.name, str) or not 1 <= len(o.name) <= 128:
        problems.append("output name must be 1-128 characters")
    return problems


def _sparse_problems(sp: object) -> list[str]:
    if not isinstance(sp, SparseSpec):
        return ["sparse must be an object"]
    L, m, k, k_fake = sp.L, sp.m, sp.k, sp.k_fake
    if not all(_is_int(v) for v in (L, m, k, k_fake)):
        return ["sparse L, m, k, k_fake must be integers"]
    problems = []
    if not (1 <= L and 1 <= m <= MAX_SPARSE_M and L * m <= MAX_SPARSE_ELEMENTS):
        problems.append(f"sparse L={L}, m={m} must be positive with m <= {MAX_SPARSE_M} and L*m <= {MAX_SPARSE_ELEMENTS}")
    if not (1 <= k <= m and 0 <= k_fake <= m - k):
        problems.append(f"sparse k={k}, k_fake={k_fake} must satisfy 1 <= k and k + k_fake <= m={m}")
    vb, (lo, hi) = sp.value_bits, VALUE_BITS_RANGE
    if vb is not None and (not _is_int(vb) or not lo <= vb <= hi):
        problems.append(f"sparse.value_bits {vb!r} must be an integer in [{lo}, {hi}] or absent")
    wire = getattr(sp, "wire", None)
    if wire is not None and wire not in SPARSE_WIRE_FORMATS:
        problems.append(f"sparse.wire {_short(wire)} must be one of {SPARSE_WIRE_FORMATS} or absent")
    elif wire == "compact" and vb is None:
        problems.append("sparse.wire 'compact' needs sparse.value_bits")
    mags = getattr(sp, "magnitudes", None)
    if mags is not None and mags not in SPARSE_MAGNITUDES:
        problems.append(f"sparse.magnitudes {_short(mags)} must be one of {SPARSE_MAGNITUDES} or absent")
    elif mags == "key" and (vb is None or getattr(sp, "decoys", None) is None or k_fake % k):
        problems.append("sparse.magnitudes 'key' needs sparse.value_bits, sparse.decoys and k_fake a multiple of k")
    return problems


SPARSE_WIRE_FORMATS = ("compact",)
SPARSE_MAGNITUDES = ("key",)


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def load_card(model_dir: str | Path, verify: bool = True) -> ModelCard:
    """Read `model_dir/model_card.json`; with `verify`, check the sha256 of every file."""
    model_dir = Path(model_dir)
    card_path = model_dir / CARD_FILE
    if not card_path.is_file():
        raise ModelIntegrityError(f"{card_path}: no model card found")
    card = ModelCard.from_json(card_path.read_text())
    if verify:
        verify_model_files(card, model_dir)
    return card


def verify_model_files(card: ModelCard, model_dir: str | Path) -> None:
    """Raise ModelIntegrityError unless each file matches the sha256 the card states."""
    model_dir = Path(model_dir)
    for name, expected in [(card.file, card.sha256), *card.extra_files.items()]:
        path = model_dir / name
        if not path.is_file():
            raise ModelIntegrityError(f"{path}: file named by the model card is missing")
        actual = sha256_file(path)
        if actual != expected:
            raise ModelIntegrityError(
                f"{path}: sha256 {actual[:12]}… does not match the card's {expected[:12]}…"
            )


def wire_arrays(card: ModelCard) -> dict[str, tuple[tuple[int, ...], str]]:
    """Names, shapes and dtypes of the arrays one uploaded item carries for this model."""
    if card.kind == "sparse_code":
        assert card.sparse is not None
        if card.sparse.wire == "compact":
            from protocol.sparse_code import ambiguated_size  # sparse_code imports this module

            return {"code": ((ambiguated_size(card.sparse),), "uint8")}
        shape = (card.sparse.L, card.sparse.k_prime)
        return {"indices": (shape, "uint16"), "values": (shape, "float16")}
    return {card.output.name: (tuple(card.output.shape), card.output.dtype)}
