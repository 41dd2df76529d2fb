from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
from PIL import Image

from protocol import SCHEMA_VERSION
from protocol.errors import (
    ImageError,
    ImageTooLargeError,
    KeyMismatchError,
    ModelIntegrityError,
    SchemaVersionError,
    ValidationError,
    WireFormatError,
    error_from_json,
)
from protocol.model_card import InputSpec, ModelCard, SparseSpec, load_card, sha256_bytes, wire_arrays
from protocol.preprocess import load_image, normalize, prepare, preprocess
from protocol.sparse_code import (
    SparseCodeError,
    ambiguate,
    disambiguate,
    key_entropy_bits,
    key_size_bytes,
    top_k,
    unpack_key,
    validate_code,
)
from protocol.wire import (
    BINARY_CONTENT_TYPE,
    JSON_CONTENT_TYPE,
    UploadBatch,
    UploadItem,
    array_to_npy,
    decode_batch,
    decode_batch_binary,
    decode_upload,
    encode_batch,
    encode_batch_binary,
    npy_to_array,
)

SHA = "a" * 64


def _card(**kw) -> ModelCard:
    return ModelCard(name="m", version="1", sha256=SHA, **kw)


# --- model card ---------------------------------------------------------------------
def test_card_round_trip_and_model_id():
    card = _card(training={"private": ["Male"]}, audit={"Male": 0.6})
    again = ModelCard.from_json(card.to_json())
    assert again == card
    assert again.model_id == "m@1"


def test_card_rejects_bad_fields():
    with pytest.raises(ModelIntegrityError, match="sha256"):
        ModelCard(name="m", version="1", sha256="xyz").validate()
    with pytest.raises(ModelIntegrityError, match="crop_box"):
        _card(input=InputSpec(crop_box=(0.5, 0, 0.4, 1))).validate()
    with pytest.raises(ModelIntegrityError, match="sparse"):
        _card(kind="sparse_code").validate()
    with pytest.raises(ModelIntegrityError, match="not valid JSON"):
        ModelCard.from_json("{")


def test_load_card_verifies_sha(tmp_path):
    (tmp_path / "model.onnx").write_bytes(b"onnx bytes")
    card = ModelCard(name="m", version="1", sha256=sha256_bytes(b"onnx bytes"))
    card.save(tmp_path)
    assert load_card(tmp_path).sha256 == card.sha256
    (tmp_path / "model.onnx").write_bytes(b"tampered")
    with pytest.raises(ModelIntegrityError, match="does not match"):
        load_card(tmp_path)


def test_wire_arrays_for_both_kinds():
    assert wire_arrays(_card()) == {"feature": ((16, 8, 8), "float32")}
    sparse = _card(kind="sparse_code", sparse=SparseSpec(L=4, m=32, k=4, k_fake=4))
    assert wire_arrays(sparse) == {"indices": ((4, 8), "uint16"), "values": ((4, 8), "float16")}


# --- preprocessing ------------------------------------------------------------------
def _jpeg(w: int, h: int, color=(200, 30, 30), mode="RGB", fmt="JPEG", **save) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (w, h), color).save(buf, fmt, **save)
    return buf.getvalue()


def test_preprocess_shape_range_and_determinism(sample_images):
    spec = InputSpec()
    x = preprocess(sample_images[0], spec)
    assert x.shape == (3, 64, 64) and x.dtype == np.float32
    assert -1.0 <= x.min() and x.max() <= 1.0
    assert np.array_equal(x, preprocess(sample_images[0].read_bytes(), spec))


@pytest.mark.parametrize("order", ["RGB", "BGR"])
def test_prepare_equals_numpy_of_the_cropped_resized_image(order: str):
    """prepare takes the RGB bytes straight from Pillow: the same array as np.asarray."""
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (109, 89, 3), dtype=np.uint8))
    spec = InputSpec(channel_order=order)
    got = prepare(img, spec)
    w, h = img.size
    l, t, r, b = spec.crop_box
    want = np.asarray(img.resize((spec.width, spec.height), Image.Resampling.BILINEAR,
                                 box=(0, round(t * h), w, round(b * h))), dtype=np.uint8)
    want = want[..., ::-1] if order == "BGR" else want
    assert got.shape == (spec.height, spec.width, 3) and got.flags.c_contiguous
    np.testing.assert_array_equal(got, want)


def test_normalize_values():
    spec = InputSpec(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    px = np.full((2, 2, 3), 255, np.uint8)
    assert np.allclose(normalize(px, spec), 1.0)
    assert normalize(np.zeros((5, 2, 2, 3), np.uint8), spec).shape == (5, 3, 2, 2)


def test_exif_orientation_is_applied():
    img = Image.new("RGB", (40, 20), (0, 0, 0))
    img.paste((255, 255, 255), (0, 0, 20, 20))  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW on display
    buf = io.BytesIO()
    img.save(buf, "JPEG", exif=exif.tobytes())
    out = load_image(buf.getvalue())
    assert out.size == (20, 40)
    arr = np.asarray(out)
    assert arr[:10].mean() > 200 and arr[30:].mean() < 50  # white ends up on top


def test_modes_become_rgb():
    for mode, color in [("L", 128), ("RGBA", (0, 0, 0, 0)), ("CMYK", (0, 0, 0, 0)), ("P", 3)]:
        fmt = "JPEG" if mode == "CMYK" else "PNG"
        img = load_image(_jpeg(8, 8, color, mode=mode, fmt=fmt))
        assert img.mode == "RGB"
    # a fully transparent pixel is composited on white
    assert np.asarray(load_image(_jpeg(4, 4, (0, 0, 0, 0), mode="RGBA", fmt="PNG"))).min() == 255


def test_bad_images_give_one_line_errors(tmp_path):
    good = _jpeg(64, 64)
    (tmp_path / "trunc.jpg").write_bytes(good[: len(good) // 2])
    (tmp_path / "notes.txt").write_text("hello")
    for name in ("trunc.jpg", "notes.txt", "missing.jpg"):
        with pytest.raises(ImageError) as exc:
            load_image(tmp_path / name)
        assert name in str(exc.value) and "\n" not in str(exc.value)


@pytest.mark.slow
def test_decompression_bomb_refused():
    buf = io.BytesIO()
    Image.new("1", (20000, 20000)).save(buf, "PNG")  # 400 Mpx, a few KB on disk
    with pytest.raises(ImageTooLargeError):
        load_image(buf.getvalue(), name="bomb.png")


def test_draft_mode_large_jpeg_matches_small_closely():
    rng = np.random.default_rng(0)
    small = (rng.random((109, 89, 3)) * 255).astype(np.uint8)
    big = Image.fromarray(small).resize((89 * 20, 109 * 20), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    big.save(buf, "JPEG", quality=95)
    spec = InputSpec()
    x = prepare(load_image(buf.getvalue(), spec), spec)
    assert x.shape == (64, 64, 3)
    img = load_image(buf.getvalue(), spec)
    assert img.width < big.width  # decoded at reduced scale


# --- wire format --------------------------------------------------------------------
def _batch(n=3) -> UploadBatch:
    rng = np.random.default_rng(1)
    return UploadBatch(
        model_id="m@1",
        model_sha256=SHA,
        items=[UploadItem(f"id-{i}", {"feature": rng.standard_normal((4, 2)).astype(np.float32)}, {"Smiling": i % 2}) for i in range(n)],
    )


def test_wire_round_trip():
    batch = _batch()
    again = decode_batch(encode_batch(batch))
    assert again.model_id == batch.model_id and again.schema_version == SCHEMA_VERSION
    for a, b in zip(again.items, batch.items):
        assert a.item_id == b.item_id and a.labels == b.labels
        assert np.array_equal(a.arrays["feature"], b.arrays["feature"])


def test_wire_rejects_pickles_and_bad_values():
    obj_arr = np.array([{"a": 1}], dtype=object)
    buf = io.BytesIO()
    np.save(buf, obj_arr, allow_pickle=True)
    with pytest.raises(WireFormatError):
        npy_to_array(buf.getvalue())
    with pytest.raises(ValidationError, match="NaN"):
        npy_to_array(array_to_npy(np.array([1.0, np.nan], np.float32)))
    with pytest.raises(ValidationError, match="dtype"):
        npy_to_array(array_to_npy(np.array([1.0], np.float64)))


@pytest.mark.parametrize(
    "mutate, err",
    [
        (lambda o: o.update(schema_version=99), SchemaVersionError),
        (lambda o: o.update(items=[]), WireFormatError),
        (lambda o: o["items"][0].update(item_id="../etc"), WireFormatError),
        (lambda o: o["items"][1].update(item_id=o["items"][0]["item_id"]), WireFormatError),
        (lambda o: o["items"][0]["arrays"].update(feature="!!!"), WireFormatError),
        (lambda o: o["items"][0]["labels"].update(Smiling=7), ValidationError),
        (lambda o: o.update(model_sha256="XYZ"), WireFormatError),
    ],
)
def test_wire_rejects_malformed(mutate, err):
    obj = json.loads(encode_batch(_batch()))
    mutate(obj)
    with pytest.raises(err):
        decode_batch(json.dumps(obj))


def test_binary_wire_round_trip_matches_json():
    batch = UploadBatch(model_id="m@1", model_sha256=SHA, items=[
        UploadItem(f"id-{i}", {"indices": np.arange(6, dtype=np.uint16).reshape(2, 3) + i,
                               "values": np.full((2, 3), i + 0.5, np.float16)}, {"Smiling": i % 2, "Male": 1})
        for i in range(4)])
    body = encode_batch_binary(batch)
    assert len(body) < len(encode_batch(batch))
    for again in (decode_batch_binary(body), decode_upload(body, BINARY_CONTENT_TYPE),
                  decode_upload(encode_batch(batch), JSON_CONTENT_TYPE)):
        assert (again.model_id, again.model_sha256) == (batch.model_id, batch.model_sha256)
        for a, b in zip(again.items, batch.items, strict=True):
            assert a.item_id == b.item_id and a.labels == b.labels and set(a.arrays) == set(b.arrays)
            for name in b.arrays:
                assert a.arrays[name].dtype == b.arrays[name].dtype
                assert np.array_equal(a.arrays[name], b.arrays[name])


def test_binary_wire_refuses_items_with_different_arrays():
    batch = _batch(2)
    for odd in (UploadItem("odd", {"feature": np.zeros((4, 3), np.float32)}),  # shape
                UploadItem("odd", {"feature": np.zeros((4, 2), np.float64)}),  # dtype: never cast silently
                UploadItem("odd", {"feature": np.zeros((4, 2), np.float32), "extra": np.zeros(1, np.uint8)})):
        with pytest.raises(ValueError, match="same arrays"):
            encode_batch_binary(UploadBatch(batch.model_id, batch.model_sha256, [*batch.items, odd]))


def _binary_with_header(edit) -> bytes:
    body = encode_batch_binary(_batch(3))
    n = int.from_bytes(body[5:9], "little")
    head = json.loads(body[9:9 + n])
    edit(head)
    new = json.dumps(head).encode()
    return body[:5] + len(new).to_bytes(4, "little") + new + body[9 + n:]


@pytest.mark.parametrize(
    "make, err, match",
    [
        (lambda b: b"JUNK" + b[4:], WireFormatError, "not a PRIC binary batch"),
        (lambda b: b[:-1], WireFormatError, "truncated"),
        (lambda b: b + b"\0", WireFormatError, "after its last array"),
        (lambda b: b[:5] + (10**7).to_bytes(4, "little") + b[9:], WireFormatError, "header length"),
        (lambda b: b[:9] + b"[" + b[10:], WireFormatError, "not valid JSON"),
        (lambda b: _binary_with_header(lambda h: h.update(schema_version=2)), SchemaVersionError, "schema_version"),
        (lambda b: _binary_with_header(lambda h: h["arrays"][0].update(dtype="float64")), ValidationError, "float64"),
        (lambda b: _binary_with_header(lambda h: h["arrays"][0].update(shape=[4, -2])), WireFormatError, "shape"),
        (lambda b: _binary_with_header(lambda h: h["arrays"].append(dict(h["arrays"][0]))), WireFormatError, "distinct"),
        (lambda b: _binary_with_header(lambda h: h["items"][1].update(item_id="id-0")), WireFormatError, "twice"),
        (lambda b: _binary_with_header(lambda h: h["items"].pop()), WireFormatError, "after its last array"),
    ],
)
def test_binary_wire_rejects_malformed(make, err, match):
    with pytest.raises(err, match=match):
        decode_batch_binary(make(encode_batch_binary(_batch(3))))


def test_binary_wire_names_the_item_with_a_nan():
    batch = _batch(3)
    batch.items[2].arrays["feature"][1, 1] = np.inf
    with pytest.raises(ValidationError, match=r"items\[2\]\.arrays\.feature"):
        decode_batch_binary(encode_batch_binary(batch))


def test_error_from_json_maps_codes():
    e = error_from_json(409, {"error": "unknown_model", "message": "retired"})
    assert type(e).__name__ == "UnknownModelError" and e.message == "retired"


# --- sparse codes -------------------------------------------------------------------
SPEC = SparseSpec(L=8, m=128, k=16, k_fake=16)


def _code(seed=0):
    return top_k(np.random.default_rng(seed).standard_normal((SPEC.L, SPEC.m)).astype(np.float32), SPEC.k)


def test_ambiguate_round_trip_and_key_size():
    code = _code()
    amb, key = ambiguate(code, SPEC)
    validate_code(amb.indices, amb.values, SPEC)
    assert len(key) == key_size_bytes(SPEC)
    assert key_size_bytes(SPEC) * 8 < key_entropy_bits(SPEC) + 8 * 17 + SPEC.L * 8  # near the bound
    assert np.allclose(disambiguate(amb, key, SPEC.m), code, atol=1e-2)
    assert np.count_nonzero(amb.to_dense(SPEC.m)) == SPEC.L * SPEC.k_prime


def test_ambiguation_uses_fresh_randomness():
    code = _code()
    a1, _ = ambiguate(code, SPEC)
    a2, _ = ambiguate(code, SPEC)
    assert not np.array_equal(a1.indices, a2.indices)


def test_magnitude_ranking_gains_nothing():
    """Keeping the k smallest (or largest) magnitudes must recover ~k/k' of the support."""
    spec = SparseSpec(L=16, m=256, k=64, k_fake=64)
    rng = np.random.default_rng(0)
    hits_small, hits_large, total = 0, 0, 0
    for s in range(20):
        code = top_k(rng.standard_normal((spec.L, spec.m)).astype(np.float32) * rng.gamma(2, 1, (spec.L, 1)), spec.k)
        amb, key = ambiguate(code, spec, rng)
        mask, _, _ = unpack_key(key)
        order = np.argsort(np.abs(amb.values.astype(np.float32)), axis=1)
        small = np.take_along_axis(mask, order[:, : spec.k], axis=1)
        large = np.take_along_axis(mask, order[:, -spec.k :], axis=1)
        hits_small += small.sum(); hits_large += large.sum(); total += small.size
    chance = spec.k / spec.k_prime
    assert abs(hits_small / total - chance) < 0.03
    assert abs(hits_large / total - chance) < 0.03


def test_wrong_key_refused():
    amb1, key1 = ambiguate(_code(1), SPEC)
    amb2, key2 = ambiguate(_code(2), SPEC)
    with pytest.raises(KeyMismatchError, match="fingerprint"):
        disambiguate(amb2, key1, SPEC.m)
    with pytest.raises(KeyMismatchError, match="version"):
        disambiguate(amb1, key1[:2] + b"\x09" + key1[3:], SPEC.m)
    with pytest.raises(KeyMismatchError, match="bytes"):
        disambiguate(amb1, key1[:-1], SPEC.m)


def test_validate_code_rejects_out_of_range():
    amb, _ = ambiguate(_code(), SPEC)
    bad = amb.indices.copy()
    bad[0, -1] = SPEC.m + 3
    with pytest.raises(SparseCodeError, match="out of range"):
        validate_code(bad, amb.values, SPEC)
    assert SparseCodeError("x").http_status == 400


@pytest.mark.parametrize("k_fake", [11, 22])
def test_extreme_magnitudes_are_true_only_at_chance(k_fake):
    """The largest and the smallest magnitude of a map, and the k largest, are true at k/k'."""
    spec = SparseSpec(L=4, m=256, k=11, k_fake=k_fake)
    rng = np.random.default_rng(1)
    top_hits, max_true, min_true, n_maps = 0, 0, 0, 0
    for _ in range(300):
        scale = rng.gamma(2, 1, (spec.L, 1))
        code = top_k(rng.standard_normal((spec.L, spec.m)).astype(np.float32) * scale, spec.k)
        amb, key = ambiguate(code, spec, rng)
        mask, _, _ = unpack_key(key)
        order = np.argsort(np.abs(amb.values.astype(np.float32)), axis=1, kind="stable")
        ranked = np.take_along_axis(mask, order, axis=1)
        top_hits += ranked[:, -spec.k:].sum()
        max_true += ranked[:, -1].sum()
        min_true += ranked[:, 0].sum()
        n_maps += spec.L
    chance = spec.k / spec.k_prime
    assert abs(top_hits / (n_maps * spec.k) - chance) < 0.02
    assert abs(max_true / n_maps - chance) < 0.06
    assert abs(min_true / n_maps - chance) < 0.06
