"""Does the training rule hold across seeds and on a small training split? Three seeds, two sizes.

    python bench/recipe.py --data-dir data        # ~35 min on 2 CPU cores

Runs `hw5_dl.py`'s default run (one subprocess per run, --device cpu) for seeds 0, 1, 2, on the
whole training split and on a seeded stratified subset (Config.train_images, 546 by default: the
size of BreastMNIST's training split). Validation and test stay whole. Every run's metrics.json
is kept in bench/results/runs/ as TAG_train-SETTING_seedN.json and reused when present, so an
interrupted benchmark resumes; the table, with the cached runs of earlier rules (--compare), goes
to bench/results/recipe.md. Not part of the tests or CI: it reads the test split (through
hw5_dl's own single read per model).
"""
import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUNS = ROOT / "bench" / "results" / "runs"
# The default run with Config.train_images set, as bench/ may set Config fields directly.
CODE = ("import dataclasses, sys, hw5_dl as H; "
        "H.run(dataclasses.replace(H.parse_args(sys.argv[2:]), train_images=int(sys.argv[1])))")


def run_once(args, train_images, cache):
    """One default run unless cache already holds its metrics.json; the metrics."""
    if cache.exists():
        return json.loads(cache.read_text())
    with tempfile.TemporaryDirectory(prefix="hw5_recipe_") as out:
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", CODE, str(train_images), *args, "--device", "cpu",
                        "--outputs", out], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
        metrics = json.loads((Path(out) / "metrics.json").read_text())
        metrics["wall_seconds"] = round(time.perf_counter() - start, 1)
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(metrics, indent=1), encoding="utf-8")
    return metrics


def mean_std(values):
    """'mean ± std' over seeds (sample std; 0 for one seed)."""
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {std:.3f}"


def model_rows(tag, setting, runs):
    """Markdown rows: each trained model, then the model chosen on validation, over seeds."""
    rows = []
    names = [k for k, m in runs[0]["models"].items() if m["status"] == "trained"
             and k != "ensemble"]
    for name in [*names, "chosen"]:
        picked = [r["models"][r["best_model"] if name == "chosen" else name] for r in runs]
        label = ("chosen on val (" + ", ".join(r["best_model"] for r in runs) + ")"
                 if name == "chosen" else name)
        epochs = ", ".join(f"{m['best_epoch']}/{m['epochs_trained']}" for m in picked)
        rows.append(f"| {tag} | {setting} | {label} | "
                    f"{mean_std([m['val']['auc'] for m in picked])} | "
                    f"{mean_std([m['test']['accuracy'] for m in picked])} | "
                    f"{mean_std([m['test']['auc'] for m in picked])} | {epochs} | "
                    f"{statistics.mean(m['train_seconds'] for m in picked):.0f} | "
                    f"{statistics.mean(m['train_images_per_second'] for m in picked):,.0f} |")
    return rows


def main():
    """Run (or reuse) the grid of training sizes x seeds and write the comparison table."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", required=True, help="folder holding pneumoniamnist.npz")
    p.add_argument("--tag", default="current", help="name of this rule's runs in the cache")
    p.add_argument("--compare", nargs="*", default=["base-18f5972"],
                   help="tags of cached runs of earlier rules to list beside it")
    p.add_argument("--train-images", type=int, default=546)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = p.parse_args()
    settings = {"all": 0, str(args.train_images): args.train_images}
    lines = ["| rule | training images | model | val AUC | test ACC | test AUC | "
             "best/trained epochs per seed | train s | train images/s |",
             "|---|---|---|---|---|---|---|---|---|"]
    walls = []
    for tag in [*args.compare, args.tag]:
        for setting, n in settings.items():
            runs = []
            for seed in args.seeds:
                cache = RUNS / f"{tag}_train-{setting}_seed{seed}.json"
                if tag != args.tag and not cache.exists():
                    break
                runs.append(run_once(["--data-dir", args.data_dir, "--seed", str(seed)], n,
                                     cache))
                print(f"{tag}, {setting} training images, seed {seed}: done", flush=True)
            if len(runs) == len(args.seeds):
                lines += model_rows(tag, setting, runs)
                walls.append(f"{tag}, {setting} images: "
                             + ", ".join(f"{r['wall_seconds']:.0f}" for r in runs))
    text = "\n".join(lines + ["", "Wall time per run (s): " + "; ".join(walls)])
    print(text)
    out = ROOT / "bench" / "results" / "recipe.md"
    out.write_text(f"# Training rule on full and cut training data ({time.strftime('%Y-%m-%d')})"
                   "\n\nCommand: `python bench/recipe.py --data-dir DATA_DIR`\n\n"
                   f"{text}\n", encoding="utf-8")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
