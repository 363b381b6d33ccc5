import time, numpy as np, keras, sys, tensorflow as tf
from transferlab import backbones, finetune, training
spec = backbones.get("efficientnet_lite0")
S = 160
body = backbones.build_body("efficientnet_lite0", S, "imagenet")
finetune.set_trainable(spec, body, 6)
h = keras.Sequential([keras.Input((1280,)), keras.layers.Dense(512, activation="relu"), keras.layers.Dropout(0.3), keras.layers.Dense(10, activation="softmax")])
rng = np.random.default_rng(0)
x = rng.integers(0, 255, (128, 32, 32, 3), dtype=np.uint8); y = rng.integers(0, 10, 128)
m = finetune.assemble(spec, body, h, 32, S, finetune.augmentation(flip=True, shift=0.1, seed=0))
training.compile_model(m, "adamw", 1e-4, 3e-5, 0.15)
for _ in range(3): m.train_on_batch(x, y)
tf.profiler.experimental.start("/tmp/prof/logdir")
for _ in range(4): m.train_on_batch(x, y)
tf.profiler.experimental.stop()
