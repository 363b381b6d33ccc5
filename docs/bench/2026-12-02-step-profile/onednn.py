import time, numpy as np, keras, sys, os
from transferlab import backbones, finetune, training
spec = backbones.get("efficientnet_lite0")
body = backbones.build_body("efficientnet_lite0", 160, "imagenet")
finetune.set_trainable(spec, body, 6)
h = keras.Sequential([keras.Input((1280,)), keras.layers.Dense(512, activation="relu"), keras.layers.Dropout(0.3), keras.layers.Dense(10, activation="softmax")])
rng = np.random.default_rng(0)
x = rng.integers(0, 255, (128, 32, 32, 3), dtype=np.uint8); y = rng.integers(0, 10, 128)
m = finetune.assemble(spec, body, h, 32, 160, finetune.augmentation(flip=True, shift=0.1, seed=0))
training.compile_model(m, "adamw", 1e-4, 3e-5, 0.15)
for _ in range(2): m.train_on_batch(x, y)
ts = []
for _ in range(8):
    t = time.perf_counter(); m.train_on_batch(x, y); ts.append(time.perf_counter() - t)
print(os.environ.get("TF_ENABLE_ONEDNN_OPTS", "default"), "median", round(float(np.median(ts)), 3), np.round(ts, 2), flush=True)
