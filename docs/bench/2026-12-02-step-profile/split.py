import time, numpy as np, keras, sys
from transferlab import backbones, finetune, training
spec = backbones.get("efficientnet_lite0")
S = int(sys.argv[1]) if len(sys.argv) > 1 else 160
body = backbones.build_body("efficientnet_lite0", S, "imagenet")
finetune.set_trainable(spec, body, 6)
split = finetune.split_body(spec, body, 6)
h = keras.Sequential([keras.Input((1280,)), keras.layers.Dense(512, activation="relu"), keras.layers.Dropout(0.3), keras.layers.Dense(10, activation="softmax")])
rng = np.random.default_rng(0)
B = 128
x = rng.integers(0, 255, (B, 32, 32, 3), dtype=np.uint8); y = rng.integers(0, 10, B)
def med(fn, n=6):
    fn(); fn()
    ts = []
    for _ in range(n):
        t = time.perf_counter(); fn(); ts.append(time.perf_counter() - t)
    return float(np.median(ts))
aug = finetune.augmentation(flip=True, shift=0.1, seed=0)
full = finetune.assemble(spec, body, h, 32, S, aug)
training.compile_model(full, "adamw", 1e-4, 3e-5, 0.15)
print("train step, full, aug", med(lambda: full.train_on_batch(x, y)), flush=True)
noaug = finetune.assemble(spec, body, h, 32, S, [])
training.compile_model(noaug, "adamw", 1e-4, 3e-5, 0.15)
print("train step, full, no aug", med(lambda: noaug.train_on_batch(x, y)), flush=True)
print("inference forward, full", med(lambda: noaug.predict_on_batch(x)), flush=True)
inputs, t = backbones.image_input(spec, 32, S)
lower = keras.Model(inputs, split.lower(t, training=False))
print("inference forward, frozen lower", med(lambda: lower.predict_on_batch(x)), flush=True)
acts = lower.predict_on_batch(x)
print("acts shape", acts.shape)
upper = finetune.assemble_upper(split, h)
training.compile_model(upper, "adamw", 1e-4, 3e-5, 0.15)
print("train step, upper from acts", med(lambda: upper.train_on_batch(acts, y)), flush=True)
