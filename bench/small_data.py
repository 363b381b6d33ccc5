"""The default pipeline on small data sets: did transfer pay off, and did the
fine-tune end no worse than the head it started from?

    python -m bench small_data                       # both sets, default params
    python -m bench small_data --sets shapes --set finetune.min_steps=0
    python -m bench small_data --sets cifar-imbalanced --set budget=10m
    python -m bench small_data --sets defects glyphs --per-class 150 --test-per-class 50 --set budget=10m

Sets, each a train/ and test/ image folder:
- cifar300: 300 training images per class (and 100 test images per class) drawn,
  seeded, from the CIFAR-10 JPEG archive in ../shared/data;
- cifar-imbalanced: the same draw with every class but the first cut to a tenth
  of its training images (--imbalance), the test split left balanced;
- shapes: rendered, non-photographic images (6 shape classes, random colours,
  sizes, positions and rotations on noisy backgrounds), 300 + 100 per class;
- defects: inspection-like 128-px textured surfaces whose class is a defect a
  few pixels wide (normal, scratch, spot, crack); defects-imbalanced: "normal"
  keeps its images, each defect a tenth of them (--imbalance), test balanced;
- glyphs: 32-px grayscale hand-drawn-like glyphs (F, L, R, an arrow) and their
  mirror images as classes of their own: a horizontal flip changes the label.

--per-class and --test-per-class size every set (defects and glyphs as the issue
measured them: --per-class 150 --test-per-class 50).

Each runs the pipeline's stages in its own process with the shipped params.yaml
(data.source pointed at the set; --set overrides more) and reports the test
accuracy (and balanced accuracy, macro-F1 and the recall of the classes with the
fewest training images), the raw-pixel baseline evaluate reports beside it, the
head's and the fine-tune's best validation accuracy, the fine-tune's steps,
whether test-time flips were kept, and the wall time. Writes the run into docs/bench/<date>-<--name>/
(or --out): results.json, README.md (a stub with the table), lscpu.txt; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_output_arguments, cpu_description, output_folder, write_run  # noqa: E402
SHAPES = ("circle", "square", "triangle", "cross", "ring", "bar")


def cifar_subset(archive: Path, dest: Path, train_per_class: int, test_per_class: int, seed: int) -> None:
    """A seeded draw of `train_per_class` / `test_per_class` images per class from
    the archive's train/ and test/ folders (read with tarfile, nothing extracted
    but the chosen files)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    with tarfile.open(archive) as tar:
        members = [m for m in tar.getmembers() if m.isfile() and m.name.endswith(".jpg")]
        by_key: dict[tuple[str, str], list[tarfile.TarInfo]] = {}
        for m in members:
            parts = Path(m.name).parts
            by_key.setdefault((parts[-3], parts[-2]), []).append(m)
        chosen = set()
        for (split, _), group in sorted(by_key.items()):
            want = train_per_class if split == "train" else test_per_class
            group = sorted(group, key=lambda m: m.name)
            chosen.update(group[i].name for i in rng.choice(len(group), size=min(want, len(group)), replace=False))
        for m in members:  # in archive order: a compressed tar reads forwards only
            if m.name in chosen:
                parts = Path(m.name).parts
                out = dest / parts[-3] / parts[-2] / parts[-1]
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_bytes(tar.extractfile(m).read())


def thin_classes(dest: Path, factor: int, keep: str | None = None) -> None:
    """Keep a `factor`-th of every training class but `keep` (default: the first,
    alphabetical): that one then has `factor` times the images of each other one."""
    classes = sorted(d for d in (dest / "train").iterdir() if d.is_dir())
    keep = keep or classes[0].name
    for folder in (c for c in classes if c.name != keep):
        files = sorted(folder.iterdir())
        for f in files[max(1, len(files) // factor):]:
            f.unlink()


def write_set(dest: Path, classes: dict, draw, train_per_class: int, test_per_class: int) -> None:
    """dest/train/<class>/NNNN.png and dest/test/<class>/NNNN.png, each image
    `draw(*classes[class])`, train first, class by class (the order the seeded
    draws came in before this helper)."""
    for split, n in (("train", train_per_class), ("test", test_per_class)):
        for name, args in classes.items():
            folder = dest / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                draw(*args).save(folder / f"{i:04d}.png")


def render_shapes(dest: Path, train_per_class: int, test_per_class: int, seed: int, size: int = 32) -> None:
    """Shape classes drawn at random colours, sizes, positions and rotations on a
    noisy background: nothing like ImageNet photographs."""
    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    big = size * 4  # drawn large, then shrunk: smooth edges

    def draw(kind: str) -> Image.Image:
        bg = rng.integers(0, 256, 3)
        noise = rng.normal(0, 45, (big, big, 3))
        img = Image.fromarray(np.clip(bg + noise, 0, 255).astype(np.uint8))
        d = ImageDraw.Draw(img)
        for _ in range(3):  # clutter: strokes of other colours across the image
            ends = [tuple(rng.uniform(0, big, 2)) for _ in range(2)]
            d.line(ends, fill=tuple(int(v) for v in rng.integers(0, 256, 3)), width=int(rng.integers(2, 8)))
        colour = tuple(int(v) for v in (bg + rng.integers(60, 196, 3)) % 256)
        r = rng.uniform(0.12, 0.3) * big
        cx, cy = rng.uniform(r, big - r, 2)
        angle = rng.uniform(0, 2 * np.pi)
        width = max(3, int(r / 4))

        def rotated(points):
            c, s = np.cos(angle), np.sin(angle)
            return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in points]

        if kind == "circle":
            d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
        elif kind == "ring":
            d.ellipse([cx - r, cy - r, cx + r, cy + r], outline=colour, width=width)
        elif kind == "square":
            d.polygon(rotated([(-r, -r), (r, -r), (r, r), (-r, r)]), fill=colour)
        elif kind == "triangle":
            d.polygon(rotated([(0, -r), (0.87 * r, 0.5 * r), (-0.87 * r, 0.5 * r)]), fill=colour)
        elif kind == "cross":
            for pts in ([(-r, -width), (r, -width), (r, width), (-r, width)],
                        [(-width, -r), (width, -r), (width, r), (-width, r)]):
                d.polygon(rotated(pts), fill=colour)
        else:  # bar
            d.polygon(rotated([(-r, -width), (r, -width), (r, width), (-r, width)]), fill=colour)
        return img.resize((size, size), Image.Resampling.LANCZOS)

    write_set(dest, {kind: (kind,) for kind in SHAPES}, draw, train_per_class, test_per_class)


GLYPHS = {  # strokes in unit coordinates (x right, y down); each has no mirror symmetry about a vertical axis
    "F": [[(0.3, 0.9), (0.3, 0.1), (0.75, 0.1)], [(0.3, 0.5), (0.65, 0.5)]],
    "L": [[(0.3, 0.1), (0.3, 0.9), (0.75, 0.9)]],
    "R": [[(0.3, 0.9), (0.3, 0.1), (0.6, 0.1), (0.72, 0.2), (0.72, 0.38), (0.6, 0.5), (0.3, 0.5)],
          [(0.5, 0.5), (0.75, 0.9)]],
    "arrow": [[(0.15, 0.5), (0.85, 0.5)], [(0.6, 0.25), (0.85, 0.5), (0.6, 0.75)]],
}


def render_glyphs(dest, train_per_class, test_per_class, seed, size=32):
    """Grayscale hand-drawn-like glyphs and their mirror images as classes of their
    own (F and F-mirrored, ...): a horizontal flip changes the label."""
    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    big = size * 4

    def draw(strokes, mirrored):
        img = Image.new("L", (big, big), int(rng.integers(200, 256)))
        d = ImageDraw.Draw(img)
        angle, scale = rng.uniform(-0.25, 0.25), rng.uniform(0.7, 1.0)
        cx, cy = rng.uniform(0.4, 0.6, 2)
        ink, width = int(rng.integers(0, 90)), int(rng.integers(5, 12))
        c, s = np.cos(angle), np.sin(angle)
        for stroke in strokes:
            points = []
            for x, y in stroke:
                x = 1 - x if mirrored else x
                x, y = (x - 0.5) * scale + rng.normal(0, 0.025), (y - 0.5) * scale + rng.normal(0, 0.025)
                points.append(((cx + x * c - y * s) * big, (cy + x * s + y * c) * big))
            d.line(points, fill=ink, width=width, joint="curve")
        noise = rng.normal(0, 12, (big, big))
        pixels = np.clip(np.asarray(img, np.float32) + noise, 0, 255).astype(np.uint8)
        return Image.fromarray(pixels).resize((size, size), Image.Resampling.LANCZOS)

    classes = {f"{name}-mirrored" if mirrored else name: (strokes, mirrored)
               for name, strokes in GLYPHS.items() for mirrored in (False, True)}
    write_set(dest, classes, draw, train_per_class, test_per_class)


DEFECTS = ("normal", "scratch", "spot", "crack")


def render_defects(dest, train_per_class, test_per_class, seed, size=128):
    """Inspection-like textured surfaces where the class is a defect a few pixels
    wide (or none: "normal"), at `size` px."""
    import numpy as np
    from PIL import Image, ImageDraw, ImageFilter

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)

    def draw(kind):
        f, theta, phase = rng.uniform(0.15, 0.35), rng.uniform(0, np.pi), rng.uniform(0, 2 * np.pi)
        base = rng.uniform(90, 170)
        weave = 18 * np.sin(f * (xx * np.cos(theta) + yy * np.sin(theta)) + phase)
        weave += 10 * np.sin(f * 1.7 * (xx * np.sin(theta) - yy * np.cos(theta)))
        surface = base + weave + rng.normal(0, 10, (size, size))
        img = Image.fromarray(np.clip(surface, 0, 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(0.6))
        img = img.convert("RGB")
        tint = np.asarray(img, np.float32) * rng.uniform(0.85, 1.15, 3)
        img = Image.fromarray(np.clip(tint, 0, 255).astype(np.uint8))
        d = ImageDraw.Draw(img)
        dark = tuple(int(v) for v in np.clip(base - rng.uniform(50, 80), 0, 255) * np.ones(3))
        x, y = rng.uniform(0.2, 0.8, 2) * size
        if kind == "scratch":  # a thin straight line, 1-2 px wide
            a, n = rng.uniform(0, np.pi), rng.uniform(0.1, 0.25) * size
            d.line([(x, y), (x + n * np.cos(a), y + n * np.sin(a))], fill=dark, width=int(rng.integers(1, 3)))
        elif kind == "spot":  # a small round blob, 3-6 px across
            r = rng.uniform(1.5, 3)
            d.ellipse([x - r, y - r, x + r, y + r], fill=dark)
        elif kind == "crack":  # a short jagged line
            points = [(x, y)]
            for _ in range(int(rng.integers(4, 7))):
                x, y = x + rng.uniform(2, 5) * rng.choice([-1, 1]), y + rng.uniform(2, 5)
                points.append((x, y))
            d.line(points, fill=dark, width=1)
        return img

    write_set(dest, {kind: (kind,) for kind in DEFECTS}, draw, train_per_class, test_per_class)


def run_one(source: Path, workdir: Path, overrides: list[str], tuned: dict | None = None) -> dict:
    """The five stages on `source` in this process; with `tuned` (a study's
    metrics/tune.json), on the best trial's params written as `tune --apply`
    writes them, whatever its check at full fidelity said."""
    from transferlab import config
    from transferlab.run import apply_overrides
    from transferlab.search.report import apply_best
    from transferlab.stages import evaluate, features, finetune, head, prepare, setup_logging

    setup_logging()
    workdir.mkdir(parents=True, exist_ok=True)
    os.chdir(workdir)
    shutil.copy(ROOT / "params.yaml", "params.yaml")
    apply_overrides(Path("params.yaml"), [f"data.source={source}", "data.checksum=null", *overrides])
    if tuned is not None:
        unchecked = {**{k: v for k, v in tuned.items() if k != "confirm"}, "default_wins": False}
        apply_best(Path("params.yaml"), config.load("params.yaml"), unchecked, tuned["parent_run_id"])
    params = config.load("params.yaml")
    start = time.perf_counter()
    for stage in (prepare, features, head, finetune, evaluate):
        stage.main(params)
    wall = time.perf_counter() - start
    m = {name: json.loads(Path(f"metrics/{name}.json").read_text()) for name in ("head", "finetune", "evaluate")}
    prepared = json.loads(Path("metrics/prepare.json").read_text())
    manifest = json.loads(Path("data/prepared/manifest.json").read_text())
    per_class = json.loads(Path("metrics/per_class.json").read_text())
    train_counts = manifest["counts"]["train"]
    rarest = [c for c, n in train_counts.items() if n == min(train_counts.values())]
    return {
        "train_counts": train_counts,
        "test_balanced_accuracy": m["evaluate"].get("test_balanced_accuracy"),
        "test_macro_f1": m["evaluate"].get("test_macro_f1"),
        "recall": {c: round(per_class[c]["recall"], 4) for c in train_counts},
        "rarest_classes": rarest,
        "rarest_min_recall": min(per_class[c]["recall"] for c in rarest),
        "select_metric": m["finetune"].get("select_metric", "accuracy"),
        "class_weighted": m["finetune"].get("class_weighted", 0),
        "train_images": prepared["train_images"], "val_images": prepared["val_images"],
        "test_images": prepared["test_images"],
        "test_accuracy": m["evaluate"]["test_accuracy"],
        "baseline_test_accuracy": m["evaluate"].get("baseline_test_accuracy"),
        "head_best_val_accuracy": m["head"].get("best_val_accuracy"),
        "finetune_best_val_accuracy": m["finetune"].get("best_val_accuracy"),
        "finetune_best_epoch": m["finetune"].get("best_epoch"),
        "finetune_steps": m["finetune"].get("steps"),
        "tta_flip": m["evaluate"].get("tta_flip"),
        "augment_flip": m["finetune"].get("augment_flip"),
        "mirror_val_accuracy": m["head"].get("mirror_val_accuracy"),
        "mirror_val_accuracy_mirrored": m["head"].get("mirror_val_accuracy_mirrored"),
        "wall_seconds": round(wall, 1),
    }


def tune_one(source: Path, workdir: Path, overrides: list[str]) -> dict:
    """In the shipped run's folder: `transferlab tune --apply` with the shipped
    tune settings; then, where a trial beat params.yaml's on the proxy, the
    pipeline on the winner's params in a folder of its own (run_one with
    `tuned`), whether or not --apply's check let it through."""
    from transferlab import cli

    os.chdir(workdir)
    before = Path("params.yaml").read_text()
    start = time.perf_counter()
    if cli.main(["tune", "--apply"]) != 0:
        raise SystemExit("transferlab tune --apply failed")
    seconds = time.perf_counter() - start
    summary = json.loads(Path("metrics/tune.json").read_text())
    out = {"tune_trials": summary["trials"], "tune_seconds": round(seconds, 1),
           "study_seconds": summary["study_seconds"], "verdict": summary["verdict"],
           "confirm": summary.get("confirm"), "applied": Path("params.yaml").read_text() != before,
           "best_params": summary["best_params"], "best_trial_test_accuracy": summary["test_accuracy"]}
    if not summary["default_wins"]:  # in a process of its own: a stage's clock counts from its process's start
        out["winner"] = one_process(source, workdir.parent / f"{workdir.name}-winner", overrides,
                                    "--tuned", str(Path("metrics/tune.json").resolve()))
    return out


def one_process(source: Path, workdir: Path, overrides: list[str], *flags: str) -> dict:
    """`--one` in a new process (each set's stages, as `dvc repro` runs them, apart
    from whatever ran before): its result, or SystemExit with its exit code."""
    proc = subprocess.run([sys.executable, __file__, *[a for o in overrides for a in ("--set", o)], *flags,
                           "--one", str(source), str(workdir)], text=True, stdout=subprocess.PIPE)
    if proc.returncode != 0:
        print(f"[small] {source.name} failed (exit {proc.returncode})", flush=True)
        raise SystemExit(proc.returncode)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _flips(r: dict) -> str:
    if r.get("augment_flip") is None:
        return "-"
    evidence = (f" ({r['mirror_val_accuracy']:.1%} / {r['mirror_val_accuracy_mirrored']:.1%})"
                if r.get("mirror_val_accuracy") is not None else "")
    return ("on" if r["augment_flip"] else "off") + evidence


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--archive", default=str(ROOT.parent / "shared/data/cifar10-jpeg.tar.gz"))
    p.add_argument("--sets", nargs="+", default=["cifar300", "shapes"],
                   choices=["cifar300", "shapes", "cifar-imbalanced", "defects", "defects-imbalanced", "glyphs"])
    p.add_argument("--imbalance", type=int, default=10, help="cifar-imbalanced: the first class's share over another's")
    p.add_argument("--per-class", type=int, default=300)
    p.add_argument("--test-per-class", type=int, default=100)
    p.add_argument("--set", action="append", default=[], help="key=value params overrides")
    p.add_argument("--workdir", default=str(ROOT / "bench/work-small"))
    add_output_arguments(p, "small-data")
    p.add_argument("--tune", action="store_true",
                   help="then `transferlab tune --apply` (shipped tune settings) and the pipeline on its winner")
    p.add_argument("--one", nargs=2, metavar=("SOURCE", "WORKDIR"), help=argparse.SUPPRESS)
    p.add_argument("--tuned", help=argparse.SUPPRESS)  # with --one: a study's metrics/tune.json (run_one)
    args = p.parse_args(argv)
    if args.one:
        source, workdir = Path(args.one[0]), Path(args.one[1]).resolve()
        result = run_one(source, workdir, args.set, tuned=json.loads(Path(args.tuned).read_text()) if args.tuned
                         else None)
        if args.tune:
            result["tune"] = tune_one(source, workdir, args.set)
        print(json.dumps(result))
        return 0
    work = Path(args.workdir).resolve()
    shutil.rmtree(work, ignore_errors=True)
    results = {}
    for name in args.sets:
        source = work / f"{name}-images"
        if name.startswith("cifar"):
            cifar_subset(Path(args.archive), source, args.per_class, args.test_per_class, seed=0)
            if name == "cifar-imbalanced":
                thin_classes(source, args.imbalance)
        elif name.startswith("defects"):
            render_defects(source, args.per_class, args.test_per_class, seed=0)
            if name == "defects-imbalanced":
                thin_classes(source, args.imbalance, keep="normal")
        elif name == "glyphs":
            render_glyphs(source, args.per_class, args.test_per_class, seed=0)
        else:
            render_shapes(source, args.per_class, args.test_per_class, seed=0)
        try:
            results[name] = one_process(source, work / f"run-{name}", args.set, *(["--tune"] if args.tune else []))
        except SystemExit as exc:
            return exc.code
        print(f"[small] {name}: {results[name]}", flush=True)
    cpu = cpu_description()
    lines = [f"Measured {time.strftime('%Y-%m-%d')} on {cpu}; default params"
             + (f" with {' '.join(args.set)}" if args.set else "") + ".", "",
             "| set | train/val/test images | test acc. | raw-pixel baseline | head best val | fine-tune best val "
             "| fine-tune steps | test-time flips | wall | balanced acc. | rarest classes' lowest recall "
             "| selected by | training flips (head's val acc. plain / mirrored) |", "|" + " --- |" * 13]
    for name, r in results.items():
        lines.append(f"| {name} | {r['train_images']}/{r['val_images']}/{r['test_images']} | "
                     f"{r['test_accuracy']:.2%} | {r['baseline_test_accuracy']:.2%} | "
                     f"{r['head_best_val_accuracy']:.2%} | {r['finetune_best_val_accuracy']:.2%} "
                     f"(best epoch {r['finetune_best_epoch']}) | {r['finetune_steps']} | "
                     f"{'kept' if r['tta_flip'] else 'dropped'} | {r['wall_seconds'] / 60:.1f} min | "
                     f"{r['test_balanced_accuracy']:.2%} | {r['rarest_min_recall']:.2%} | "
                     f"{r['select_metric']}{', class-weighted' if r['class_weighted'] else ''} | "
                     f"{_flips(r)} |")
    tuned = {n: r["tune"] for n, r in results.items() if "tune" in r}
    if tuned:
        lines += ["", "`transferlab tune --apply` (shipped tune settings), then the pipeline on the winner's params:", "",
                  "| set | trials complete/pruned/failed | tune wall (with the check) | on the proxy | at full fidelity "
                  "| --apply wrote it | shipped test acc. | winner's pipeline test acc. |", "|" + " --- |" * 8]
        for name, t in tuned.items():
            n, check = t["tune_trials"], t["confirm"]
            winner = f"{t['winner']['test_accuracy']:.2%}" if "winner" in t else "- (params.yaml won)"
            lines.append(f"| {name} | {n['complete']}/{n['pruned']}/{n['fail']} | {t['tune_seconds'] / 60:.1f} min | "
                         f"{t['verdict']} | {check['verdict'] if check else '-'} | {'yes' if t['applied'] else 'no'} | "
                         f"{results[name]['test_accuracy']:.2%} | {winner} |")
    text = "\n".join(lines) + "\n"
    keys = ("test_accuracy", "test_balanced_accuracy", "rarest_min_recall", "baseline_test_accuracy",
            "head_best_val_accuracy", "finetune_best_val_accuracy", "finetune_steps", "wall_seconds")
    figures = {n: {k: r[k] for k in keys if k in r} for n, r in results.items()}
    for name, t in tuned.items():
        figures[name].update({"tune_seconds": t["tune_seconds"], "tune_applied": int(t["applied"])})
        if "winner" in t:
            figures[name]["winner_test_accuracy"] = t["winner"]["test_accuracy"]
    write_run(output_folder(args), "small_data", {"sets": figures},
              {"sets": results}, text, argv, cpu=cpu)
    return 0


if __name__ == "__main__":
    sys.exit(main())
