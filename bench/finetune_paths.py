"""Fine-tuning throughput: the full path against the cached path.

    python -m bench finetune_paths [--backbone efficientnet_lite0] [--input-size 128]
                                   [--images 1024] [--unfreeze 1 2 3 5 all]

For each unfreeze depth it measures, on random uint8 32x32 images (throughput
does not depend on the pixels), with real or random weights alike:
- full:   images/s of one training epoch through augmentation, upscale and the
          whole backbone (what every epoch costs on the slow path);
- cache:  images/s of the one-off pass that caches the boundary activations
          (both flips, so it runs twice per training image);
- cached: images/s of one training epoch on the cached activations.
Then the break-even: the cached path wins once epochs * (1/full - 1/cached)
exceeds 2/cache, per image. Prints a table and writes the run into
docs/bench/<date>-<--name>/ (or --out); asserts nothing about time.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402

from transferlab import backbones, features, head  # noqa: E402
from transferlab.train import recipe, surgery, trainer  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_output_arguments, output_folder, write_run  # noqa: E402


def timed_epoch(model, data, **kwargs) -> float:
    model.fit(data, epochs=1, verbose=0, steps_per_epoch=1, **kwargs)  # compile and warm up
    start = time.perf_counter()
    model.fit(data, epochs=1, verbose=0, **kwargs)
    return time.perf_counter() - start


def measure(name: str, input_size: int, n: int, unfreeze, batch_size: int) -> dict:
    keras.utils.set_random_seed(0)
    spec = backbones.get(name)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 255, (n, 32, 32, 3), dtype=np.uint8)
    y = rng.integers(0, 10, n)
    hm = head.build_head(spec.feature_dim, 10, 512, 0.5)
    row = {"unfreeze": unfreeze}

    body = backbones.build_body(name, input_size, weights=None)
    surgery.set_trainable(spec, body, unfreeze)
    model = surgery.assemble(spec, body, hm, 32, input_size, surgery.augmentation(True, 0.1, 0.05, 0.1, seed=0))
    recipe.compile_model(model, "adamw", 1e-3, 1e-4)
    row["full_img_s"] = n / timed_epoch(model, x, y=y, batch_size=batch_size)

    if surgery.n_unfrozen(spec, unfreeze) >= len(spec.blocks):
        row.update(cache_img_s=float("nan"), cached_img_s=float("nan"), break_even_epochs=float("nan"))
        return row
    split = surgery.split_body(spec, body, unfreeze)
    extractor = surgery.cache_extractor(spec, split, 32, input_size)
    shape = tuple(int(d) for d in extractor.output[0].shape[1:])
    acts = np.empty((n, *shape), np.float16)
    flipped = np.empty_like(acts)
    features.extract_into(extractor, x[:batch_size], [acts[:batch_size], None], batch_size, "warm-up")
    start = time.perf_counter()
    features.extract_into(extractor, x, [acts, None], batch_size, "cache")
    features.extract_into(extractor, x, [flipped, None], batch_size, "cache flipped", flip=True)
    row["cache_img_s"] = n / (time.perf_counter() - start)  # per training image, both flips
    upper = surgery.assemble_upper(split, hm)
    recipe.compile_model(upper, "adamw", 1e-3, 1e-4)
    data = trainer.FlipCacheDataset(acts, flipped, y, batch_size, 0)
    row["cached_img_s"] = n / timed_epoch(upper, data)
    saved = 1 / row["full_img_s"] - 1 / row["cached_img_s"]
    row["break_even_epochs"] = (1 / row["cache_img_s"]) / saved if saved > 0 else float("inf")
    return row


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--input-size", type=int, default=128)
    parser.add_argument("--images", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--unfreeze", nargs="+", default=["1", "2", "3", "5", "all"])
    add_output_arguments(parser, "finetune-paths")
    args = parser.parse_args(argv)
    lines = []

    def say(line: str) -> None:
        print(line, flush=True)
        lines.append(line)

    say(f"# {args.backbone} at {args.input_size} px, {args.images} images, batch {args.batch_size}, "
        f"{os.cpu_count()} CPU cores, {platform.machine()}")
    say("| unfreeze | full: train img/s | cache pass img/s (both flips) | cached: train img/s | "
        "speed-up per epoch | cached wins after epochs |")
    say("| --- | --- | --- | --- | --- | --- |")
    rows = []
    for u in args.unfreeze:
        r = measure(args.backbone, args.input_size, args.images, u if u == "all" else int(u), args.batch_size)
        rows.append(r)
        say(f"| {r['unfreeze']} | {r['full_img_s']:.1f} | {r['cache_img_s']:.1f} | {r['cached_img_s']:.1f} | "
            f"{r['cached_img_s'] / r['full_img_s']:.1f}x | {r['break_even_epochs']:.2f} |")
    # NaN and infinity are not JSON: an unmeasured or never-reached figure is null
    clean = [{k: (v if not isinstance(v, float) or v == v and abs(v) != float("inf") else None) for k, v in r.items()}
             for r in rows]
    write_run(output_folder(args), "finetune_paths", {"rows": clean}, {"backbone": args.backbone,
              "input_size": args.input_size, "images": args.images, "batch_size": args.batch_size}, "\n".join(lines) + "\n", argv, echo=False)


if __name__ == "__main__":
    main()
