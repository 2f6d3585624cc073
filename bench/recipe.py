"""Does the training recipe hold on a small training split? Old against new, full and cut data.

    python bench/recipe.py --data-dir ../shared/data --baseline REV   # ~20 min a recipe, 2 cores

Runs `hw5_dl.py` as the user would (one subprocess per run, default settings, --device cpu) for
two recipes: the script at git revision REV (the baseline) and the working tree's script, each on
the whole training split and on a seeded stratified subset (--train-images, 546 by default: the
size of BreastMNIST's training split), for seeds 0, 1, 2. Validation and test stay whole.
Every run's metrics.json is kept in --runs (default bench/results/runs/) and reused when present,
so an interrupted benchmark resumes; the table goes to bench/results/recipe.md.
Not part of the tests or CI: it reads the test split (through hw5_dl's own single read per model).
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
PAPER = {"pneumoniamnist": "ACC 0.854 / AUC 0.944", "breastmnist": "ACC 0.863 / AUC 0.901"}


def script_at(revision, folder):
    """hw5_dl.py as committed at revision, written into folder; its path."""
    source = subprocess.run(["git", "show", f"{revision}:hw5_dl.py"], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout
    path = Path(folder) / "hw5_dl.py"
    path.write_text(source, encoding="utf-8")
    return path


def run_once(script, args, cache):
    """Run script with args unless cache already holds its metrics.json; the metrics."""
    if cache.exists():
        return json.loads(cache.read_text())
    with tempfile.TemporaryDirectory(prefix="hw5_recipe_") as out:
        start = time.perf_counter()
        subprocess.run([sys.executable, str(script), *args, "--device", "cpu", "--outputs", out],
                       check=True, stdout=subprocess.DEVNULL)
        metrics = json.loads((Path(out) / "metrics.json").read_text())
        metrics["wall_seconds"] = round(time.perf_counter() - start, 1)
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(metrics, indent=1), encoding="utf-8")
    return metrics


def mean_std(values):
    """'mean ± std' over seeds (sample std; 0 for one seed)."""
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {std:.3f}"


def model_rows(recipe, setting, runs):
    """Markdown rows: per trained model, and for the model chosen on validation, over seeds."""
    rows = []
    names = [k for k, m in runs[0]["models"].items() if m["status"] == "trained"
             and k != "ensemble"]
    for name in [*names, "chosen"]:
        picked = [r["models"][r["best_model"] if name == "chosen" else name] for r in runs]
        label = ("chosen on val (" + ", ".join(r["best_model"] for r in runs) + ")"
                 if name == "chosen" else name)
        epochs = ", ".join(f"{m['best_epoch'] or '-'}/{m['epochs_trained']}" for m in picked)
        rows.append(f"| {recipe} | {setting} | {label} | "
                    f"{mean_std([m['val']['auc'] for m in picked])} | "
                    f"{mean_std([m['test']['accuracy'] for m in picked])} | "
                    f"{mean_std([m['test']['auc'] for m in picked])} | {epochs} | "
                    f"{statistics.mean(m['train_seconds'] for m in picked):.0f} | "
                    f"{statistics.mean(m['train_images_per_second'] for m in picked):,.0f} |")
    return rows


def main():
    """Run the grid of recipes x training sizes x seeds and write the comparison table."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", required=True, help="folder holding pneumoniamnist.npz")
    p.add_argument("--baseline", required=True, help="git revision of the baseline recipe")
    p.add_argument("--train-images", type=int, default=546)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--runs", default=str(ROOT / "bench" / "results" / "runs"))
    p.add_argument("--only", choices=["baseline", "current"], help="run one recipe only")
    args = p.parse_args()
    revision = subprocess.run(["git", "rev-parse", "--short", args.baseline], cwd=ROOT,
                              check=True, capture_output=True, text=True).stdout.strip()
    settings = {"all": [], str(args.train_images): ["--train-images", str(args.train_images)]}
    lines = ["| recipe | training images | model | val AUC | test ACC | test AUC | "
             "best/trained epochs per seed | train s | train images/s |",
             "|---|---|---|---|---|---|---|---|---|"]
    walls = {}
    with tempfile.TemporaryDirectory() as folder:
        recipes = {f"baseline ({revision})": (script_at(revision, folder), f"base-{revision}"),
                   "current": (ROOT / "hw5_dl.py", "current")}
        if args.only:
            recipes = dict([list(recipes.items())[args.only == "current"]])
        for recipe, (script, tag) in recipes.items():
            for setting, extra in settings.items():
                runs = []
                for seed in args.seeds:
                    cache = Path(args.runs) / f"{tag}_train-{setting}_seed{seed}.json"
                    runs.append(run_once(script, ["--data-dir", args.data_dir, "--seed",
                                                  str(seed), *extra], cache))
                    print(f"{recipe}, {setting} training images, seed {seed}: done", flush=True)
                lines += model_rows(recipe, setting, runs)
                walls[recipe, setting] = [r["wall_seconds"] for r in runs]
    lines += ["", "Wall time per run (s): " + "; ".join(
        f"{r}, {s} images: {', '.join(f'{w:.0f}' for w in v)}" for (r, s), v in walls.items())]
    text = "\n".join(lines)
    print(text)
    out = ROOT / "bench" / "results" / "recipe.md"
    out.write_text(f"# Recipe on full and cut training data ({time.strftime('%Y-%m-%d')})\n\n"
                   f"Command: `python bench/recipe.py {' '.join(sys.argv[1:])}`\n\n{text}\n",
                   encoding="utf-8")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
