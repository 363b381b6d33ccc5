import time, numpy as np, keras, sys
from keras import layers
from transferlab import backbones, finetune, training
spec = backbones.get("efficientnet_lite0")
S = int(sys.argv[1]) if len(sys.argv) > 1 else 160
rng = np.random.default_rng(0)
B = 128
x = rng.integers(0, 255, (B, 32, 32, 3), dtype=np.uint8); y = rng.integers(0, 10, B)
def build(freeze_dw):
    body = backbones.build_body("efficientnet_lite0", S, "imagenet")
    finetune.set_trainable(spec, body, 6)
    n = 0
    if freeze_dw:
        for l in body.layers:
            if isinstance(l, layers.DepthwiseConv2D) and l.trainable:
                l.trainable = False; n += 1
    h = keras.Sequential([keras.Input((1280,)), keras.layers.Dense(512, activation="relu"), keras.layers.Dropout(0.3), keras.layers.Dense(10, activation="softmax")])
    aug = finetune.augmentation(flip=True, shift=0.1, seed=0)
    m = finetune.assemble(spec, body, h, 32, S, aug)
    training.compile_model(m, "adamw", 1e-4, 3e-5, 0.15)
    print("frozen dw layers", n, "trainable weights", len(m.trainable_weights),
          "params", sum(int(np.prod(w.shape)) for w in m.trainable_weights), flush=True)
    return m
models = {"default": build(False), "dw_frozen": build(True)}
for m in models.values():
    m.train_on_batch(x, y); m.train_on_batch(x, y)
times = {k: [] for k in models}
for r in range(4):
    for k, m in models.items():
        t = time.perf_counter()
        for _ in range(3): m.train_on_batch(x, y)
        times[k].append((time.perf_counter() - t) / 3)
    print(r, {k: round(v[-1], 3) for k, v in times.items()}, flush=True)
print("median", {k: round(float(np.median(v)), 3) for k, v in times.items()})
