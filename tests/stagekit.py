"""The tiny project's fine-tune stage under a budget, for the tests that run it
on the folder of the `stages_done` fixture (conftest.py): tests/test_budget.py,
tests/test_stage_outcomes.py."""

import tinyproject
from transferlab import config
from transferlab.budget import plans
from transferlab.stages import finetune

SLOW = plans.Probe(step_seconds=10.0, first_step_seconds=12.0, batch_size=8)


def run_finetune(folder, monkeypatch, probe=None, callbacks=None, **over):
    """The fine-tune stage; `probe`: a step time to plan with instead of the one
    measured, so that a budget of minutes plans a few dozen tiny steps, not thousands."""
    if probe is not None:  # a Probe, or a function of (fine-tune, batch size) giving one
        monkeypatch.setattr("transferlab.train.trainer.probe",
                            probe if callable(probe) else lambda t, batch_size: probe)
    monkeypatch.chdir(folder)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    raw = tinyproject.full_params({**tinyproject.TINY, **over})
    return finetune.main(config.from_dict(raw), callbacks=callbacks)
