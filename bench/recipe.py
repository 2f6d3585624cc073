"""Does the training rule hold across seeds, on a small training split and on a small, hard task?

    python bench/recipe.py --data-dir DATA_DIR            # ~80 min on 2 CPU cores

Runs `hw5_dl.py`'s default command (one subprocess per run, --device cpu) on three versions of
PneumoniaMNIST, each written as a medmnist npz and read by the script as usual:
  all    the official file, seeds 0-7;
  546    a stratified 546 of the training images (BreastMNIST's training size), val and test
         whole, seeds 0-2;
  proxy  546 training and 78 validation images (BreastMNIST's sizes) with 15% of their labels
         flipped, test whole and clean: a task about as hard as BreastMNIST (val AUC ~0.8),
         seeds 0-2.
The subsets and flips are drawn with the run's seed. Every run's metrics.json is cached in the
git-ignored bench/cache/ and reused when present, so an interrupted benchmark resumes and a
missing cache is rebuilt; the tables go to bench/results/recipe.md. Not part of the tests or CI:
it reads the test split (through hw5_dl's own single read per model), and its test columns
report a choice, never make one.
"""
import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from sklearn.model_selection import train_test_split

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "bench" / "cache"
SEEDS = {"all": 8, "546": 3, "proxy": 3}                  # seeds 0 .. n-1 per setting
SIZES = {"all": {}, "546": {"train": 546}, "proxy": {"train": 546, "val": 78}}
FLIPPED = {"proxy": 0.15}                                 # share of the cut splits' labels flipped


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


def run_once(args, setting, seed):
    """The metrics.json of one default run, from the cache or from a new run."""
    cache = CACHE / f"{args.tag}_train-{setting}_seed{seed}.json"
    if cache.exists():
        return json.loads(cache.read_text())
    with tempfile.TemporaryDirectory(prefix="hw5_recipe_") as tmp:
        write_npz(Path(args.data_dir) / "pneumoniamnist.npz", setting, seed, tmp)
        out = Path(tmp) / "outputs"
        subprocess.run([sys.executable, args.script, "--data-dir", tmp, "--seed", str(seed),
                        "--device", "cpu", "--outputs", str(out)], cwd=ROOT, check=True,
                       stdout=subprocess.DEVNULL)
        metrics = json.loads((out / "metrics.json").read_text())
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(metrics, indent=1), encoding="utf-8")
    return metrics


def spread(values, digits=3):
    """'mean ± std (min–max)' over seeds (sample std)."""
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return (f"{statistics.mean(values):.{digits}f} ± {std:.{digits}f} "
            f"({min(values):.{digits}f}–{max(values):.{digits}f})")


def summary_rows(setting, runs):
    """Each trained model, then the model chosen on validation, over the seeds."""
    rows = []
    for name in [k for k, m in runs[0]["models"].items() if m["status"] == "trained"] + [None]:
        picked = [r["models"][name or r["best_model"]] for r in runs]
        rows.append(f"| {setting} ({len(runs)} seeds) | {name or 'chosen on validation'} | "
                    f"{spread([m['val']['auc'] for m in picked], 4)} | "
                    f"{spread([m['val_loss'] for m in picked])} | "
                    f"{spread([m['test']['accuracy'] for m in picked])} | "
                    f"{spread([m['test']['auc'] for m in picked])} |")
    return rows


def seed_rows(runs):
    """Per seed: each model's epochs and scores, and the chosen model's operating points."""
    models, points = [], []
    for seed, r in enumerate(runs):
        for name, m in r["models"].items():
            if m["status"] == "trained":
                models.append(f"| {seed} | {name} | {m['best_epoch']}/{m['epochs_trained']} | "
                              f"{', '.join(map(str, m['rate_drops']))} | {m['val']['auc']:.4f} | "
                              f"{m['val']['accuracy']:.3f} | {m['test']['accuracy']:.3f} | "
                              f"{m['test']['auc']:.3f} |")
        chosen, p = r["models"][r["best_model"]], r["operating_points"]
        diff = next(iter(r["auc_difference_vs_best"].values()))
        points.append(
            f"| {seed} | {r['best_model']} | {diff['difference']:+.3f} [{diff['ci95'][0]:+.3f}, "
            f"{diff['ci95'][1]:+.3f}] | {chosen['val']['recall']:.3f} / "
            f"{chosen['val']['specificity']:.3f} | {chosen['test']['recall']:.3f} / "
            f"{chosen['test']['specificity']:.3f} | {p['0.5']['fn']} / {p['0.5']['fp']} | "
            f"{p['screening']['threshold']:.3f} | "
            f"{p['screening']['val_specificity']:.3f} | {p['screening']['recall']:.3f} / "
            f"{p['screening']['specificity']:.3f} | {p['screening']['fn']} / "
            f"{p['screening']['fp']} |")
    return models, points


def main():
    """Run (or reuse) every setting's seeds and write the tables."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", required=True, help="folder holding pneumoniamnist.npz")
    p.add_argument("--script", default=str(ROOT / "hw5_dl.py"),
                   help="the hw5_dl.py to run (a variant's copy, for its rule)")
    p.add_argument("--tag", default="current", help="name of this script's runs in the cache")
    p.add_argument("--settings", nargs="+", default=list(SIZES), choices=SIZES)
    args = p.parse_args()
    runs = {}
    for setting in args.settings:
        runs[setting] = []
        for seed in range(SEEDS[setting]):
            runs[setting].append(run_once(args, setting, seed))
            print(f"{args.tag}, {setting}, seed {seed}: done", flush=True)
    summary = ["| training data | model | val AUC | val loss | test ACC | test AUC |",
               "|---" * 6 + "|"] + [row for s, r in runs.items() for row in summary_rows(s, r)]
    lines = [f"# Training rule over seeds ({time.strftime('%Y-%m-%d')})", "",
             "Command: `python bench/recipe.py --data-dir DATA_DIR` (rule and settings: "
             "bench/README.md). Mean ± std (min–max) over the seeds; test at threshold 0.5.", "",
             *summary]
    if "all" in runs:
        models, points = seed_rows(runs["all"])
        lines += ["", "## All images, per seed", "",
                  "| seed | model | restored/trained epochs | rate x0.1 from epoch | val AUC | "
                  "val ACC | test ACC | test AUC |", "|---" * 8 + "|", *models, "",
                  "Chosen model: paired test AUC difference with the other model [95% interval], "
                  "recall / specificity at 0.5 (val, then test), missed / false alarms on test "
                  "at 0.5, the screening threshold (fixed on validation), the screening "
                  "point's val specificity, its test recall / specificity and its missed / "
                  "false alarms.", "",
                  "| seed | chosen | AUC(chosen) − AUC(other) | val recall / spec. | test recall "
                  "/ spec. | FN / FP at 0.5 | screening t | screening val spec. | "
                  "screening test recall / spec. | screening FN / FP |", "|---" * 10 + "|",
                  *points]
    text = "\n".join(lines) + "\n"
    print(text)
    (ROOT / "bench" / "results" / "recipe.md").write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
