"""The time budget: parsing, the plan's arithmetic, and the stages under a budget
(planned, replayed without the clock, refused with the smallest budget that fits)."""

import json
import math
import re
import time
import types

import keras
import numpy as np
import pytest

import synth
import tinyproject
from stagekit import SLOW, run_finetune
from transferlab import config
from transferlab.budget import callback, plans
from transferlab.budget.callback import StepBudget
from transferlab.config import pipeline
from transferlab.stages import features, finetune, head, prepare
from transferlab.train import trainer as trainer_module


def test_parse_durations():
    assert plans.parse("20m") == 1200
    assert plans.parse("1h30m") == 5400
    assert plans.parse("1.5h") == 5400
    assert plans.parse("900s") == plans.parse("900") == plans.parse(900) == 900
    assert plans.parse(0) is plans.parse("0") is plans.parse("none") is None
    for bad in ("20x", "m20", "-5", "20m junk"):
        with pytest.raises(ValueError, match="duration such as 20m"):
            plans.parse(bad)
    assert plans.describe(1201) == "21m" and plans.describe(3900) == "1h05m"


def test_input_size_auto_is_the_budgets():
    assert plans.input_size(96, "20m") == plans.input_size(96, 0) == 96  # a size in pixels is kept
    assert plans.input_size("auto", "20m") == plans.input_size("auto", "39m") == 128
    assert plans.input_size("auto", "40m") == plans.input_size("auto", "57m") == 160
    assert plans.input_size("auto", 0) == 160  # no budget: the recipe's whole length
    for bad in ("big", 0, -32):
        with pytest.raises(config.ConfigError, match="backbone.input_size"):
            config.from_dict(tinyproject.full_params({"backbone": {"input_size": bad}}))


PROBE = plans.Probe(step_seconds=0.8, first_step_seconds=10.8, batch_size=128)


def _plan(budget_seconds, **kw):
    args = dict(budget_seconds=budget_seconds, spent_seconds=400.0, evaluate_seconds=100.0, probe=PROBE,
                inference_images_per_second=500.0, n_val=5000, steps_per_epoch=352)
    return plans.plan(**{**args, **kw})


def test_plan_fills_what_is_left_and_no_more():
    p = _plan(1200.0)
    left = 1200 - 400 - 100 - plans.MARGIN * 1200 - plans.FINISH_SECONDS
    assert p.finetune_seconds <= left
    # one step more would not fit: the plan uses the budget
    assert plans.finetune_seconds(p.steps + 1, 352, PROBE, 10.0) > left
    assert p.epochs == pytest.approx(p.steps / 352)
    assert p.train_images_per_second == pytest.approx(160.0)


def test_the_recipe_length_caps_the_plan():
    """A budget is a limit: where the whole recipe fits, the plan is the recipe,
    and the fine-tune ends early instead of training on."""
    uncapped = _plan(3600.0)
    assert _plan(3600.0, max_steps=uncapped.steps - 100).steps == uncapped.steps - 100
    assert _plan(3600.0, max_steps=uncapped.steps + 100).steps == uncapped.steps  # the budget binds
    # a recipe shorter than the fewest useful steps is not a budget too small
    assert _plan(1200.0, max_steps=20).steps == 20


def test_a_replan_fills_what_is_left_from_the_fine_tunes_own_steps():
    p = _plan(1200.0, max_steps=100_000)
    # the warmup's 100 steps ran 20 % faster than the probe said: more steps fit in what is left
    left = p.window_seconds - 100 * 0.64
    q = plans.replan(p, step_seconds=0.64, steps_done=100, seconds_left=left)
    assert q.steps > p.steps and q.probe_steps == p.steps and q.trained_step_seconds == 0.64
    rest = lambda n: plans.REPLAN_SLOWDOWN * (n - 100) * 0.64 + math.ceil(n / 352) * p.val_seconds  # noqa: E731
    assert rest(q.steps) <= left < rest(q.steps + 1)  # no step more fits
    assert q.epochs == pytest.approx(q.steps / 352) and q.finetune_seconds <= p.window_seconds
    # slower: fewer steps; the recipe's length still caps; and at least one step more than ran
    assert plans.replan(p, step_seconds=1.2, steps_done=100, seconds_left=left).steps < p.steps
    assert plans.replan(_plan(1200.0, max_steps=500), step_seconds=0.64, steps_done=100,
                         seconds_left=left).steps == 500
    assert plans.replan(p, step_seconds=0.64, steps_done=100, seconds_left=1.0).steps == 101
    # a last epoch of a few steps is dropped where the epoch before it is still to end (the 20-minute
    # run of 2026-12-01 re-planned 721 steps at step 352: its last 17 cost a validation at a rate near zero)
    short = _plan(1200.0, max_steps=721)
    assert plans.replan(short, step_seconds=0.64, steps_done=352, seconds_left=left).steps == 704
    assert plans.replan(short, step_seconds=0.64, steps_done=710, seconds_left=left).steps == 721
    # a second re-plan keeps the probe's figure
    assert plans.replan(q, step_seconds=0.7, steps_done=100, seconds_left=left).probe_steps == p.steps


def test_small_steps_are_whole_epochs_and_at_most_the_fraction():
    assert plans.small_steps(2500, 352, 0.6) == 4 * 352  # 1,500 steps -> 4 whole epochs
    assert plans.small_steps(1000, 352, 0.6) == 352
    assert plans.small_steps(500, 352, 0.6) == 0  # not one whole epoch
    assert plans.small_steps(500, 22, 0.0) == 0


def test_progressive_resizing_plans_the_steps_of_both_sizes():
    """Cheaper steps at the smaller size: more of them fit, and the plan is the
    most that fits (a whole epoch more at the small size can cost less, so every
    longer plan is checked, not only the next step)."""
    progressive = plans.Probe(step_seconds=0.8, first_step_seconds=10.8, batch_size=128,
                               small_step_seconds=0.5, small_first_step_seconds=8.5, small_fraction=0.6)
    one_size, p = _plan(3600.0), _plan(3600.0, probe=progressive)
    assert p.steps > one_size.steps
    assert p.small_steps == plans.small_steps(p.steps, 352, 0.6) > 0 and p.small_step_seconds == 0.5
    left = 3600 - 400 - 100 - plans.MARGIN * 3600 - plans.FINISH_SECONDS
    val = 5000 / 500.0
    assert plans.finetune_seconds(p.steps, 352, progressive, val) <= left
    assert all(plans.finetune_seconds(n, 352, progressive, val) > left
               for n in range(p.steps + 1, int(left / 0.5 / plans.SLOWDOWN) + 1))
    # both sizes' steps and tracing are counted
    small = plans.small_steps(p.steps, 352, 0.6)
    steps = small * 0.5 + (p.steps - small) * 0.8
    expected = 10.0 + 8.0 + plans.SLOWDOWN * steps + -(-p.steps // 352) * val
    assert plans.finetune_seconds(p.steps, 352, progressive, val) == pytest.approx(expected)
    # re-planned from full-size steps only: the small ones stay as planned, and none is timed as the rest
    q = plans.replan(p, step_seconds=0.7, steps_done=small + 352, seconds_left=1000.0)
    assert q.small_steps == p.small_steps and q.steps > small + 352
    with pytest.raises(ValueError, match="smaller input size"):
        plans.replan(p, step_seconds=0.45, steps_done=small - 352, seconds_left=2000.0)


@pytest.mark.parametrize("n", [20, 100])
def test_the_probe_times_full_batches_only(monkeypatch, n):
    """A set smaller than the probe's steps is repeated, so every timed batch is
    full: a partial one is traced anew, and its time would inflate the plan's
    step (4.8 s planned on 165 images whose steps took about 1 s)."""
    seen = []
    monkeypatch.setattr(trainer_module, "_time_steps", lambda model, x, y, batch_size: seen.append((x, y)) or (1, 2))
    images = np.arange(n)[:, None]
    t = types.SimpleNamespace(mode="full", inputs=images, fit_kwargs={"y": images[:, 0] % 3}, small=None, model=None)
    trainer_module.probe(t, batch_size=8, steps=11)
    (x, y), = seen
    timed = 8 * min(11, max(n // 8, 3))  # the set's full batches, at least 3: 24 images of 20, 88 of 100
    assert len(x) == len(y) == timed and (x[:min(n, timed), 0] == np.arange(min(n, timed))).all()
    assert (y == x[:, 0] % 3).all()


def test_a_budget_too_small_names_the_smallest_that_fits():
    with pytest.raises(plans.BudgetError) as err:
        _plan(500.0)
    message = str(err.value)
    smallest = re.search(r"smallest budget that fits is (\w+)", message).group(1)
    assert f"budget: {smallest}" in message and "transferlab run --budget" in message
    fits = _plan(plans.parse(smallest))  # the suggestion holds one useful fine-tune
    assert fits.steps >= plans.MIN_USEFUL_STEPS
    with pytest.raises(plans.BudgetError):  # and a minute less does not
        _plan(plans.parse(smallest) - 60)


def test_budget_and_fixed_steps_cannot_both_size_the_fine_tune():
    with pytest.raises(config.ConfigError, match="replay a plan"):
        pipeline.check(config.from_dict(tinyproject.full_params({"budget": "20m", "finetune": {"steps": 100}})))
    with pytest.raises(config.ConfigError, match="cosine or linear"):
        pipeline.check(config.from_dict(tinyproject.full_params({"budget": "20m",
                                                                 "finetune": {"schedule": "plateau"}})))
    with pytest.raises(config.ConfigError, match="duration"):
        pipeline.check(config.from_dict(tinyproject.full_params({"budget": "twenty minutes"})))



def test_a_budget_plans_the_fine_tune_and_its_plan_replays_without_the_clock(stages_done, monkeypatch):
    for name in ("prepare", "features", "head"):  # each stage recorded its wall time for the clock
        assert json.loads((stages_done / "metrics" / f"{name}.json").read_text())["stage_seconds"] > 0
    long_recipe = {**tinyproject.TINY["finetune"], "epochs": 1000}  # the budget, not the recipe, binds
    planned = run_finetune(stages_done, monkeypatch, probe=SLOW, budget="10m", finetune=long_recipe)
    plan = planned["plan"]
    assert plan["budget_seconds"] == 600 and plan["steps"] == planned["steps"] > 0
    assert plan["step_seconds"] == 10.0 and plan["steps"] * 10.0 <= 600 - plan["spent_seconds"]
    assert 0 < planned["steps_run"] <= plan["steps"]
    assert plan["spent_seconds"] > 0 and plan["train_images_per_second"] > 0
    recorded = json.loads((stages_done / "metrics" / "finetune.json").read_text())
    assert recorded["plan"] == plan  # the plan goes to metrics/
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{stages_done / 'mlflow.db'}")
    run = mlflow.search_runs(experiment_names=["smoke"], filter_string="tags.stage = 'finetune'",
                             order_by=["attributes.start_time DESC"], max_results=1).iloc[0]
    assert int(run["params.plan.steps"]) == plan["steps"]  # and to the MLflow run
    assert "metrics.budget_seconds_left" in run.index

    replayed = run_finetune(stages_done, monkeypatch, finetune={**long_recipe, "steps": plan["steps"]})
    assert replayed["steps"] == plan["steps"] and "plan" not in replayed
    assert replayed["epochs_run"] == planned["epochs_run"]


@pytest.mark.parametrize("precision", ["float32", "auto"])
def test_the_probe_is_spent_once_and_not_reserved_for_the_evaluate_stage(stages_done, monkeypatch, precision):
    """The evaluate stage loads and predicts; it times no steps. Its start-up is
    reserved as long as the fine-tune stage's before its probe, and the probe's
    seconds are spent, whether the precision's choice timed it (auto, on a CPU
    with bfloat16) or the plan did (a set precision)."""
    from transferlab.stages import recorded_stage_seconds, stage_seconds

    monkeypatch.setattr("transferlab.train.precision.cpu_has_bf16", lambda: True)  # auto times both policies
    probes, reserved = [], []
    reserve = plans.evaluate_reserve
    monkeypatch.setattr(plans, "evaluate_reserve", lambda **kw: reserved.append(kw["startup_seconds"]) or reserve(**kw))

    def slow_probe(t, batch_size):
        probes.append(stage_seconds())
        time.sleep(2.0)
        return SLOW

    plan = run_finetune(stages_done, monkeypatch, probe=slow_probe, budget="10m", precision=precision,
                        finetune={**tinyproject.TINY["finetune"], "epochs": 1000})["plan"]
    assert len(probes) == (2 if precision == "auto" else 1) and len(reserved) == 1
    assert 0 < reserved[0] <= probes[0]  # the start-up before the first probe
    earlier = recorded_stage_seconds("prepare", "features", "head")  # read in the stage folder
    # this stage's time, every probe included (less what rounding the recorded seconds loses)
    assert plan["spent_seconds"] - earlier >= probes[-1] + 2.0 - 0.1


def test_a_budget_that_holds_the_whole_recipe_trains_the_recipe(stages_done, monkeypatch):
    recipe = run_finetune(stages_done, monkeypatch)["steps"]  # no budget: finetune.epochs
    planned = run_finetune(stages_done, monkeypatch, probe=SLOW, budget="10m")
    assert planned["steps"] == planned["plan"]["steps"] == recipe
    assert recipe * SLOW.step_seconds < 600 - planned["plan"]["spent_seconds"] - 100  # so the cap binds


def test_the_fine_tune_plans_again_from_its_own_steps_and_the_replans_replay(stages_done, monkeypatch):
    """The probe says 10 s a step, so 10 minutes plan a few dozen steps; the
    fine-tune's own steps take milliseconds, so the re-plan at the warmup's end
    raises the run to the recipe's whole length, and the re-plans after each
    epoch keep it there. The recorded re-plans, replayed without the clock,
    train the same run. (Batches of one image: epochs long enough to time.)"""
    recipe = {**tinyproject.TINY["finetune"], "epochs": 4, "patience": 1000, "warmup_epochs": 0.95,
              "batch_size": 1}
    planned = run_finetune(stages_done, monkeypatch, probe=SLOW, budget="10m", finetune=recipe)
    plan = planned["plan"]
    per = plan["steps_per_epoch"]
    warmup = round(0.95 * per)
    assert warmup - 1 - StepBudget.SKIP >= StepBudget.MIN_TIMED  # the warmup is timed
    assert warmup < plan["probe_steps"] < 4 * per  # the probe's plan: past the warmup, short of the recipe
    assert plan["steps"] == plan["max_steps"] == 4 * per == planned["steps_run"]  # re-planned: the recipe
    assert plan["replans"] == [[0, plan["probe_steps"]], [warmup, 4 * per], [per, 4 * per], [2 * per, 4 * per],
                               [3 * per, 4 * per]]
    assert 0 < plan["trained_step_seconds"] < SLOW.step_seconds
    assert planned["epochs_run"] == 4
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{stages_done / 'mlflow.db'}")
    client = mlflow.MlflowClient()
    run = mlflow.search_runs(experiment_names=["smoke"], filter_string="tags.stage = 'finetune'",
                             order_by=["attributes.start_time DESC"], max_results=1).iloc[0]
    assert int(run["params.plan.steps"]) == plan["probe_steps"]  # the probe's plan, then each re-plan:
    history = client.get_metric_history(run["run_id"], "planned_steps")
    assert [[m.step, int(m.value)] for m in history] == plan["replans"][1:]

    replayed = run_finetune(stages_done, monkeypatch, finetune={**recipe, "replans": plan["replans"]})
    assert replayed["steps"] == replayed["steps_run"] == plan["steps"] and "plan" not in replayed
    assert replayed["epochs_run"] == planned["epochs_run"]
    with pytest.raises(config.ConfigError, match="replays a budgeted run"):
        pipeline.check(config.from_dict(tinyproject.full_params({**tinyproject.TINY, "budget": "10m",
                                                  "finetune": {**recipe, "replans": plan["replans"]}})))
    with pytest.raises(config.ConfigError, match=r"expected \[\[0, steps\]"):
        config.from_dict(tinyproject.full_params({**tinyproject.TINY, "finetune": {**recipe, "replans": [[5, 9]]}}))


def _policies(model: keras.Model) -> set[str]:
    return {layer.dtype_policy.name for layer in model._flatten_layers() if layer.weights}


def test_precision_auto_records_its_choice_and_a_replay_trains_in_it_without_timing(stages_done, monkeypatch,
                                                                                    caplog):
    """On a CPU with bfloat16 instructions, `precision: auto` times the fine-tune
    in float32 and in mixed_bfloat16 (here a probe that says 10 and 6 s a step by
    the policy the model was built in), trains in the faster, and records both
    in the plan; the replay the log names trains in it without timing, and the
    saved model is float32 either way."""
    monkeypatch.setattr("transferlab.train.precision.cpu_has_bf16", lambda: True)
    trained_in = []
    fit = trainer_module.fit
    monkeypatch.setattr(trainer_module, "fit", lambda t, *a, **kw: (trained_in.append(_policies(t.model)),
                                                                    fit(t, *a, **kw))[1])

    def by_policy(t, batch_size):
        bf16 = "mixed_bfloat16" in _policies(t.model)
        return plans.Probe(step_seconds=6.0 if bf16 else 10.0, first_step_seconds=12.0, batch_size=batch_size)

    recipe = {**tinyproject.TINY["finetune"], "epochs": 1000}
    with caplog.at_level("INFO"):
        planned = run_finetune(stages_done, monkeypatch, probe=by_policy, budget="4m", finetune=recipe,
                            precision="auto")
    plan = planned["plan"]
    assert planned["precision"] == plan["precision"] == "mixed_bfloat16"
    assert planned["precision_step_seconds"] == plan["precision_step_seconds"] == {"float32": 10.0,
                                                                                   "mixed_bfloat16": 6.0}
    assert plan["step_seconds"] == 6.0  # planned at the chosen policy's pace
    assert trained_in == [{"mixed_bfloat16", "float32"}]  # the body in bf16, the head's float32 outputs
    saved = keras.saving.load_model(stages_done / "models" / "finetune" / "model.keras", safe_mode=True)
    assert _policies(saved) == {"float32"}
    hint = re.search(r"without the clock with (.*)", caplog.text).group(1)
    assert "precision: mixed_bfloat16" in hint

    def untimed(t, batch_size):
        raise AssertionError("a replay must not time the fine-tune")

    trained_in.clear()
    replay = {**recipe, "replans": plan["replans"]} if plan["replans"] else {**recipe, "steps": plan["steps"]}
    replayed = run_finetune(stages_done, monkeypatch, probe=untimed, finetune=replay, precision=plan["precision"])
    assert replayed["precision"] == "mixed_bfloat16" and "precision_step_seconds" not in replayed
    assert trained_in == [{"mixed_bfloat16", "float32"}]
    assert replayed["steps_run"] == planned["steps_run"]


def test_precision_auto_on_a_cpu_without_bfloat16_trains_in_float32_untimed(stages_done, monkeypatch):
    monkeypatch.setattr("transferlab.train.precision.cpu_has_bf16", lambda: False)
    probed = []
    planned = run_finetune(stages_done, monkeypatch, probe=lambda t, b: probed.append(_policies(t.model)) or SLOW,
                        budget="10m", precision="auto")
    assert planned["precision"] == planned["plan"]["precision"] == "float32"
    assert "precision_step_seconds" not in planned and planned["plan"]["precision_step_seconds"] == {}
    assert probed == [{"float32"}]  # the budget's probe alone


class StepsDone(keras.callbacks.Callback):
    """The optimizer steps done so far, counted as each ends."""

    done = 0

    def on_train_batch_end(self, batch, logs=None):
        self.done += 1


def test_a_fine_tune_past_its_window_ends_there_and_the_stop_replays(stages_done, monkeypatch):
    """The machine slows down after the plan: the deadline's clock jumps past the
    fine-tune's window after its sixth step. The run ends at that step, the plan
    in metrics/ records it as [6, 6], and the recorded replans replay the run to
    that step without the clock."""
    steps, real = StepsDone(), time.monotonic  # the stage's callbacks run before the budget's
    monkeypatch.setattr(callback, "time", types.SimpleNamespace(
        monotonic=lambda: real() + (1e6 if steps.done >= 6 else 0.0), perf_counter=time.perf_counter))
    recipe = {**tinyproject.TINY["finetune"], "epochs": 1000, "batch_size": 1}
    planned = run_finetune(stages_done, monkeypatch, probe=SLOW, budget="10m", finetune=recipe, callbacks=[steps])
    plan = planned["plan"]
    assert plan["probe_steps"] > 6 and plan["replans"][0] == [0, plan["probe_steps"]]
    assert plan["replans"][-1] == [6, 6] and plan["steps"] == planned["steps"] == planned["steps_run"] == 6
    assert json.loads((stages_done / "metrics" / "finetune.json").read_text())["plan"] == plan
    monkeypatch.undo()
    replayed = run_finetune(stages_done, monkeypatch, finetune={**recipe, "replans": plan["replans"]})
    assert replayed["steps"] == replayed["steps_run"] == 6
    for wrong in ([[0, 47], [6, 5]], [[0, 47], [6, 6], [8, 9]], [[0, 0]]):  # only the last may end at its step
        with pytest.raises(config.ConfigError, match=r"expected \[\[0, steps\]"):
            config.from_dict(tinyproject.full_params({**tinyproject.TINY, "finetune": {**recipe, "replans": wrong}}))


def test_min_steps_stretches_early_stopping_and_the_warmup_with_the_schedule(stages_done, monkeypatch):
    """A learning rate of zero never improves on the first epoch: early stopping
    would end the run after `patience` epochs, but the schedule that min_steps
    stretched to 3x the recipe's length waits 3x as long, and runs to its end.
    Its warmup is 3x as long too: the same share of the schedule."""
    tiny = {**tinyproject.TINY["finetune"], "epochs": 1, "patience": 1, "learning_rate": 0.0, "warmup_epochs": 0.5}
    n_train = json.loads((stages_done / "metrics" / "prepare.json").read_text())["train_images"]
    per_epoch = -(-n_train // tiny["batch_size"])
    ran = run_finetune(stages_done, monkeypatch, finetune={**tiny, "min_steps": 3 * per_epoch})
    assert ran["steps"] == 3 * per_epoch and ran["steps_run"] == ran["steps"] and ran["epochs_run"] == 3
    assert per_epoch >= 2 and ran["warmup_steps"] == round(1.5 * per_epoch)  # unstretched: round(0.5 * per_epoch)


def test_a_budget_spent_before_the_fine_tune_is_a_clear_error(stages_done, monkeypatch):
    with pytest.raises(plans.BudgetError, match=r"smallest budget that fits is \d+m"):
        run_finetune(stages_done, monkeypatch, budget="1s")



def test_features_and_fine_tune_resolve_auto_input_size_alike(tmp_path, monkeypatch):
    """`backbone.input_size: auto` under a short budget and under none: the
    features stage extracts at the budget's size and the fine-tune trains and
    saves the model at that same size (32 and 48 px here, for speed)."""
    monkeypatch.setattr(plans, "SHORT_SIZE", 32)
    monkeypatch.setattr(plans, "LONG_SIZE", 48)
    monkeypatch.setattr("transferlab.train.trainer.probe", lambda t, batch_size: SLOW)
    synth.make_image_folder(tmp_path / "tiny-images", per_class=6, test_per_class=2, size=16)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    backbone = {**tinyproject.TINY["backbone"], "input_size": "auto"}
    for i, (budget_value, size) in enumerate((("10m", 32), (0, 48))):
        params = config.from_dict(tinyproject.full_params(
            {**tinyproject.TINY, "budget": budget_value, "backbone": backbone,
             "finetune": {**tinyproject.TINY["finetune"], "epochs": 1}}))
        for stage in (prepare, features, head)[min(i, 1):]:
            stage.main(params)
        meta = json.loads((tmp_path / "data/features/efficientnet_lite0-auto/meta.json").read_text())
        assert meta["input_size"] == size
        assert json.loads((tmp_path / "metrics/features.json").read_text())["input_size"] == size
        sizes = tinyproject.input_sizes_callback()
        assert finetune.main(params, callbacks=[sizes])["input_size"] == size
        assert set(sizes.sizes) == {size}
        saved = keras.saving.load_model(tmp_path / "models/finetune/model.keras", safe_mode=True)
        assert saved.get_layer("efficientnet_lite0_body").input.shape[1:] == (size, size, 3)
