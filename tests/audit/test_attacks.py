"""Attackers learn a planted signal, stay near chance on noise, and the factory names its choices."""

from __future__ import annotations

import numpy as np
import pytest

from protocol.errors import InvalidInputError
from audit.attacks import (
    ATTACKS,
    check_trainable,
    create_attack,
    majority_rate,
    multi_attribute_attack,
    strongest_attack,
)


def _splits(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, ...]:
    n = len(x)
    a, b = int(n * 0.6), int(n * 0.8)
    return x[:a], y[:a], x[a:b], y[a:b], x[b:], y[b:]


def _signal_maps(n: int, seed: int, strength: float) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    x = rng.standard_normal((n, 2, 4, 4)).astype(np.float32)
    x[:, 1, 2, 3] += strength * (2 * y - 1)
    return x, y


@pytest.mark.slow
def test_attacks_learn_a_separable_signal() -> None:
    x, y = _signal_maps(600, seed=1, strength=3.0)

    res = strongest_attack(*_splits(x, y), epochs=15, progress=False)

    assert set(res["kinds"]) == set(ATTACKS)
    assert res["accuracy"] == max(res[k] for k in ATTACKS)
    assert res["strongest"] in ATTACKS
    assert res["linear"] > 0.9
    assert res["accuracy"] > res["majority_rate"] + 0.3


def test_attacks_stay_near_chance_on_noise() -> None:
    x, y = _signal_maps(600, seed=2, strength=0.0)

    res = strongest_attack(*_splits(x, y), kinds=("linear", "mlp"), epochs=15, progress=False)

    assert res["accuracy"] < 0.68
    assert "cnn" not in res


def test_cnn_is_skipped_for_flat_inputs() -> None:
    x, y = _signal_maps(300, seed=3, strength=3.0)

    res = strongest_attack(*_splits(x.reshape(len(x), -1), y), epochs=4, progress=False)

    assert res["kinds"] == ["linear", "mlp"]


@pytest.mark.slow
def test_multi_attribute_reports_each_attribute() -> None:
    rng = np.random.default_rng(4)
    n = 500
    Y = rng.integers(0, 2, (n, 3))
    x = rng.standard_normal((n, 2, 4, 4)).astype(np.float32)
    x[:, 0, 0, 0] += 3.0 * (2 * Y[:, 0] - 1)  # attribute 0 leaks, 1 and 2 do not
    s = _splits(x, Y)

    res = multi_attribute_attack(*s, attr_names=["a", "b", "c"], kinds=("linear", "cnn"), epochs=15, progress=False)

    assert res["attributes"] == ["a", "b", "c"]
    assert len(res["accuracy"]) == 3 and len(res["per_kind"]["cnn"]) == 3
    assert res["accuracy"][0] > 0.85
    assert max(res["accuracy"][1:]) < 0.7
    assert res["majority_rate"][1] == pytest.approx(majority_rate(s[5][:, 1]))


def test_factory_rejects_unknown_names_and_flat_cnn() -> None:
    with pytest.raises(ValueError, match="linear, mlp, cnn"):
        create_attack("svm", (10,))
    with pytest.raises(ValueError, match="cnn"):
        create_attack("cnn", (10,))
    model = create_attack("cnn", (3, 64, 64), n_classes=5)
    import torch

    assert model(torch.zeros(2, 3, 64, 64)).shape == (2, 5)


def test_too_few_samples_of_a_class_is_a_clear_error() -> None:
    with pytest.raises(InvalidInputError, match="too few samples"):
        check_trainable(np.array([0, 0, 0, 1]), "Bald", min_per_class=2)
