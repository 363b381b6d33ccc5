import time, numpy as np, keras, sys
from transferlab import backbones, finetune, training
spec = backbones.get("efficientnet_lite0")
S = 160
body = backbones.build_body("efficientnet_lite0", S, "imagenet")
finetune.set_trainable(spec, body, 6)
h = keras.Sequential([keras.Input((1280,)), keras.layers.Dense(512, activation="relu"), keras.layers.Dropout(0.3), keras.layers.Dense(10, activation="softmax")])
rng = np.random.default_rng(0)
x = rng.integers(0, 255, (128, 32, 32, 3), dtype=np.uint8); y = rng.integers(0, 10, 128)
def times(fn, n=8):
    fn(); fn()
    ts = []
    for _ in range(n):
        t = time.perf_counter(); fn(); ts.append(time.perf_counter() - t)
    return np.round(ts, 3)
models = {}
for name, aug in [("noaug", []), ("flip", finetune.augmentation(flip=True, seed=0)), ("both", finetune.augmentation(flip=True, shift=0.1, seed=0))]:
    m = finetune.assemble(spec, body, h, 32, S, aug)
    training.compile_model(m, "adamw", 1e-4, 3e-5, 0.15)
    models[name] = m
for rnd in range(2):
    for name, m in models.items():
        print(rnd, name, times(lambda: m.train_on_batch(x, y)), flush=True)
