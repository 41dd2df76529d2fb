"""Model fetch, cache and integrity check (the onnxruntime runner is protocol.runtime).

The current model card comes from the collector; its files are cached under
`<home>/models/<model_id>/` and their sha256 is checked against the card before every
use (protocol.model_card.verify_model_files). A cached file that does not match is
refused, never silently replaced.
"""

from __future__ import annotations

from pathlib import Path


from client.api import CollectorAPI
from client.home import Home
from protocol.errors import InvalidInputError, ModelIntegrityError
from protocol.model_card import CARD_FILE, ModelCard, load_card, verify_model_files
from protocol.runtime import OnnxModel

__all__ = ["OnnxModel", "fetch_model", "find_cached_model", "open_model_dir"]



def fetch_model(api: CollectorAPI, home: Home) -> tuple[ModelCard, Path]:
    """The collector's current model, cached in home and verified. Returns (card, dir)."""
    card = api.model_card()
    model_dir = home.model_dir(card.model_id)
    cached_card = model_dir / CARD_FILE
    if cached_card.is_file():
        old = ModelCard.from_json(cached_card.read_text())
        if (old.sha256, old.extra_files) != (card.sha256, card.extra_files):
            raise ModelIntegrityError(
                f"{model_dir}: the collector's card for {card.model_id} states other file hashes than the cached one; "
                "refusing (remove that folder to accept the collector's)"
            )
    model_dir.mkdir(parents=True, exist_ok=True)
    for name in [card.file, *card.extra_files]:
        if not (model_dir / name).exists():
            tmp = model_dir / (name + ".part")
            try:
                api.model_file(card, name, tmp)  # streamed, size-capped, sha256-checked
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
            tmp.replace(model_dir / name)
    card.save(model_dir)
    return open_model_dir(model_dir), model_dir


def open_model_dir(model_dir: str | Path) -> ModelCard:
    """Card of a local model folder, after checking every file's sha256 (refuses on mismatch)."""
    model_dir = Path(model_dir)
    card = load_card(model_dir, verify=False)
    try:
        verify_model_files(card, model_dir)
    except ModelIntegrityError as exc:
        raise ModelIntegrityError(f"{exc.message}; refusing to use model {card.model_id}") from None
    return card


def find_cached_model(home: Home, model_id: str | None = None) -> Path:
    """A cached model folder: the one named, else the only one, else the newest."""
    if model_id:
        path = home.model_dir(model_id)
        if not (path / CARD_FILE).is_file():
            raise InvalidInputError(f"{path}: model {model_id} is not cached; pass --model-dir or run upload once")
        return path
    dirs = sorted(
        (d for d in home.models_dir.glob("*") if (d / CARD_FILE).is_file()),
        key=lambda d: (d / CARD_FILE).stat().st_mtime,
    )
    if not dirs:
        raise InvalidInputError(f"{home.models_dir}: no cached model; pass --model-dir DIR or run upload once")
    return dirs[-1]
