"""What params mean for the model, checked against the backbone registry and
the budget: the stages after prepare, `transferlab run` and `transferlab tune`
check these before they train (`check`). Not imported by `transferlab.config`,
so that the data stage depends on no model code."""

from __future__ import annotations

from transferlab import budget
from transferlab.backbones import BACKBONES
from transferlab.config.schema import Params
from transferlab.errors import ConfigError


def check(params: Params) -> Params:
    """Raise ConfigError where the params do not describe a pipeline this code
    can train; returns them."""
    name = params.backbone.name
    if name not in BACKBONES:  # the registry owns the names
        raise ConfigError(f"backbone.name: unknown backbone {name!r}; registered: {sorted(BACKBONES)}")
    blocks = len(BACKBONES[name].blocks)
    f = params.finetune
    unfrozen = blocks if f.unfreeze == "all" else f.unfreeze
    if unfrozen > blocks:
        raise ConfigError(f"finetune.unfreeze must be 0..{blocks} (blocks of {name}) or 'all', "
                          f"received: {f.unfreeze!r}")
    if params.features.train_fraction < 1 and f.mode == "cached" and 0 < unfrozen < blocks:
        raise ConfigError("features.train_fraction < 1 needs finetune.mode: full (the cached mode caches the "
                          "activations of every training image)")
    _budget(params)
    space = [blocks if u == "all" else u for u in params.tune.space.unfreeze]
    if len(space) != 2 or not 0 <= space[0] <= space[1] <= blocks:
        raise ConfigError(f"tune.space.unfreeze must be [low, high] within 0..{blocks} or 'all' (the {blocks} "
                          f"blocks of {name}), received: {params.tune.space.unfreeze}")
    return params


def _budget(params: Params) -> None:
    f = params.finetune
    try:
        seconds = budget.parse(params.budget)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if seconds and f.steps:
        raise ConfigError(f"budget ({params.budget!r}) and finetune.steps ({f.steps}) both size the fine-tune: "
                          "set budget: 0 to replay a plan's steps, or finetune.steps: 0 to plan to the budget")
    if f.replans and (seconds or f.steps):
        raise ConfigError("finetune.replans replays a budgeted run: set budget: 0 and finetune.steps: 0 with it")
    if f.replans and f.schedule not in ("cosine", "linear"):
        raise ConfigError("finetune.replans needs finetune.schedule cosine or linear, as the budgeted run it replays")
    if seconds and f.schedule == "plateau":
        raise ConfigError(f"budget ({params.budget!r}): a budgeted fine-tune decays its learning rate to zero at "
                          "the budget's end; set finetune.schedule to cosine or linear, or budget: 0 for plateau")
