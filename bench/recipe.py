"""Does the training rule hold across seeds, on a small training split and on a small, hard task?

    python bench/recipe.py --data-dir DATA_DIR            # ~35 min on 2 CPU cores

Runs `hw5_dl.py`'s default command (one subprocess per run, --device cpu) for seeds 0, 1, 2 on
three versions of PneumoniaMNIST, each written as a medmnist npz and read by the script as usual:
  all    the official file;
  546    a stratified 546 of the training images (BreastMNIST's training size), val and test whole;
  proxy  546 training and 78 validation images (BreastMNIST's sizes) with 15% of their labels
         flipped, test whole and clean: a task about as hard as BreastMNIST (val AUC ~0.85).
The subsets and flips are drawn with the run's seed. Every run's metrics.json is kept in
bench/results/runs/ as TAG_train-SETTING_seedN.json and reused when present, so an interrupted
benchmark resumes; the table, with cached runs of earlier rules (--compare), goes to
bench/results/recipe.md. Not part of the tests or CI: it reads the test split (through hw5_dl's
own single read per model), and its test columns report a choice, never make one.
"""
import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from sklearn.model_selection import train_test_split

ROOT = Path(__file__).resolve().parents[1]
RUNS = ROOT / "bench" / "results" / "runs"
SIZES = {"all": {}, "546": {"train": 546}, "proxy": {"train": 546, "val": 78}}
FLIPPED = {"proxy": 0.15}        # share of the cut splits' labels flipped


def write_npz(source, setting, seed, folder):
    """pneumoniamnist.npz for one setting: subsets of train/val and flipped labels, seeded."""
    arrays = dict(np.load(source))
    rng = np.random.default_rng(seed)
    for split, n in SIZES[setting].items():
        labels = arrays[f"{split}_labels"]
        keep, _ = train_test_split(np.arange(len(labels)), train_size=n, stratify=labels[:, 0],
                                   random_state=seed)
        keep = np.sort(keep)
        arrays[f"{split}_images"], labels = arrays[f"{split}_images"][keep], labels[keep].copy()
        flip = rng.choice(n, round(FLIPPED.get(setting, 0) * n), replace=False)
        labels[flip] = 1 - labels[flip]
        arrays[f"{split}_labels"] = labels
    np.savez(Path(folder) / "pneumoniamnist.npz", **arrays)


def run_once(args, setting, seed, cache):
    """One default run unless cache already holds its metrics.json; the metrics."""
    if cache.exists():
        return json.loads(cache.read_text())
    with tempfile.TemporaryDirectory(prefix="hw5_recipe_") as tmp:
        write_npz(Path(args.data_dir) / "pneumoniamnist.npz", setting, seed, tmp)
        out = Path(tmp) / "outputs"
        start = time.perf_counter()
        subprocess.run([sys.executable, args.script, "--data-dir", tmp, "--seed", str(seed),
                        "--device", "cpu", "--outputs", str(out)], cwd=ROOT, check=True,
                       stdout=subprocess.DEVNULL)
        metrics = json.loads((out / "metrics.json").read_text())
        metrics["wall_seconds"] = round(time.perf_counter() - start, 1)
        if args.keep:
            shutil.copytree(out, Path(args.keep) / cache.stem, dirs_exist_ok=True)
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(metrics, indent=1), encoding="utf-8")
    return metrics


def mean_std(values, digits=3):
    """'mean ± std' over seeds (sample std; 0 for one seed)."""
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.{digits}f} ± {std:.{digits}f}"


def model_rows(tag, setting, runs):
    """Markdown rows: each trained model, then the model chosen on validation, over seeds."""
    rows = []
    names = [k for k, m in runs[0]["models"].items() if m["status"] == "trained"]
    for name in [*names, "chosen"]:
        picked = [r["models"][r["best_model"] if name == "chosen" else name] for r in runs]
        label = ("chosen on val (" + ", ".join(r["best_model"] for r in runs) + ")"
                 if name == "chosen" else name)
        epochs = ", ".join(f"{m['best_epoch']}/{m['epochs_trained']}" for m in picked)
        rows.append(f"| {tag} | {setting} | {label} | "
                    f"{mean_std([m['val']['auc'] for m in picked])} | "
                    f"{mean_std([m['val_loss'] for m in picked])} | "
                    f"{mean_std([m['test']['accuracy'] for m in picked])} | "
                    f"{mean_std([m['test']['auc'] for m in picked])} | {epochs} | "
                    f"{statistics.mean(m['train_seconds'] for m in picked):.0f} |")
    return rows


def main():
    """Run (or reuse) the grid of settings x seeds and write the comparison table."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", required=True, help="folder holding pneumoniamnist.npz")
    p.add_argument("--script", default=str(ROOT / "hw5_dl.py"),
                   help="the hw5_dl.py to run (another revision's, for its rule)")
    p.add_argument("--tag", default="current", help="name of this rule's runs in the cache")
    p.add_argument("--compare", nargs="*",
                   default=["base-18f5972", "base-b4ce186", "v1", "v2", "v3", "v4"],
                   help="tags of cached runs of earlier rules and variants to list before it")
    p.add_argument("--settings", nargs="+", default=list(SIZES), choices=SIZES)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--keep", help="folder to keep every run's whole outputs/ in")
    args = p.parse_args()
    lines = ["| rule | training data | model | val AUC | val loss | test ACC | test AUC | "
             "best/trained epochs per seed | train s |", "|---" * 9 + "|"]
    walls = []
    for tag in [*args.compare, args.tag]:
        for setting in args.settings:
            runs = []
            for seed in args.seeds:
                cache = RUNS / f"{tag}_train-{setting}_seed{seed}.json"
                if tag != args.tag and not cache.exists():
                    break
                runs.append(run_once(args, setting, seed, cache))
                print(f"{tag}, {setting}, seed {seed}: done", flush=True)
            if len(runs) == len(args.seeds):
                lines += model_rows(tag, setting, runs)
                walls.append(f"{tag}, {setting}: "
                             + ", ".join(f"{r['wall_seconds']:.0f}" for r in runs))
    text = "\n".join(lines + ["", "Wall time per run (s): " + "; ".join(walls)])
    print(text)
    out = ROOT / "bench" / "results" / "recipe.md"
    out.write_text(f"# Training rule on three versions of the data ({time.strftime('%Y-%m-%d')})"
                   "\n\nCommand: `python bench/recipe.py --data-dir DATA_DIR`; rules and "
                   "variants: bench/README.md\n\n"
                   f"{text}\n", encoding="utf-8")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
