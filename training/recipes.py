"""Named training recipes: the one place a recipe's settings are written.

`pric-train features` takes DEFAULT_RECIPE's values as its defaults (TrainConfig), so a
model builder who names no method options trains the best-known recipe; any flag overrides
its one setting. The run's config.json and the exported card's `training.recipe` name the
recipe, or say which settings differ from it.
"""

from __future__ import annotations

from typing import Any, Mapping

# The shipped pric-male (exported_models/pric-male/train_config.json): the recipe that hid
# Male best at the smallest cost to Smiling in docs/results-pric.md, on 2 CPU cores in ~3 min.
RECIPES: dict[str, dict[str, Any]] = {
    "pric-male": {
        "method": "entropy+multi+steps+reinit+mmd+narrow+noise+leace",
        "adv_weight": 3.0,
        "penalty_weight": 10.0,
        "lam": 0.1,
        "arch": "patch",
        "width": 8,
        "epochs": 20,
    },
}
DEFAULT_RECIPE = "pric-male"

# TrainConfig field -> command-line flag, for messages
_FLAGS = {"lam": "--lambda"}


def recipe(name: str = DEFAULT_RECIPE) -> dict[str, Any]:
    return dict(RECIPES[name])


def flag(field: str) -> str:
    return _FLAGS.get(field, "--" + field.replace("_", "-"))


def describe(name: str = DEFAULT_RECIPE) -> str:
    """The recipe as the flags that would give it: 'pric-male (--method ... --epochs 20)'."""
    flags = " ".join(f"{flag(k)} {v:g}" if isinstance(v, float) else f"{flag(k)} {v}" for k, v in RECIPES[name].items())
    return f"{name} ({flags})"


def differences(settings: Mapping[str, Any], name: str = DEFAULT_RECIPE) -> dict[str, tuple[Any, Any]]:
    """{field: (recipe's value, given value)} for each recipe setting that `settings` change."""
    return {k: (v, settings[k]) for k, v in RECIPES[name].items() if k in settings and settings[k] != v}


def label(settings: Mapping[str, Any], name: str = DEFAULT_RECIPE) -> str:
    """What a run's card says it was trained with: the recipe's name, or the name and what differs."""
    diff = differences(settings, name)
    if not diff:
        return name
    return f"{name} with " + ", ".join(f"{flag(k)} {new}" for k, (_, new) in diff.items())
