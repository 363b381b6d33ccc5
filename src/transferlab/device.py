"""The device, the distribution strategy and the run's randomness, set once at
the start of every stage.

Nothing else in the code assumes a CPU or a GPU, or one device: the head and
the fine-tune build and train their models under `strategy(...).scope()`, with
`global_batch` (the params' batch sizes are per replica).
"""

from __future__ import annotations

import logging
import os

import keras

from transferlab.errors import DistributeError

log = logging.getLogger(__name__)


def seed_everything(seed: int, deterministic: bool) -> None:
    """Seed Python, NumPy and TensorFlow; deterministic=True adds TensorFlow's
    deterministic ops (slower), so that two runs give identical numbers."""
    keras.utils.set_random_seed(seed)
    if deterministic:
        import tensorflow as tf

        tf.config.experimental.enable_op_determinism()


def kind() -> str:
    """"gpu" where TensorFlow sees one, else "cpu"."""
    import tensorflow as tf

    return "gpu" if tf.config.list_physical_devices("GPU") else "cpu"


def configure_device(precision: str = "auto") -> str:
    """Use a GPU when TensorFlow sees one: memory grown on demand and the dtype
    policy of params' `precision` for every stage (`auto`: mixed_float16; heads
    keep float32 outputs). On a CPU every stage but the fine-tune computes in
    float32 (the fine-tune's own policy: `transferlab.train.precision`).
    Returns "gpu" or "cpu"; nothing else in the code assumes either."""
    import tensorflow as tf

    if kind() == "cpu":
        return "cpu"
    gpus = tf.config.list_physical_devices("GPU")
    for gpu in gpus:
        try:
            tf.config.experimental.set_memory_growth(gpu, True)
        except (RuntimeError, ValueError):  # already initialised: keep its setting
            pass
    policy = "mixed_float16" if precision == "auto" else precision
    keras.mixed_precision.set_global_policy(policy)
    log.info("%d GPU(s) visible: %s policy, float32 outputs", len(gpus), policy)
    return "gpu"


_strategies: dict = {}

# Keras 3 cannot fit under MultiWorkerMirroredStrategy yet: model.fit fails even for a
# two-layer model (Keras 3.15, TF 2.21); tests/test_distribute.py checks that this is
# still so, and fails once it is fixed upstream.
MULTI_WORKER_ISSUE = "https://github.com/keras-team/keras/issues/20585"


def strategy(mode: str = "auto"):
    """The tf.distribute strategy the head and the fine-tune train under (params
    key `distribute`), made once per process:
    - more than one GPU (mode "auto" or "mirrored"): MirroredStrategy over them;
    - mode "mirrored" without GPUs: MirroredStrategy over every logical CPU device
      (`tf.config.set_logical_device_configuration` makes several; the tests do);
    - otherwise: TensorFlow's default strategy, one device.
    TF_CONFIG (several machines) is refused unless mode is "none": Keras 3's
    model.fit fails under MultiWorkerMirroredStrategy (MULTI_WORKER_ISSUE)."""
    import tensorflow as tf

    if mode != "none" and os.environ.get("TF_CONFIG"):
        raise DistributeError(
            "TF_CONFIG is set, but Keras 3 cannot train under MultiWorkerMirroredStrategy yet (model.fit fails "
            f"upstream: {MULTI_WORKER_ISSUE}). Unset TF_CONFIG (or set distribute: none in params.yaml); for "
            "several GPUs use one machine (MirroredStrategy), for several machines an Optuna study's workers "
            "(docs/search.md: Several workers)")
    if mode in _strategies:
        return _strategies[mode]
    gpus = [d.name for d in tf.config.list_logical_devices("GPU")]
    devices = gpus if (mode == "auto" and len(gpus) > 1) or (mode == "mirrored" and gpus) else \
        [d.name for d in tf.config.list_logical_devices("CPU")] if mode == "mirrored" else []
    if devices:
        made = tf.distribute.MirroredStrategy(devices)
        log.info("MirroredStrategy over %s", ", ".join(devices))
    else:
        made = tf.distribute.get_strategy()
    _strategies[mode] = made
    return made


def replicas(mode: str = "auto") -> int:
    return int(strategy(mode).num_replicas_in_sync)


def global_batch(per_replica: int, mode: str = "auto") -> int:
    """The batch size of one optimizer step: the params' (per replica) times the
    replicas in sync, so each device keeps the batch the params give it."""
    return per_replica * replicas(mode)
