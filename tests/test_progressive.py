"""Progressive resizing under a time budget, at the stage: the plan counts the
steps of both sizes, re-plans from the first full-size epoch on, and replays
without the clock. (Its unit tests are in test_finetune.py.)

Heavy, as are the unit tests that train progressively: progressive resizing is
off by default (finetune.progressive.scale: 1), so the README's test command
leaves its minutes of training to .ci/run's `pytest -m heavy`."""

import keras
import pytest

import tinyproject
from transferlab import config
from transferlab.budget import plans
from transferlab.stages import finetune

pytestmark = pytest.mark.heavy

PROGRESSIVE = plans.Probe(step_seconds=10.0, first_step_seconds=12.0, batch_size=8,
                           small_step_seconds=5.0, small_first_step_seconds=6.0)


def test_a_budget_plans_progressive_resizing_and_the_plan_replays(stages_done, monkeypatch):
    """The stage under a budget with progressive resizing (64 px, the first
    whole epochs at 32): the plan counts both sizes' steps, the epochs train at
    the planned sizes, the saved model takes the full size, and the replay
    without the clock trains the same split."""
    over = {"backbone": {"name": "efficientnet_lite0", "weights": "none", "input_size": 64},
            "finetune": {**tinyproject.TINY["finetune"], "epochs": 1000, "patience": 1000,
                         "progressive": {"scale": 0.75, "fraction": 0.6}}}
    sizes = tinyproject.input_sizes_callback()
    monkeypatch.setattr("transferlab.train.trainer.probe", lambda t, batch_size: PROGRESSIVE)
    monkeypatch.chdir(stages_done)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    params = config.from_dict(tinyproject.full_params({**tinyproject.TINY, "budget": "6m", **over}))
    planned = finetune.main(params, callbacks=[sizes])
    plan = planned["plan"]
    assert plan["small_step_seconds"] == 5.0 and plan["small_steps"] == planned["small_steps"] > 0
    assert planned["small_input_size"] == 32
    small_epochs = planned["small_steps"] // plan["steps_per_epoch"]
    assert sizes.sizes == [32] * small_epochs + [64] * (planned["epochs_run"] - small_epochs)
    assert planned["epochs_run"] > small_epochs  # the last epochs at the full size
    saved = keras.saving.load_model(stages_done / "models/finetune/model.keras", safe_mode=True)
    assert saved.get_layer("efficientnet_lite0_body").input.shape[1:] == (64, 64, 3)

    replay = tinyproject.input_sizes_callback()
    replayed = finetune.main(config.from_dict(tinyproject.full_params(
        {**tinyproject.TINY, **over, "finetune": {**over["finetune"], "steps": plan["steps"]}})), callbacks=[replay])
    assert replayed["small_steps"] == planned["small_steps"] and replay.sizes == sizes.sizes


def test_progressive_resizing_is_planned_again_at_full_size_and_the_replans_replay(stages_done, monkeypatch):
    """Under a budget, progressive resizing (64 px, the first whole epochs at 32)
    re-plans as one size does, from the first full-size epoch's end on: the
    probe's 10 s a step plan a run short of the recipe, the fine-tune's own
    steps (milliseconds) raise it to the recipe's length, the small epochs stay
    as the probe planned them, and the replans replay the run without the clock.
    (Batches of one image: epochs long enough to time.)"""
    recipe = {**tinyproject.TINY["finetune"], "epochs": 4, "patience": 1000, "warmup_epochs": 0.5, "batch_size": 1,
              "progressive": {"scale": 0.5, "fraction": 0.6}}
    over = {"backbone": {"name": "efficientnet_lite0", "weights": "none", "input_size": 64}}
    sizes = tinyproject.input_sizes_callback()
    monkeypatch.setattr("transferlab.train.trainer.probe", lambda t, batch_size: PROGRESSIVE)
    monkeypatch.chdir(stages_done)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    params = tinyproject.full_params({**tinyproject.TINY, **over, "finetune": recipe})
    planned = finetune.main(config.from_dict({**params, "budget": "12m"}), callbacks=[sizes])
    plan = planned["plan"]
    per, small = plan["steps_per_epoch"], planned["small_steps"]
    assert small == plan["small_steps"] > 0 and small % per == 0
    assert small + per < plan["probe_steps"] < 4 * per  # the probe's plan: a full-size epoch, short of the recipe
    assert plan["steps"] == plan["max_steps"] == 4 * per == planned["steps_run"]
    # no plan from the small steps' times: the first at the first full-size epoch's end
    replans = [[0, plan["probe_steps"]], *([step, 4 * per] for step in range(small + per, 4 * per, per))]
    assert plan["replans"] == replans
    assert sizes.sizes == [32] * (small // per) + [64] * (4 - small // per)
    rates = (stages_done / "plots" / "finetune" / "history.csv").read_text()

    replay = tinyproject.input_sizes_callback()
    replay_params = {**params, "finetune": {**params["finetune"], "replans": plan["replans"]}}
    replayed = finetune.main(config.from_dict(replay_params), callbacks=[replay])
    assert replayed["steps_run"] == plan["steps"] and replayed["small_steps"] == small
    assert replay.sizes == sizes.sizes
    assert (stages_done / "plots" / "finetune" / "history.csv").read_text() == rates  # the same schedule
