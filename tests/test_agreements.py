"""Places where two roles must agree, pinned: what a model is trained, exported and audited
on is what a participant's device computes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from protocol.model_card import VALUE_BITS_RANGE, InputSpec, ModelCard, SparseSpec, load_card
from protocol.preprocess import load_image, normalize, prepare, preprocess
from protocol.sparse_code import pack_compact, unpack_compact

REPO = Path(__file__).resolve().parents[1]
SPECS = [
    InputSpec(),
    InputSpec(channel_order="BGR", mean=(0.40, 0.45, 0.50), std=(0.20, 0.25, 0.30)),
]


@pytest.mark.parametrize("spec", SPECS, ids=["rgb", "bgr"])
def test_training_inputs_are_exactly_what_the_client_feeds_the_model(spec: InputSpec, sample_faces: Path) -> None:
    """The training loader (prepared pixels → training.data.to_input) and the client
    (protocol.preprocess.preprocess of the photo file) give identical tensors, also for a
    BGR card (the channel order is applied once, by prepare)."""
    torch = pytest.importorskip("torch")
    from training.data import to_input

    files = sorted((sample_faces / "images").iterdir())[:8]
    prepared = np.stack([prepare(load_image(f, spec), spec) for f in files])

    trained_on = to_input(torch.from_numpy(prepared), spec).numpy()
    client_sends = np.stack([preprocess(f, spec) for f in files])

    assert np.array_equal(trained_on, client_sends)
    assert np.array_equal(trained_on, normalize(prepared, spec))


def test_a_bgr_card_reverses_the_channels_once(sample_faces: Path) -> None:
    rgb, bgr = SPECS[0], InputSpec(channel_order="BGR")
    img = load_image(next((sample_faces / "images").iterdir()), rgb)

    assert np.array_equal(prepare(img, bgr), prepare(img, rgb)[..., ::-1])


@pytest.mark.parametrize("bits", range(0, 13))
def test_the_card_accepts_exactly_the_value_bits_the_codec_packs(bits: int) -> None:
    sparse = SparseSpec(L=2, m=16, k=3, k_fake=3, value_bits=bits)
    card = ModelCard(name="s", version="1", sha256="0" * 64, kind="sparse_code",
                     input=InputSpec(), sparse=sparse)
    code = np.zeros((2, 16), np.float32)
    code[:, :3] = [[0.5, -0.25, 1.0], [0.1, 0.2, -0.3]]
    lo, hi = VALUE_BITS_RANGE

    card_ok = _accepts(card.validate)
    codec_ok = _accepts(lambda: unpack_compact(pack_compact(code, 3, bits, 1.0), sparse))

    assert card_ok == codec_ok == (lo <= bits <= hi)


def _accepts(fn) -> bool:  # noqa: ANN001
    try:
        fn()
    except Exception:  # noqa: BLE001 - either side refusing is what is compared
        return False
    return True


def test_the_auditor_runs_a_shipped_model_exactly_as_the_client_does(sample_faces: Path) -> None:
    """audit.releases.OnnxRelease and the client's pipeline (uint8 pixels into the graph with
    the normalisation inside) give the same features for the collector's default model."""
    from audit.releases import OnnxRelease
    from client.pipeline import Extractor

    model_dir = REPO / "exported_models" / "pric-male"
    card = load_card(model_dir)
    files = sorted((sample_faces / "images").iterdir())[:16]
    pixels = np.stack([prepare(load_image(f, card.input), card.input) for f in files])

    audited = OnnxRelease(model_dir, card)(pixels)
    on_device = Extractor(card, model_dir, threads=1).transform(pixels)

    assert audited.shape == on_device.shape == (16, *card.output.shape)
    np.testing.assert_allclose(audited, on_device, rtol=0, atol=1e-4)
