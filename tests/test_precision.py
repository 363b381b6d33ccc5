"""The fine-tune's precision: which policy `auto` picks from timed steps, and
where it times at all. (The stage under a budget: tests/test_budget.py.)"""

import keras

from transferlab.budget.plans import Probe
from transferlab.train import precision


def test_bfloat16_is_chosen_only_when_clearly_faster():
    assert precision.choose({"float32": 1.0, "mixed_bfloat16": 0.5}).precision == "mixed_bfloat16"
    assert precision.choose({"float32": 1.0, "mixed_bfloat16": 0.97}).precision == "float32"  # within noise
    slower = precision.choose({"float32": 0.18, "mixed_bfloat16": 0.32})  # as on an AMD EPYC
    assert slower.precision == "float32" and slower.step_seconds == {"float32": 0.18, "mixed_bfloat16": 0.32}
    assert slower.reason == precision.choose({"float32": 0.2, "mixed_bfloat16": 0.3}).reason  # no timing in it


def test_bfloat16_instructions_are_read_from_the_cpu_flags(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu avx512f avx512_bf16 amx_tile\n")
    assert precision.cpu_has_bf16(info)
    info.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_vnni\n")
    assert not precision.cpu_has_bf16(info)
    info.write_text("processor\t: 0\nFeatures\t: fp asimd bf16 i8mm\n")  # aarch64
    assert precision.cpu_has_bf16(info)
    assert not precision.cpu_has_bf16(tmp_path / "missing")


def test_only_auto_on_a_cpu_with_bfloat16_times_both(monkeypatch):
    built, probed = [], []

    def build(policy):
        built.append((policy, keras.mixed_precision.global_policy().name))
        return policy

    def probe(made):
        probed.append(made)
        return Probe(step_seconds={"float32": 2.0, "mixed_bfloat16": 1.0}[made], first_step_seconds=3.0,
                     batch_size=8)

    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: True)
    choice, made, timed = precision.select("auto", "cpu", None, build, probe)
    assert (choice.precision, made, timed.step_seconds) == ("mixed_bfloat16", "mixed_bfloat16", 1.0)
    assert built == [("float32", "float32"), ("mixed_bfloat16", "mixed_bfloat16")]  # each under its policy
    assert keras.mixed_precision.global_policy().name == "float32"  # and the global one restored

    built.clear(), probed.clear()
    assert precision.select("float32", "cpu", None, build, probe)[0].precision == "float32"
    assert precision.select("auto", "gpu", None, build, probe)[0].precision == "mixed_float16"
    resumed = {"precision": "mixed_bfloat16", "precision_step_seconds": {"float32": 2.0, "mixed_bfloat16": 1.0}}
    assert precision.select("auto", "cpu", resumed, build, probe)[0].precision == "mixed_bfloat16"
    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: False)
    assert precision.select("auto", "cpu", None, build, probe)[0].precision == "float32"
    assert probed == [] and [b for b, _ in built] == ["float32", "mixed_float16", "mixed_bfloat16", "float32"]
    assert keras.mixed_precision.global_policy().name == "float32"
