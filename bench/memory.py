"""Peak memory of prepare + features as the data set grows: a synthetic folder of
JPEG photos-like images at 224 px, prepared and featurized at 224 px, at two
sizes, each run in its own process so each has its own peak RSS.

    python -m bench memory                     # 2,000 and 20,000 images
    python -m bench memory --sizes 500 5000 --weights none

Prints a table of images, decoded size, peak RSS and the ratio of the largest
run's peak to the smallest's (the target is <= 1.5x), and writes the run into
docs/bench/<date>-<--name>/ (or --out). Asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_output_arguments, cpu_description, output_folder, write_run  # noqa: E402
CLASSES = 10
SIZE = 224


def make_folder(dest: Path, n: int, seed: int = 0) -> None:
    """`n` JPEGs in CLASSES class folders: smooth colour fields with a class-tinted
    blob, so they compress like photos (not like noise)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE] / SIZE
    for i in range(n):
        c = i % CLASSES
        folder = dest / f"class{c}"
        folder.mkdir(parents=True, exist_ok=True)
        cx, cy, r = rng.uniform(0.2, 0.8, 2).tolist() + [rng.uniform(0.1, 0.3)]
        blob = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * r * r))
        base = rng.uniform(0, 255, 3)
        tint = np.array([(c * 53) % 255, (c * 97) % 255, (c * 151) % 255])
        img = base * (1 - blob[..., None]) + tint * blob[..., None] + rng.normal(0, 8, (SIZE, SIZE, 3))
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(folder / f"{i:06d}.jpg", quality=90)


def run_one(folder: Path, workdir: Path, weights: str) -> dict:
    """prepare + features in this process; returns the stage times and peak RSS."""
    from transferlab import config
    from transferlab.run import apply_overrides
    from transferlab.stages import features, prepare

    workdir.mkdir(parents=True, exist_ok=True)
    os.chdir(workdir)
    shutil.copy(ROOT / "params.yaml", "params.yaml")
    apply_overrides(Path("params.yaml"), [f"data.source={folder}", "data.checksum=null", f"data.image_size={SIZE}",
                                          f"backbone.input_size={SIZE}", f"backbone.weights={weights}"])
    params = config.load("params.yaml")
    times = {}
    for name, stage in (("prepare", prepare), ("features", features)):
        start = time.perf_counter()
        stage.main(params)
        times[name] = round(time.perf_counter() - start, 1)
    return {"seconds": times, "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[2000, 20000])
    p.add_argument("--weights", default="imagenet")
    p.add_argument("--workdir", default=str(ROOT / "bench/work-memory"))
    add_output_arguments(p, "memory")
    p.add_argument("--one", nargs=2, metavar=("FOLDER", "WORKDIR"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one:
        print(json.dumps(run_one(Path(args.one[0]), Path(args.one[1]), args.weights)))
        return 0
    work = Path(args.workdir).resolve()
    shutil.rmtree(work, ignore_errors=True)
    rows = []
    for n in sorted(args.sizes):
        folder = work / f"images-{n}"
        start = time.perf_counter()
        make_folder(folder, n)
        print(f"[memory] {n} images written in {time.perf_counter() - start:.0f} s", flush=True)
        out = subprocess.run([sys.executable, __file__, "--weights", args.weights, "--one", str(folder),
                              str(work / f"run-{n}")], check=True, capture_output=True, text=True)
        result = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append({"images": n, "decoded_gb": round(n * SIZE * SIZE * 3 / 2**30, 2), **result})
        print(f"[memory] {rows[-1]}", flush=True)
        shutil.rmtree(folder)
        shutil.rmtree(work / f"run-{n}")
    ratio = rows[-1]["peak_rss_gb"] / rows[0]["peak_rss_gb"]
    cpu = cpu_description()
    lines = [f"Measured {time.strftime('%Y-%m-%d')} on {cpu}: prepare + features at "
             f"{SIZE} px, efficientnet_lite0, weights {args.weights}.", "",
             "| images | decoded | prepare s | features s | peak RSS |", "| --- | --- | --- | --- | --- |"]
    lines += [f"| {r['images']:,} | {r['decoded_gb']} GB | {r['seconds']['prepare']} | {r['seconds']['features']} | "
              f"{r['peak_rss_gb']:.2f} GB |" for r in rows]
    lines += ["", f"Peak RSS of the largest run / the smallest: {ratio:.2f}x (target <= 1.5x: "
                  f"{'met' if ratio <= 1.5 else 'NOT met'})."]
    text = "\n".join(lines) + "\n"
    write_run(output_folder(args), "memory", {"peak_rss_gb_by_images": {str(r["images"]): r["peak_rss_gb"] for r in rows},
                                              "peak_rss_ratio": round(ratio, 2)}, {"rows": rows}, text, argv, cpu=cpu)
    return 0


if __name__ == "__main__":
    sys.exit(main())
