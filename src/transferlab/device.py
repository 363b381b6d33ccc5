"""The device and the run's randomness, set once at the start of every stage.

Nothing else in the code assumes a CPU or a GPU.
"""

from __future__ import annotations

import logging

import keras

log = logging.getLogger(__name__)


def seed_everything(seed: int, deterministic: bool) -> None:
    """Seed Python, NumPy and TensorFlow; deterministic=True adds TensorFlow's
    deterministic ops (slower), so that two runs give identical numbers."""
    keras.utils.set_random_seed(seed)
    if deterministic:
        import tensorflow as tf

        tf.config.experimental.enable_op_determinism()


def configure_device() -> str:
    """Use a GPU when TensorFlow sees one: memory grown on demand and the
    mixed_float16 policy (heads keep float32 outputs). Returns "gpu" or "cpu";
    nothing else in the code assumes either."""
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if not gpus:
        return "cpu"
    for gpu in gpus:
        try:
            tf.config.experimental.set_memory_growth(gpu, True)
        except (RuntimeError, ValueError):  # already initialised: keep its setting
            pass
    keras.mixed_precision.set_global_policy("mixed_float16")
    log.info("%d GPU(s) visible: mixed_float16 policy, float32 outputs", len(gpus))
    return "gpu"
