"""PRIC networks, one file per network; `create_model(name, **kw)` builds any of them."""

from __future__ import annotations

from typing import Any, Callable

from torch import nn

from training.models.extractor import Extractor
from training.models.heads import ConvHead, LinearHead, MLPHead
from training.models.mi import MIEstimator

_FACTORIES: dict[str, Callable[..., nn.Module]] = {
    "extractor": Extractor,
    "conv_head": ConvHead,
    "mlp_head": MLPHead,
    "linear_head": LinearHead,
    "mi": MIEstimator,
}


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """Build a network by name; unknown names raise ValueError listing the valid ones."""
    try:
        factory = _FACTORIES[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; valid: {', '.join(sorted(_FACTORIES))}") from None
    return factory(**kwargs)


__all__ = ["ConvHead", "Extractor", "LinearHead", "MIEstimator", "MLPHead", "create_model"]
