"""Does the test suite catch the classic mistakes of this pipeline? A mutation check.

    python bench/mutants.py              # ~30 min on 2 CPU cores; writes results/mutants.md
    python bench/mutants.py --only 3 7   # just those mutants, printed

Our own list of single-line changes (not mutmut, which would mutate every line at random): each
entry of MUTANTS replaces one line of hw5_dl.py in a copy of the repository and runs the suite
there (`pytest -x`). A mutant is caught when a test fails; the first failing test is recorded.
A survivor either changes nothing a run can show (its note says why) or needs a new test.
"""
import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# (function, code as written, code as mutated, the mistake; for an expected survivor: why not)
MUTANTS = [
    ("augment", "flip = torch.rand(n, device=device) < cfg.flip_prob",
     "flip = (torch.rand(1, device=device) < cfg.flip_prob).expand(n)",
     "flip drawn once per batch"),
    ("augment", "x = torch.where(flip.view(n, 1, 1, 1), x.flip(3), x)",
     "x = torch.where(flip.view(n, 1, 1, 1), x, x)", "flip never applied"),
    ("augment", "x.flip(3), x)", "x.flip(2), x)", "vertical instead of horizontal flip"),
    ("augment", "(2 * torch.rand(n, device=device) - 1))",
     "(2 * torch.rand(1, device=device) - 1)).expand(n)", "rotation angle once per batch"),
    ("augment", "(2 * torch.rand(n, device=device) - 1))", "torch.rand(n, device=device))",
     "rotation in one direction only"),
    ("augment", "angle = torch.deg2rad(cfg.max_rotation_deg *",
     "angle = torch.deg2rad(2 * cfg.max_rotation_deg *", "rotation range doubled"),
    ("augment", "grid = F.affine_grid(theta, list(x.shape), align_corners=False)",
     "grid = F.affine_grid(theta[:1].expand(n, 2, 3), list(x.shape), align_corners=False)",
     "first image's rotation applied to the whole batch"),
    ("augment", "contrast = 1 + cfg.contrast * (2 * torch.rand(n, 1, 1, 1,",
     "contrast = 1 + cfg.contrast * (2 * torch.rand(1, 1, 1, 1,",
     "contrast factor once per batch"),
    ("augment", "brightness = 1 + cfg.brightness * (2 * torch.rand(n, 1, 1, 1,",
     "brightness = 1 + cfg.brightness * (2 * torch.rand(1, 1, 1, 1,",
     "brightness factor once per batch"),
    ("augment", "return (((x - mean) * contrast + mean) * brightness).clamp(0, 1)",
     "return ((x * contrast) * brightness).clamp(0, 1)", "contrast about 0, not the image mean"),
    ("augment", "return (((x - mean) * contrast + mean) * brightness).clamp(0, 1)",
     "return (((x - mean) * contrast + mean)).clamp(0, 1)", "brightness never applied"),
    ("train_epoch", "logits = model(standardize(augment(x, cfg), data)).squeeze(1)",
     "logits = model(standardize(x, data)).squeeze(1)", "no augmentation in training"),
    ("predict", "logits.append(model(standardize(x.to(device), data)).squeeze(1).cpu())",
     "logits.append(model(standardize(augment(x.to(device), Config()), data)).squeeze(1).cpu())",
     "augmentation at prediction"),
    ("predict", "    model.eval()", "    model.train()", "dropout and batch statistics on at "
     "prediction"),
    ("load_data", "y[split] = torch.from_numpy(labels == finding).float()",
     "y[split] = torch.from_numpy(labels == 1).float()", "label 1 taken as the finding"),
    ("load_data", "pos_weight=(n - n_pos) / n_pos)", "pos_weight=n_pos / (n - n_pos))",
     "pos_weight inverted"),
    ("fit", "nn.BCEWithLogitsLoss(pos_weight=torch.tensor(data.pos_weight).to(device))",
     "nn.BCEWithLogitsLoss()", "unweighted loss"),
    ("validate", "predict(model, data.loaders[\"val\"], data, device)\n    return dict(",
     "predict(model, data.loaders[\"test\"], data, device)\n    return dict(",
     "early stopping reads the test split"),
    ("fit", "set_trainable(model, stage.head_only)", "set_trainable(model, not stage.head_only)",
     "stages' freezing swapped"),
    ("set_trainable", "p.requires_grad = not head_only or name.startswith(\"fc.\")",
     "p.requires_grad = name.startswith(\"fc.\")", "backbone never unfrozen"),
    ("fit", "torch.optim.Adam([p for p in model.parameters() if p.requires_grad], stage.lr)",
     "torch.optim.Adam(model.parameters(), stage.lr)",
     "frozen parameters given to Adam (survives: they get no gradient, and Adam skips a "
     "parameter whose grad is None, so nothing changes)"),
    ("fit", "    stopper.new_stage()", "    pass", "patience not reset at stage 2"),
    ("EarlyStopping.new_stage", "        self.bad_epochs = 0\n\n\nStage",
     "        self.bad_epochs, self.best_loss = 0, float(\"inf\")\n\n\nStage",
     "stage 2 forgets stage 1's best"),
    ("EarlyStopping.step", "if val_loss < self.best_loss:", "if val_loss <= self.best_loss:",
     "an equal val loss counts as better"),
    ("EarlyStopping.step", "return self.bad_epochs >= self.patience",
     "return self.bad_epochs > self.patience", "one epoch too much patience"),
    ("fit", "stopper.bad_epochs % epochs(cfg.drop_after, data) == 0",
     "stopper.bad_epochs % (epochs(cfg.drop_after, data) + 1) == 0", "rate drop one epoch late"),
    ("fit", "group[\"lr\"] *= 0.1", "group[\"lr\"] *= 0.5", "rate halved, not divided by 10"),
    ("fit", "group[\"lr\"] *= 0.1", "pass", "rate never dropped"),
    ("train_model", "model.load_state_dict(stopper.best_state)", "pass",
     "the last epoch kept, not the best"),
    ("epochs", "return math.ceil(updates / len(data.loaders[\"train\"]))",
     "return updates // len(data.loaders[\"train\"])", "patience rounded down to whole epochs"),
    ("gray_conv1", "conv.weight.data.sum(dim=1, keepdim=True)",
     "conv.weight.data.mean(dim=1, keepdim=True)", "RGB filters averaged, not summed"),
    ("bootstrap", "positives = rng.choice(np.flatnonzero(labels == 1), (labels == 1).sum())",
     "positives = rng.choice(len(labels), (labels == 1).sum())",
     "positives drawn among all images"),
    ("bootstrap", "idx = np.concatenate([negatives, positives])",
     "idx = rng.choice(len(labels), len(labels))", "resamples not stratified"),
    ("bootstrap", "        for k, p in probs.items():\n",
     "        for k, p in probs.items():\n"
     "            idx = rng.choice(len(labels), len(labels))\n",
     "each model on its own resample, unstratified (unpaired)"),
    ("part3_compare", "top = max(results[k][\"val\"][\"auc\"] for k in scored)",
     "top = max(results[k][\"test\"][\"auc\"] for k in scored)", "model chosen on test AUC"),
    ("part3_compare", "key=lambda k: results[k][\"val_loss\"])",
     "key=lambda k: -results[k][\"test\"][\"auc\"])", "tie broken on test"),
    ("binary_metrics", "auc=skm.roc_auc_score(labels, probs),", "auc=skm.roc_auc_score(labels, "
     "pred),", "AUC from thresholded calls"),
    ("binary_metrics", "ap=skm.average_precision_score(labels, probs),",
     "ap=skm.average_precision_score(labels, pred),", "AP from thresholded calls"),
    ("binary_metrics", "pred = (probs >= threshold).astype(int)",
     "pred = (probs > threshold).astype(int)", "a probability equal to the threshold called "
     "negative"),
    ("operating_points", "screening_threshold(val_labels, val_probs, cfg.screening_recall)",
     "screening_threshold(test_labels, test_probs, cfg.screening_recall)",
     "screening threshold fixed on test"),
    ("screening_threshold", "if recall >= min_recall and recall > recall_at_half:",
     "if recall >= min_recall:", "screening point that buys no sensitivity over 0.5"),
    ("plot_gradcam", "maps = gradcam_maps(name, t.model, x.to(device), data, preds)",
     "maps = gradcam_maps(name, t.model, x.to(device), data, labels)",
     "Grad-CAM of the true class, not the predicted one"),
    ("gradcam_maps", "BinaryClassifierOutputTarget(int(c))", "BinaryClassifierOutputTarget(1)",
     "Grad-CAM always of the finding"),
]


def run_mutant(source, old, new, tests):
    """Copy the repository's script with one change and its tests; (caught by, seconds)."""
    assert source.count(old) == 1, f"not exactly once in hw5_dl.py: {old!r}"
    with tempfile.TemporaryDirectory(prefix="hw5_mutant_") as tmp:
        (Path(tmp) / "hw5_dl.py").write_text(source.replace(old, new), encoding="utf-8")
        shutil.copytree(tests, Path(tmp) / "tests")
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p",
                               "no:cacheprovider", "tests"], cwd=tmp, capture_output=True,
                              text=True)
        seconds = time.perf_counter() - start
    failed = re.search(r"^(?:FAILED|ERROR) tests/(\S+)", done.stdout, re.M)
    if done.returncode == 0:
        return None, seconds
    return (failed.group(1) if failed else f"pytest exit {done.returncode}"), seconds


def main():
    """Run each mutant (or those named) and write the table."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", type=int, nargs="+", help="mutant numbers (1-based) to run")
    args = p.parse_args()
    source = (ROOT / "hw5_dl.py").read_text(encoding="utf-8")
    chosen = args.only or range(1, len(MUTANTS) + 1)
    rows, caught = [], 0
    for number in chosen:
        function, old, new, mistake = MUTANTS[number - 1]
        test, seconds = run_mutant(source, old, new, ROOT / "tests")
        caught += test is not None
        rows.append(f"| {number} | `{function}` | {mistake} | "
                    f"{'caught by `' + test + '`' if test else '**survived**'} | {seconds:.0f} |")
        print(rows[-1], flush=True)
    text = "\n".join([f"{caught} of {len(rows)} mutants caught.", "",
                      "| # | function | mistake brought in | result | s |", "|---" * 5 + "|",
                      *rows])
    if args.only:
        return print(text)
    (ROOT / "bench" / "results" / "mutants.md").write_text(
        "# Mutation check of the tests\n\nCommand: `python bench/mutants.py`; one line of "
        "hw5_dl.py changed per mutant (the list in the script), then `pytest -x`.\n\n"
        + text + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
