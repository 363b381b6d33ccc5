"""Ad-hoc: does averaging shifted views (reflect-padded, 2 px) on top of flips gain accuracy?"""
import sys, time, numpy as np, keras
from transferlab import data, tta
from transferlab.features import extract
W = sys.argv[1]
p = data.load_prepared(f"{W}/data/prepared", mmap=False)
model = keras.models.load_model(f"{W}/models/finetune/model.keras")
logits = tta.logits_model(model)
def shift(x, dy, dx, k=2):
    pad = np.pad(x, ((0, 0), (k, k), (k, k), (0, 0)), mode="reflect")
    return pad[:, k + dy:k + dy + x.shape[1], k + dx:k + dx + x.shape[2]]
views = {"id": lambda x: x, "flip": lambda x: x[:, :, ::-1],
         "x+2": lambda x: shift(x, 0, 2), "x-2": lambda x: shift(x, 0, -2),
         "y+2": lambda x: shift(x, 2, 0), "y-2": lambda x: shift(x, -2, 0)}
def sm(z): z = z - z.max(1, keepdims=True); e = np.exp(z); return e / e.sum(1, keepdims=True)
for split in ("val", "test"):
    x, y = p.x[split], p.y[split]
    L = {}
    for name, f in views.items():
        t = time.time(); L[name] = extract(logits, np.ascontiguousarray(f(x)), 64, f"{split} {name}"); 
        print(split, name, f"{time.time()-t:.0f}s acc {np.mean(L[name].argmax(1) == y)*100:.2f}", flush=True)
    for combo in (["id"], ["id", "flip"], ["id", "x+2", "x-2"], ["id", "flip", "x+2", "x-2"], list(views)):
        pr = np.mean([sm(L[v]) for v in combo], 0)
        nll = -np.mean(np.log(pr[np.arange(len(y)), y] + 1e-12))
        print(split, "+".join(combo), f"acc {np.mean(pr.argmax(1) == y)*100:.2f} nll {nll:.4f}", flush=True)
