"""The learned no-key attacker on ambiguated sparse codes (audit.sparse_attacks), on a
synthetic linear encoder/decoder where the answer is known."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from audit.quality import image_quality
from audit.sparse import dense_from_mask, support_guess
from audit.sparse_attacks import format_attack_table, learned_support_attack, top_k_mask
from protocol.model_card import SparseSpec
from protocol.sparse_code import ambiguate

H = W = 8
SPEC = SparseSpec(L=2, m=32, k=4, k_fake=12)


class LinearPair:
    """A stand-in for audit.sparse.OnnxPair: code = P · pixels, image = sigmoid(P^T · code).
    `favoured` positions of every map get rows `boost` times larger, so their magnitudes
    are usually among the k largest: the true support is predictable from position."""

    def __init__(self, boost: float, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.P = rng.normal(0, 1, (SPEC.L * SPEC.m, H * W * 3)) / np.sqrt(H * W * 3)
        favoured = np.concatenate([np.arange(6) + l * SPEC.m for l in range(SPEC.L)])
        self.P[favoured] *= boost

    def encode(self, pixels: np.ndarray) -> np.ndarray:
        x = pixels.reshape(len(pixels), -1).astype(np.float32) / 255.0 - 0.5
        return (x @ self.P.T).reshape(len(pixels), SPEC.L, SPEC.m).astype(np.float32)

    def decode(self, codes: np.ndarray) -> np.ndarray:
        y = codes.reshape(len(codes), -1) @ self.P
        return (1 / (1 + np.exp(-4 * y))).reshape(len(codes), H, W, 3).astype(np.float32)


def _photos(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, H, W, 3), dtype=np.uint8)


def _attack(pair: LinearPair, tmp_path: Path | None, n_train: int = 60, n_test: int = 12) -> dict:
    rng = np.random.default_rng(1)
    test = _photos(n_test, 2)
    ambs, keys = zip(*(ambiguate(c, SPEC, rng) for c in pair.encode(test)))
    ref = test.astype(np.float32) / 255.0
    guess = [support_guess(a, SPEC.k, "random", rng) for a in ambs]
    random_rec = pair.decode(np.stack([dense_from_mask(a, g, SPEC.m) for a, g in zip(ambs, guess)]))
    baseline = {"random": image_quality(ref, random_rec), "authorised": image_quality(ref, np.clip(ref + 0.01, 0, 1)),
                "images": [random_rec], "image_names": ["random guess"]}
    return learned_support_attack(pair, SimpleNamespace(sparse=SPEC), _photos(n_train, 3), list(ambs), list(keys),
                                  ref, rng, baseline=baseline, out_dir=tmp_path, quick=True)


@pytest.mark.slow
def test_a_support_predictable_from_position_is_found_and_fails_the_verdicts(tmp_path: Path) -> None:
    att = _attack(LinearPair(boost=4.0), tmp_path)

    chance = SPEC.k / SPEC.k_prime
    assert att["chance"] == chance
    assert att["precision"]["position_prior"] > chance + 0.3
    assert att["best_precision"] > chance + 0.3
    assert not att["precision_within_chance_plus_2pts"]
    assert (tmp_path / att["grid"]).stat().st_size > 0
    assert "| per-position frequency of true entries alone |" in format_attack_table(att)


@pytest.mark.slow
def test_a_precision_is_a_share_of_the_true_entries_kept(tmp_path: Path) -> None:
    att = _attack(LinearPair(boost=1.0), None)

    units = att["n_test"] * SPEC.L * SPEC.k
    for p in att["precision"].values():
        assert 0.0 <= p <= 1.0 and p * units == pytest.approx(round(p * units), abs=1e-6)
    assert "grid" not in att


def test_too_few_training_photos_are_not_measured() -> None:
    att = learned_support_attack(LinearPair(1.0), SimpleNamespace(sparse=SPEC), _photos(3, 0), [], [],
                                 np.zeros((0, H, W, 3)), np.random.default_rng(0), baseline={})

    assert att == {"measured": False, "reason": "3 training photos (need 6)"}
    assert "not measured" in format_attack_table(att)


def test_top_k_mask_keeps_k_per_map() -> None:
    s = np.array([[0.1, 0.9, 0.5, 0.3], [4.0, 3.0, 2.0, 1.0]])

    assert top_k_mask(s, 2).tolist() == [[False, True, True, False], [True, True, False, False]]


class TwinMapsPair:
    """Every map holds the same code: the true supports coincide across maps while each
    map's positions are uniform. Only a model over the whole code can see it; the
    per-position frequency is at chance."""

    def encode(self, pixels: np.ndarray) -> np.ndarray:
        x = pixels.reshape(len(pixels), -1)[:, :SPEC.m].astype(np.float32) / 255.0 - 0.5
        return np.repeat(x[:, None, :], SPEC.L, axis=1).astype(np.float32)

    def decode(self, codes: np.ndarray) -> np.ndarray:
        y = codes.reshape(len(codes), -1)
        reps = -(-H * W * 3 // y.shape[1])
        return np.tile(1 / (1 + np.exp(-y)), reps)[:, :H * W * 3].reshape(len(codes), H, W, 3).astype(np.float32)


@pytest.mark.slow
def test_the_whole_code_network_finds_supports_that_co_occur_across_maps() -> None:
    pair, spec = TwinMapsPair(), SparseSpec(L=2, m=32, k=4, k_fake=4)
    rng = np.random.default_rng(1)
    test = _photos(40, 2)
    ambs, keys = zip(*(ambiguate(c, spec, rng) for c in pair.encode(test)))
    ref = test.astype(np.float32) / 255.0
    guess = [support_guess(a, spec.k, "random", rng) for a in ambs]
    random_rec = pair.decode(np.stack([dense_from_mask(a, g, spec.m) for a, g in zip(ambs, guess)]))
    base = {"random": image_quality(ref, random_rec), "authorised": image_quality(ref, ref)}
    att = learned_support_attack(pair, SimpleNamespace(sparse=spec), _photos(2500, 3), list(ambs), list(keys), ref,
                                 rng, baseline=base, quick=True, net_epochs=20)

    chance = spec.k / spec.k_prime
    assert att["precision"]["position_prior"] < chance + 0.1
    assert att["precision"]["whole_code_net"] > chance + 0.15
    lo, hi = att["precision_ci95"]["whole_code_net"]
    assert lo <= att["precision"]["whole_code_net"] <= hi
    assert "| network over the whole code |" in format_attack_table(att)


def _low_rank_codes(n: int, rank: int, seed: int) -> np.ndarray:
    """Codes c = W h (h ~ N(0, I_rank)) of SPEC's shape: what an encoder whose last layer
    is linear produces before its top-k."""
    rng = np.random.default_rng(seed)
    w = np.random.default_rng(99).normal(0, 1, (SPEC.L * SPEC.m, rank))
    return (rng.normal(0, 1, (n, rank)) @ w.T).reshape(n, SPEC.L, SPEC.m).astype(np.float32)


def _em_precision(train: np.ndarray, test: np.ndarray) -> float:
    from audit.sparse_attacks import CodeModel
    from protocol.sparse_code import top_k, unpack_key

    model = CodeModel(train, rank=64)
    rng = np.random.default_rng(5)
    hits = []
    for c in test:
        amb, key = ambiguate(top_k(c, SPEC.k), SPEC, rng)
        flat = np.zeros(amb.indices.shape)
        logit = model.refine(amb, SPEC.k, None, prior_logit=flat, start=flat)
        truth = unpack_key(key)[0]
        hits.append((top_k_mask(logit, SPEC.k) & truth).sum() / truth.sum())
    return float(np.mean(hits))


def test_the_code_model_finds_the_support_of_a_low_rank_code_and_not_of_a_full_rank_one() -> None:
    # 4 latent dimensions behind 64 code values (8 of them true): the true values must fit
    # one latent point and every other position must stay below the k-th magnitude; fakes
    # break both
    low = _em_precision(_low_rank_codes(2000, 4, 0), _low_rank_codes(40, 4, 1))
    # 64 independent values: nothing ties one position to another, the EM is at chance
    full = _em_precision(_low_rank_codes(2000, 64, 0), _low_rank_codes(40, 64, 1))

    chance = SPEC.k / SPEC.k_prime
    assert low > 0.75
    assert full < chance + 0.15


def test_the_dense_code_is_read_below_the_encoders_top_k(tmp_path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper

    from audit.sparse_attacks import dense_code_graph
    from protocol.runtime import OnnxModel

    w = np.random.default_rng(0).normal(0, 1, (3, 6)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["dense"]), helper.make_node("Abs", ["dense"], ["mag"]),
             helper.make_node("TopK", ["mag", "k"], ["top", "idx"], axis=-1)]
    graph = helper.make_graph(nodes, "enc", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])],
                              [helper.make_tensor_value_info("idx", TensorProto.INT64, [1, 2])],
                              [helper.make_tensor("w", TensorProto.FLOAT, w.shape, w.ravel()),
                               helper.make_tensor("k", TensorProto.INT64, [1], [2])])
    path = tmp_path / "enc.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)

    blob, name = dense_code_graph(path)
    x = np.array([[1.0, -2.0, 0.5]], np.float32)

    assert name == "dense"  # the signed code, not its magnitudes
    np.testing.assert_allclose(OnnxModel(path, "x", name, graph=blob)(x), x @ w, rtol=1e-5)


def _noisy_start(truth: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Scores that rank the true entries first only now and then (about half the top k true)."""
    return np.where(truth, 1.0, 0.0) + rng.normal(0, 0.9, truth.shape)


def test_hard_steps_from_the_best_scored_entries_beat_soft_em_from_the_same_noisy_start() -> None:
    from audit.sparse_attacks import CodeModel
    from protocol.sparse_code import top_k, unpack_key

    # 8 latent dimensions behind 2 maps of 4 true values: the soft EM lets every wrongly
    # scored entry pull the posterior; hard steps from the best-scored ones do not
    model = CodeModel(_low_rank_codes(2000, 8, 0), rank=8)
    rng = np.random.default_rng(3)
    hits: dict[int, list[float]] = {0: [], 4: []}
    start_hits = []
    for c in _low_rank_codes(40, 8, 1):
        amb, key = ambiguate(top_k(c, SPEC.k), SPEC, rng)
        truth = unpack_key(key)[0]
        start = _noisy_start(truth, rng)
        start_hits.append((top_k_mask(start, SPEC.k) & truth).sum() / truth.sum())
        for seeds in hits:
            logit = model.refine(amb, SPEC.k, None, prior_logit=np.zeros(start.shape), start=start, iters=1, seeds=seeds)
            hits[seeds].append((top_k_mask(logit, SPEC.k) & truth).sum() / truth.sum())
    soft, hard = float(np.mean(hits[0])), float(np.mean(hits[4]))
    assert hard > soft + 0.04 and hard > float(np.mean(start_hits)) + 0.08, (np.mean(start_hits), soft, hard)


def test_refining_in_worker_processes_gives_what_one_process_gives() -> None:
    from audit.sparse_attacks import CodeModel, refine_all
    from protocol.sparse_code import top_k

    model = CodeModel(_low_rank_codes(500, 4, 0), rank=4)
    rng = np.random.default_rng(4)
    ambs = [ambiguate(top_k(c, SPEC.k), SPEC, rng)[0] for c in _low_rank_codes(130, 4, 1)]
    scores = [rng.normal(0, 1, a.indices.shape) for a in ambs]
    one = refine_all(model, ambs, scores, SPEC.k, None, workers=1)
    two = refine_all(model, ambs, scores, SPEC.k, None, workers=2)
    assert len(two) == len(ambs)
    for a, b in zip(one, two):
        np.testing.assert_array_equal(a, b)
