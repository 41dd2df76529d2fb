"""Loss terms of PRIC training. Each takes tensors and returns a scalar tensor.

Shapes: logits (B, K) one per binary attribute; u, y (B, K) in {0, 1}; z (B, C, h, w).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def bce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of the summed per-attribute binary cross-entropy."""
    return F.binary_cross_entropy_with_logits(logits.float(), target.float(), reduction="none").sum(1).mean()


def jsd_mi(t_joint: torch.Tensor, t_marginal: torch.Tensor) -> torch.Tensor:
    """Deep InfoMax JSD lower bound (paper Eq. 4), to be *maximised*:
    E_joint[-softplus(-T)] - E_marginal[softplus(T)]."""
    return (-F.softplus(-t_joint.float())).mean() - F.softplus(t_marginal.float()).mean()


def negative_ce(logits: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The paper's adversarial term (Eq. 3): the extractor minimises -CE of the adversary.

    Pitfall: it is unbounded, and satisfied by a confidently *wrong* adversary (labels
    flipped) whose output still carries u."""
    return -bce(logits, u)


def kl_to_prior(logits: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
    """KL(adversary's Bernoulli || prior), summed over attributes, mean over the batch.

    prior: (B, K) probability of u=1 the adversary should be left with, e.g. p(u=1) of the
    training split, or p(u=1 | primary labels) so only what the labels already imply stays.
    Zero exactly when the adversary is no better than the prior (no label-flip exploit)."""
    logits = logits.float()
    p = torch.sigmoid(logits)
    log_p, log_1p = F.logsigmoid(logits), F.logsigmoid(-logits)
    q = prior.clamp(1e-4, 1 - 1e-4)
    kl = p * (log_p - q.log()) + (1 - p) * (log_1p - (1 - q).log())
    return kl.sum(1).mean()


def _gaussian_mmd(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Squared MMD (biased) with a sum of Gaussian kernels at bandwidths around the median
    distance. a: (n, D), b: (m, D)."""
    x = torch.cat([a, b])
    d2 = torch.cdist(x, x).pow(2)
    med = d2.detach()[d2.detach() > 0].median() if (d2.detach() > 0).any() else d2.new_tensor(1.0)
    k = sum(torch.exp(-d2 / (s * med)) for s in (0.25, 1.0, 4.0))
    n = len(a)
    return k[:n, :n].mean() + k[n:, n:].mean() - 2 * k[:n, n:].mean()


def _strata(y: torch.Tensor | None, batch: int, device: torch.device) -> list[torch.Tensor]:
    """Index groups of samples that share all primary labels (one group if y is None)."""
    if y is None or y.numel() == 0:
        return [torch.arange(batch, device=device)]
    keys = (y.long() * (2 ** torch.arange(y.shape[1], device=y.device))).sum(1)
    return [torch.nonzero(keys == k).flatten() for k in keys.unique()]


def conditional_mmd(z: torch.Tensor, u: torch.Tensor, y: torch.Tensor | None = None, min_group: int = 4) -> torch.Tensor:
    """Σ over private attributes of MMD²(z | u=0, z | u=1), computed within each stratum of
    the primary labels y and averaged (weights = stratum size): pushes z ⊥ u | y, leaving
    only the private information the primary labels themselves imply."""
    flat = z.float().flatten(1)
    total, weight = flat.new_zeros(()), 0.0
    for idx in _strata(y, len(flat), flat.device):
        for k in range(u.shape[1]):
            uk = u[idx, k]
            a, b = flat[idx[uk == 1]], flat[idx[uk == 0]]
            if len(a) >= min_group and len(b) >= min_group:
                total = total + len(idx) * _gaussian_mmd(a, b)
                weight += len(idx)
    return total / weight if weight else total


def _centered_dist(x: torch.Tensor) -> torch.Tensor:
    d = torch.cdist(x, x)
    return d - d.mean(0, keepdim=True) - d.mean(1, keepdim=True) + d.mean()


def distance_correlation(z: torch.Tensor, u: torch.Tensor, y: torch.Tensor | None = None, min_group: int = 8) -> torch.Tensor:
    """Squared distance correlation between z (flattened) and u, within strata of y,
    averaged: zero iff independent (population version)."""
    flat = z.float().flatten(1)
    total, weight = flat.new_zeros(()), 0.0
    for idx in _strata(y, len(flat), flat.device):
        if len(idx) < min_group:
            continue
        a, b = _centered_dist(flat[idx]), _centered_dist(u[idx].float())
        dcov = (a * b).mean()
        denom = ((a * a).mean() * (b * b).mean()).sqrt()
        if float(denom.detach()) > 0:
            total = total + len(idx) * dcov / (denom + 1e-9)
            weight += len(idx)
    return total / weight if weight else total
