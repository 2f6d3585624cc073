"""Benchmark: is hw5_dl.py's default run fast and strong, and by how much?

    python bench/bench.py --data-dir ../shared/data      # ~25 minutes on 2 CPU cores

In one process, on one machine, it measures:
1. input pipeline: the Simple CNN trained for the same epochs on our in-memory tensors with
   batched per-image augmentation, and on the naive pipeline (medmnist's Dataset with per-image
   PIL/torchvision transforms through a DataLoader); training images/s of each and the ratio;
2. the MedMNIST v2 recipe (ResNet-18 with a 3x3 stride-1 stem, Adam 1e-3, batch 128, no
   augmentation, 100 epochs): one epoch timed, times 100, against our ResNet18's training time;
3. `hw5_dl.py --quick` and the default run for seeds 0, 1, 2: wall time, test metrics per model
   (mean +- std) and the peak resident memory during each run;
and writes everything as markdown to bench/results/ with the machine, torch version and threads.
Not part of the tests or CI: it reads the test split (through hw5_dl's own single read per model).
"""
import argparse
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision import transforms

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import hw5_dl  # noqa: E402

PAPER = dict(epochs=100, auc=0.944)  # MedMNIST v2, ResNet-18 (28), PneumoniaMNIST
SEEDS = (0, 1, 2)


def peak_rss_gb():
    """This process's peak resident memory so far, in GB (macOS reports bytes, Linux KiB)."""
    unit = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * unit / 1e9


class PeakMemory:
    """The highest resident memory of this process inside a with-block, sampled every 50 ms.

    Without /proc (not Linux) it reports the process's peak so far, an upper bound.
    """

    def __enter__(self):
        self.gb, self._stop = 0.0, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        page = os.sysconf("SC_PAGE_SIZE")
        while os.path.exists("/proc/self/statm") and not self._stop.wait(0.05):
            with open("/proc/self/statm") as f:
                self.gb = max(self.gb, int(f.read().split()[1]) * page / 1e9)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        if not self.gb:
            self.gb = peak_rss_gb()


def naive_loader(data_dir, transform, batch_size):
    """The textbook pipeline: medmnist's Dataset, PIL transforms per image, a DataLoader."""
    import medmnist
    ds = medmnist.PneumoniaMNIST(split="train", root=data_dir, transform=transform)
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=True, num_workers=0)


def train_images_per_second(model, batches, prepare, loss_fn, optimizer, epochs):
    """Train for epochs over batches (re-iterated each epoch); images per second of wall time."""
    model.train()
    seen, start = 0, time.perf_counter()
    for _ in range(epochs):
        for x, y in batches:
            loss = loss_fn(model(prepare(x)), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            seen += len(y)
    return seen / (time.perf_counter() - start)


def input_images_per_second(batches, prepare):
    """One epoch of the input pipeline alone (load, augment, normalise), no model: images/s."""
    seen, start = 0, time.perf_counter()
    for x, y in batches:
        prepare(x)
        seen += len(y)
    return seen / (time.perf_counter() - start)


def bce(logits, y):
    """Binary cross-entropy on one logit, for labels of shape (N,) or medmnist's (N, 1)."""
    return F.binary_cross_entropy_with_logits(logits.squeeze(1), y.float().view(-1))


def pipeline_comparison(cfg, epochs):
    """1: Simple CNN training speed with our pipeline and with the naive one (same model/steps)."""
    data = hw5_dl.load_data(cfg, torch.device("cpu"))
    ours = lambda x: hw5_dl.standardize(hw5_dl.augment(x, cfg), data)   # noqa: E731
    naive_tf = transforms.Compose([
        transforms.RandomHorizontalFlip(cfg.flip_prob),
        transforms.RandomRotation(cfg.max_rotation_deg),
        transforms.ColorJitter(brightness=cfg.brightness, contrast=cfg.contrast),
        transforms.ToTensor(), transforms.Normalize([data.mean], [data.std])])
    speeds = {}
    for name, batches, prepare in [
            ("ours: tensors in memory, batched per-image augmentation",
             data.loaders["train"], ours),
            ("naive: medmnist Dataset + per-image PIL transforms + DataLoader",
             naive_loader(cfg.data_dir, naive_tf, cfg.batch_size), lambda x: x)]:
        hw5_dl.seed_everything(0)
        model = hw5_dl.simple_cnn(1, 28, torch.device("cpu"))
        optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.cnn_lr)
        speeds[name] = (train_images_per_second(model, batches, prepare, bce, optimizer, epochs),
                        input_images_per_second(batches, prepare))
    return speeds


def medmnist_v2_resnet18():
    """The paper's ResNet-18 at 28 px: 3x3 stride-1 conv1, no max-pool, 2-way softmax head."""
    model = torchvision.models.resnet18(num_classes=2)
    model.conv1 = nn.Conv2d(1, 64, 3, 1, 1, bias=False)
    model.maxpool = nn.Identity()
    return model


def recipe_epoch_seconds(cfg):
    """2: seconds for one training epoch of the MedMNIST v2 recipe, on its own loader."""
    tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize([0.5], [0.5])])
    batches = naive_loader(cfg.data_dir, tf, 128)
    hw5_dl.seed_everything(0)
    model = medmnist_v2_resnet18()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss = lambda logits, y: F.cross_entropy(logits, y.view(-1).long())   # noqa: E731
    per_second = train_images_per_second(model, batches, lambda x: x, loss, optimizer, 1)
    return len(batches.dataset) / per_second


def timed_main(argv):
    """Run hw5_dl.main(argv); (wall seconds, peak memory in GB, metrics.json as a dict)."""
    out = tempfile.mkdtemp(prefix="hw5_bench_")
    start = time.perf_counter()
    with PeakMemory() as memory:
        code = hw5_dl.main([*argv, "--outputs", out])
    seconds = time.perf_counter() - start
    if code != 0:
        raise SystemExit(f"hw5_dl.py {' '.join(argv)} exited with {code}")
    return seconds, memory.gb, json.loads((Path(out) / "metrics.json").read_text())


def mean_std(values):
    """'mean ± std' of a list (sample std over seeds; 0 for a single seed)."""
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {std:.3f}"


def per_seed(models):
    """'ACC / AUC' of each seed's run of one model, comma-separated."""
    return ", ".join(f"{m['test']['accuracy']:.3f} / {m['test']['auc']:.3f}" for m in models)


def seed_table(runs):
    """3: markdown rows of test metrics per model, mean ± std over the seeds' runs."""
    rows = ["| model | test ACC | test AUC | recall | specificity | train s | ACC / AUC per seed |",
            "|---|---|---|---|---|---|---|"]
    for name, label in hw5_dl.MODEL_NAMES.items():
        trained = [r["models"][name] for r in runs if r["models"].get(name, {}).get("status")
                   == "trained"]
        if len(trained) < len(runs):
            rows.append(f"| {label} | not run in every seed | | | | | |")
            continue
        cell = lambda k: mean_std([m["test"][k] for m in trained])   # noqa: E731
        rows.append(f"| {label} | {cell('accuracy')} | {cell('auc')} | {cell('recall')} | "
                    f"{cell('specificity')} | "
                    f"{statistics.mean(m['train_seconds'] for m in trained):.0f} | "
                    f"{per_seed(trained)} |")
    best = [r["models"][r["best_model"]]["test"] for r in runs]
    rows.append(f"| chosen on validation ({', '.join(r['best_model'] for r in runs)}) | "
                f"{mean_std([b['accuracy'] for b in best])} | {mean_std([b['auc'] for b in best])}"
                f" | {mean_std([b['recall'] for b in best])} | "
                f"{mean_std([b['specificity'] for b in best])} | | "
                f"{per_seed([r['models'][r['best_model']] for r in runs])} |")
    return rows


def machine():
    """One line: CPU model, cores, torch version and threads."""
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (f"{cpu}, {torch.get_num_threads()} torch threads, torch {torch.__version__}, "
            f"Python {platform.python_version()}, {platform.system()}")


def main():
    """Run the four measurements and write bench/results/<name>.md."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default="", help="folder holding pneumoniamnist.npz")
    p.add_argument("--pipeline-epochs", type=int, default=3)
    p.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    p.add_argument("--name", default="cpu", help="results file: bench/results/NAME.md")
    p.add_argument("--epochs", type=int, default=0, help="cap hw5_dl.py's epochs (a check of "
                   "this script only: the numbers are then not the default run's)")
    args = p.parse_args()
    cfg = hw5_dl.Config(data_dir=args.data_dir, device="cpu")
    data_args = (["--data-dir", args.data_dir] if args.data_dir else []) + (
        ["--epochs", str(args.epochs)] if args.epochs else [])
    lines = [f"# Benchmark: {time.strftime('%Y-%m-%d')}", "", f"Machine: {machine()}.", "",
             f"Command: `python bench/bench.py {' '.join(sys.argv[1:])}`", ""]

    speeds = pipeline_comparison(cfg, args.pipeline_epochs)
    (ours, _), (naive, naive_input) = speeds.values()
    lines += [f"## 1. Input pipeline (Simple CNN, {args.pipeline_epochs} training epochs each)", "",
              "| pipeline | training images/s | input pipeline alone, images/s |", "|---|---|---|",
              *(f"| {k} | {v[0]:,.0f} | {v[1]:,.0f} |" for k, v in speeds.items()), "",
              f"Ratio: **{ours / naive:.1f}×**. With the naive input alone at "
              f"{naive_input:,.0f} images/s, no pipeline can beat it by more than "
              f"1 + (model's own speed) / {naive_input:,.0f}: the model's forward and backward "
              "pass bounds the gain.", ""]
    print("\n".join(lines[-9:]), flush=True)

    quick_seconds, quick_gb, _ = timed_main([*data_args, "--quick"])
    runs, walls, peaks = [], [], []
    for seed in args.seeds:
        seconds, gb, metrics = timed_main([*data_args, "--seed", str(seed)])
        runs.append(metrics)
        walls.append(seconds)
        peaks.append(gb)
    recipe_epoch = recipe_epoch_seconds(cfg)

    scratch = [r["models"]["resnet18_scratch"] for r in runs]
    ours_seconds = statistics.mean(m["train_seconds"] for m in scratch)
    ours_auc = statistics.mean(m["test"]["auc"] for m in scratch)
    recipe_total = recipe_epoch * PAPER["epochs"]
    lines += ["## 2. Against the MedMNIST v2 recipe (ResNet-18, 3x3/1 stem, Adam 1e-3, "
              "batch 128, 100 epochs)", "",
              f"- One epoch of the recipe here: {recipe_epoch:.0f} s, so 100 epochs ≈ "
              f"{recipe_total / 3600:.1f} h to reach the paper's test AUC {PAPER['auc']}.",
              f"- Our ResNet18 from scratch: {ours_seconds:.0f} s of training (mean over seeds, "
              f"whole run incl. early stopping) for a mean test AUC of {ours_auc:.3f}"
              f" ({'≥' if ours_auc >= PAPER['auc'] else '<'} {PAPER['auc']}).",
              f"- Time-to-AUC ratio: **{recipe_total / ours_seconds:.0f}×** "
              "Conservative: our time is the whole training, not the first epoch that got there.",
              ""]
    lines += [f"## 3. Default run, seeds {', '.join(map(str, args.seeds))} "
              "(test split, threshold 0.5, mean ± std)", "", *seed_table(runs), "",
              f"- Wall time of the default run: {', '.join(f'{w:.0f}' for w in walls)} s "
              f"(mean {statistics.mean(walls):.0f} s). "
              f"`--quick`: {quick_seconds:.0f} s.",
              f"- Peak resident memory during each run (sampled every 50 ms): "
              f"{', '.join(f'{g:.2f}' for g in peaks)} GB, `--quick` {quick_gb:.2f} GB "
              f"; of the whole benchmark process: {peak_rss_gb():.2f} GB.",
              "- Models not run: " + (", ".join(
                  sorted({f"{k} ({m['reason']})" for r in runs for k, m in r["models"].items()
                          if m["status"] != "trained"})) or "none"), ""]
    out = Path(__file__).parent / "results" / f"{args.name}.md"
    out.parent.mkdir(exist_ok=True)
    out.write_text("\n".join(lines), encoding="utf-8")
    print("\n".join(lines))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
