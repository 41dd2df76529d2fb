from __future__ import annotations

import pytest
import torch

from training import losses
from training.models import create_model
from training.models.layers import LinearEraser, scale_grad
from training.train import parse_method


def test_extractor_maps_image_batch_to_feature_map():
    model = create_model("extractor").eval()
    z = model(torch.randn(3, 3, 64, 64))
    assert z.shape == (3, 16, 8, 8) and model.feature_shape == (16, 8, 8)
    narrow = create_model("extractor", feat_channels=4).eval()
    assert narrow(torch.randn(2, 3, 64, 64)).shape == (2, 4, 8, 8)


def test_stochastic_features_are_noisy_in_training_only():
    model = create_model("extractor", stochastic=True)
    x = torch.randn(4, 3, 64, 64)
    model.train()
    assert not torch.equal(model(x), model(x))
    model.eval()
    assert torch.equal(model(x), model(x))


def test_release_noise_stays_on_at_inference():
    model = create_model("extractor", release_noise=True).eval()
    x = torch.randn(2, 3, 64, 64)
    assert model.stochastic and not torch.equal(model(x), model(x))
    assert parse_method("entropy+relnoise").release_noise and parse_method("entropy+relnoise").stochastic
    assert not parse_method("entropy+noise").release_noise


def test_unknown_names_list_the_valid_ones():
    with pytest.raises(ValueError, match="extractor"):
        create_model("resnet")
    with pytest.raises(ValueError, match="entropy"):
        parse_method("entropy+magic")
    with pytest.raises(ValueError, match="more than one"):
        parse_method("paper+entropy")
    m = parse_method("entropy+multi+steps+reinit+mmd+noise+narrow+leace")
    assert (m.n_adversaries, m.adv_steps, m.reinit_every, m.penalty, m.stochastic, m.narrow, m.leace) == (
        3, 5, 100, "mmd", True, True, True)


def test_leace_removes_linear_covariance_with_the_concept():
    g = torch.Generator().manual_seed(0)
    u = (torch.rand(400, 2, generator=g) > 0.5).float()
    z = torch.randn(400, 4, 2, 2, generator=g) + 2.0 * u[:, :1, None, None] - u[:, 1:, None, None]
    eraser = LinearEraser(16)
    before = ((z.flatten(1) - z.flatten(1).mean(0)).T @ (u - u.mean(0))).abs().max()
    eraser.fit(z, u)
    erased = eraser(z).flatten(1)
    after = ((erased - erased.mean(0)).T @ (u - u.mean(0))).abs().max()
    assert eraser.rank == 2 and before > 50 and after < 1e-3


def test_kl_to_prior_is_zero_at_the_prior_and_positive_for_a_flipped_adversary():
    prior = torch.full((8, 1), 0.6)
    at_prior = torch.logit(prior)
    assert losses.kl_to_prior(at_prior, prior).abs() < 1e-5
    assert losses.kl_to_prior(torch.full((8, 1), -5.0), prior) > 0.5  # confidently wrong still leaks


def test_jsd_bound_prefers_separated_scores():
    assert losses.jsd_mi(torch.full((4, 2), 5.0), torch.full((4, 2), -5.0)) > losses.jsd_mi(
        torch.zeros(4, 2), torch.zeros(4, 2))


def test_private_class_penalties_detect_a_shift():
    g = torch.Generator().manual_seed(1)
    u = torch.tensor([[0.0], [1.0]] * 32)
    same = torch.randn(64, 2, 2, 2, generator=g)
    shifted = same + 3 * u.view(-1, 1, 1, 1)
    for fn in (losses.conditional_mmd, losses.distance_correlation):
        assert fn(shifted, u) > 2 * fn(same, u)


def test_scale_grad_scales_only_the_gradient():
    x = torch.ones(3, requires_grad=True)
    y = scale_grad(x, 0.25)
    y.sum().backward()
    assert torch.equal(y, x) and torch.allclose(x.grad, torch.full((3,), 0.25))
