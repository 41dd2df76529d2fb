"""The model card: everything a client needs to run a released model, and what it was
trained and audited for. Stored as `model_card.json` beside `model.onnx`.

Nothing downstream hard-codes preprocessing or shapes: they are read from here.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from protocol.errors import ModelIntegrityError

CARD_FILE = "model_card.json"
CARD_SCHEMA_VERSION = 1
KINDS = ("features", "sparse_code")
RESIZE_FILTERS = ("nearest", "bilinear", "bicubic", "lanczos", "box")
DTYPES = ("float32", "float16")


@dataclass(frozen=True)
class InputSpec:
    """How a photo becomes the model's input tensor (1, 3, H, W).

    `crop_box` is relative (left, top, right, bottom) in [0, 1] of the upright image.
    Pixel values are scaled to [0, 1] then normalised by (x - mean) / std per channel.
    """

    height: int = 64
    width: int = 64
    channel_order: str = "RGB"
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    crop_box: tuple[float, float, float, float] = (0.0, 20 / 218, 1.0, 198 / 218)
    resize_filter: str = "bilinear"
    name: str = "image"


# Bits per released sparse value (sign + companded level): the card accepts and the codec
# (protocol.sparse_code) packs exactly this range; finer grids than 10 bits would not
# survive the float16 values on the wire.
VALUE_BITS_RANGE = (2, 10)


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

    @property
    def model_id(self) -> str:
        """Stable identifier used on the wire: `name@version`."""
        return f"{self.name}@{self.version}"

    # --- validation -----------------------------------------------------------------
    def validate(self) -> "ModelCard":
        problems = []
        if not self.name or "@" in self.name or "/" in self.name:
            problems.append(f"name {self.name!r} must be non-empty without '@' or '/'")
        if not self.version or "@" in self.version or "/" in self.version:
            problems.append(f"version {self.version!r} must be non-empty without '@' or '/'")
        if len(self.sha256) != 64 or any(c not in "0123456789abcdef" for c in self.sha256):
            problems.append("sha256 must be 64 lowercase hex digits")
        if self.kind not in KINDS:
            problems.append(f"kind {self.kind!r} not in {KINDS}")
        if self.kind == "sparse_code" and self.sparse is None:
            problems.append("kind 'sparse_code' needs a 'sparse' section")
        vb = self.sparse.value_bits if self.sparse is not None else None
        lo, hi = VALUE_BITS_RANGE
        if vb is not None and (isinstance(vb, bool) or not isinstance(vb, int) or not lo <= vb <= hi):
            problems.append(f"sparse.value_bits {vb!r} must be an integer in [{lo}, {hi}] or absent")
        i = self.input
        if i.height <= 0 or i.width <= 0:
            problems.append("input size must be positive")
        if i.channel_order not in ("RGB", "BGR"):
            problems.append(f"channel_order {i.channel_order!r} must be RGB or BGR")
        if len(i.mean) != 3 or len(i.std) != 3 or any(s <= 0 for s in i.std):
            problems.append("mean/std must have 3 entries, std > 0")
        l, t, r, b = i.crop_box
        if not (0 <= l < r <= 1 and 0 <= t < b <= 1):
            problems.append(f"crop_box {i.crop_box} must satisfy 0<=left<right<=1, 0<=top<bottom<=1")
        if i.resize_filter not in RESIZE_FILTERS:
            problems.append(f"resize_filter {i.resize_filter!r} not in {RESIZE_FILTERS}")
        if self.output.dtype not in DTYPES:
            problems.append(f"output dtype {self.output.dtype!r} not in {DTYPES}")
        if not self.output.shape or any(int(d) <= 0 for d in self.output.shape):
            problems.append("output shape must be non-empty and positive")
        if Path(self.file).name != self.file:
            problems.append(f"file {self.file!r} must be a bare file name")
        for extra in self.extra_files:
            if Path(extra).name != extra:
                problems.append(f"extra file {extra!r} must be a bare file name")
        if problems:
            raise ModelIntegrityError(f"model card {self.name!r}: " + "; ".join(problems))
        return self

    # --- (de)serialisation ------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["model_id"] = self.model_id
        if d.get("sparse") and d["sparse"].get("value_bits") is None:
            del d["sparse"]["value_bits"]  # cards without quantised values read as before
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
            card = cls(
                input=InputSpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in inp.items()}),
                output=OutputSpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in out.items()}),
                sparse=SparseSpec(**sp) if sp else None,
                **d,
            )
        except (TypeError, ValueError) as exc:
            raise ModelIntegrityError(f"model card is malformed: {exc}") from None
        return card.validate()

    @classmethod
    def from_json(cls, text: str) -> "ModelCard":
        try:
            d = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ModelIntegrityError(f"model card is not valid JSON: {exc}") from None
        if not isinstance(d, dict):
            raise ModelIntegrityError("model card must be a JSON object")
        return cls.from_dict(d)

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / CARD_FILE
        path.write_text(self.to_json() + "\n")
        return path


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
        shape = (card.sparse.L, card.sparse.k_prime)
        return {"indices": (shape, "uint16"), "values": (shape, "float16")}
    return {card.output.name: (tuple(card.output.shape), card.output.dtype)}
