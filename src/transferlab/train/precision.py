"""The fine-tune's compute precision (params key `precision`): the Keras dtype
policy its model trains under. Its variables stay float32 under every policy,
and the model the stage saves is float32 on a CPU whatever trained it.

- `float32`, `mixed_bfloat16`, `mixed_float16`: that policy;
- `auto` on a GPU: `mixed_float16` (`transferlab.device.configure_device` sets it
  for every stage, as a GPU's tensor cores want);
- `auto` on a CPU: a few training steps of the real model timed in float32 and
  in mixed_bfloat16 (`select`, with the budget's probe), and the fine-tune
  trains in the faster. bfloat16 must win by `MARGIN` to be chosen: on a 2-core
  AMD EPYC with avx512_bf16 and no AMX it was 1.8 times slower
  (docs/bench/2026-12-04-precision);
  Intel's AMX tiles are where it can win. A CPU without bf16 instructions is not
  timed: TensorFlow would emulate bfloat16 there.

The choice and both step times go to metrics/finetune.json, the budget's plan
and the MLflow run; the plan's replay hint names the precision, so that a replay
trains in it without timing.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from pathlib import Path

import keras

log = logging.getLogger(__name__)

CHOICES = ("auto", "float32", "mixed_bfloat16", "mixed_float16")
CPU_CANDIDATES = ("float32", "mixed_bfloat16")
# bfloat16 is chosen only when its step is at least this much faster: the probe's steps vary by a
# few per cent from one run to the next, and float32 is the precision every default was measured in
MARGIN = 0.05
BF16_FLAGS = ("amx_bf16", "avx512_bf16", "avx_ne_convert", "bf16")  # /proc/cpuinfo: x86 and aarch64


@dataclass(frozen=True)
class Choice:
    """The policy the fine-tune trains in, and why."""

    precision: str
    reason: str
    step_seconds: dict = field(default_factory=dict)  # each timed policy's mean step; empty: not timed

    @property
    def timed(self) -> bool:
        return bool(self.step_seconds)


def cpu_has_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether the CPU reports bfloat16 instructions (x86: AMX or AVX-512 BF16;
    aarch64: BF16). Unknown (no /proc/cpuinfo): False."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return False
    flags = {word for line in text.splitlines() if line.split(":")[0].strip() in ("flags", "Features")
             for word in line.split(":", 1)[1].split()}
    return any(flag in flags for flag in BF16_FLAGS)


def resolve(precision: str, device_kind: str) -> Choice | None:
    """The choice made without timing, or None where `auto` must time the
    candidates (a CPU with bfloat16 instructions). `device_kind`: "gpu" | "cpu"
    (`device.configure_device`)."""
    if precision != "auto":
        return Choice(precision, "set in params.yaml")
    if device_kind == "gpu":
        return Choice("mixed_float16", "auto on a GPU")
    if not cpu_has_bf16():
        return Choice("float32", "auto on a CPU without bfloat16 instructions (not timed)")
    return None


def choose(step_seconds: dict[str, float]) -> Choice:
    """The faster of the timed policies; bfloat16 only when faster by `MARGIN`."""
    f32, bf16 = step_seconds["float32"], step_seconds["mixed_bfloat16"]
    # the reason names the rule, not the ratio: metrics/finetune.json stays the same from run to
    # run where the choice does (the times themselves are in precision_step_seconds and the log)
    if bf16 < (1 - MARGIN) * f32:
        return Choice("mixed_bfloat16", f"auto: timed, bfloat16 faster by {MARGIN:.0%} or more", dict(step_seconds))
    return Choice("float32", f"auto: timed, bfloat16 not {MARGIN:.0%} faster", dict(step_seconds))


@contextlib.contextmanager
def policy(name: str):
    """Keras' global dtype policy set to `name` while models are built inside,
    then back to what it was (layers keep the policy they were built under)."""
    before = keras.mixed_precision.global_policy().name
    keras.mixed_precision.set_global_policy(name)
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy(before)


def select(setting: str, device_kind: str, saved: dict | None, build, probe):
    """The fine-tune's policy and the fine-tune built in it: `build(policy)`
    makes it (under that global policy), `probe(built)` times its steps
    (`trainer.probe`, which leaves every variable as it found it). The policy
    is the setting's, a resumed run's plan's (`saved`), or on a CPU with
    bfloat16 instructions the faster of `CPU_CANDIDATES`, timed. Returns
    (choice, what `build` made, the chosen one's probe where one was timed, else None)."""
    choice = resolve(setting, device_kind)
    if saved is not None:  # a resumed run trains on in the precision it planned with
        choice = Choice(saved.get("precision", "float32"), "the resumed run's plan",
                        saved.get("precision_step_seconds", {}))
    if choice is not None:
        with policy(choice.precision):
            return choice, build(choice.precision), None
    made = {}
    for name in CPU_CANDIDATES:
        with policy(name):
            built = build(name)
        made[name] = (built, probe(built))
    choice = choose({name: p.step_seconds for name, (_, p) in made.items()})
    times = choice.step_seconds
    log.info("precision: %s (%s; mean step %s; bfloat16/float32 %.2f)", choice.precision, choice.reason,
             ", ".join(f"{k} {v:.3f} s" for k, v in times.items()), times["mixed_bfloat16"] / times["float32"])
    return (choice, *made[choice.precision])


def record(choice: Choice) -> dict:
    """The choice as metrics/finetune.json and the MLflow run hold it."""
    out = {"precision": choice.precision, "precision_reason": choice.reason}
    if choice.timed:
        out["precision_step_seconds"] = {k: round(v, 4) for k, v in choice.step_seconds.items()}
    return out
