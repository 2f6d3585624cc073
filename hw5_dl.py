"""HW5: deep learning on PneumoniaMNIST chest X-rays (28x28, normal vs pneumonia).

Parts 1-5 and the reflection questions, answered in comments beside the code that makes their
evidence: the reasoning, and what seeds 0-7 showed without ImageNet weights, with ranges a new
run lands near (at times a little outside). Each run writes its numbers into outputs/summary.md.

    python hw5_dl.py                    # full run (medmnist downloads the data on first use)
    python hw5_dl.py --data-dir data    # read data/pneumoniamnist.npz, no network needed
    python hw5_dl.py --quick            # every part on 512 images, under a minute on a CPU

A default run takes about 4 minutes on 2 free CPU cores, 7 with ImageNet weights. Over seeds
0-7 (bench/results/recipe.md) the model chosen on validation reaches test ACC 0.900 +- 0.007,
AUC 0.968 +- 0.004; MedMNIST v2's ResNet-18 (28) 0.854 / 0.944 [1]. Early stopping, the choice
of model and every threshold read validation only; the test split is predicted once per model.

[1] Yang et al. MedMNIST v2: a large-scale lightweight benchmark for 2D and 3D biomedical
    image classification. Scientific Data 10, 41 (2023).
[2] Doerrich et al. Rethinking model prototyping through the MedMNIST+ dataset collection (2024).
[3] Selvaraju et al. Grad-CAM: visual explanations from deep networks. ICCV 2017.
"""
import argparse
import copy
import hashlib
import json
import math
import sys
import tempfile
import time
from collections import namedtuple
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from types import SimpleNamespace

import matplotlib.pyplot as plt
import matplotlib.ticker as ticker
import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from matplotlib.cm import ScalarMappable
from sklearn import metrics as skm
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

MODEL_NAMES = {"simple_cnn": "Simple CNN", "resnet18_scratch": "ResNet18 (from scratch)",
               "resnet18_pretrained": "ResNet18 (pretrained)"}
# medmnist's label number of the finding (the disease), which load_data makes the positive class
# 1: the numbers do not say which class is the disease (BreastMNIST's label 0 is "malignant").
FINDING = {"pneumoniamnist": 1, "breastmnist": 0}


# ==================== Configuration ==========================================================
@dataclass
class Config:
    """Every setting of the run with the reason for its value; the command line sets a few."""
    dataset: str = "pneumoniamnist"  # a binary 2D MedMNIST set listed in FINDING
    data_dir: str = ""               # folder holding the npz; "" = medmnist's ~/.medmnist
    outputs: str = "outputs"
    device: str = "auto"
    seed: int = 0
    quick: bool = False
    pretrained_weights: str = ""     # a local torchvision ResNet18 state dict; "" = torchvision's
    train_images: int = 0            # 0 = the whole training split; --quick keeps the first 512
    batch_size: int = 128            # the rubric's suggestion
    flip_prob: float = 0.5           # augmentation (training only, per image): rubric items, 1.3
    max_rotation_deg: float = 10.0   # patients are never perfectly aligned on the detector
    brightness: float = 0.2          # factor in [0.8, 1.2]: exposure differs between machines
    contrast: float = 0.2            # factor in [0.8, 1.2]: so does the window/level
    # Training (2.2), one rule for every model and data set: Adam, validated after every epoch (one
    # pass); the rate drops 10x after `drop_after` updates without a lower val loss, training stops
    # after `stop_after`, the epoch of the lowest val loss is restored. Counted in updates, they
    # mean as much learning on 546 images (4 updates a pass) as on 4,708 (36 a pass).
    drop_after: int = 144            # 4 PneumoniaMNIST epochs: val loss jumps at the first rate
    stop_after: int = 288            # as many again at the lower rate to find a new best
    cnn_updates: int = 1440          # at most 40 PneumoniaMNIST epochs
    cnn_lr: float = 3e-3             # BatchNorm lets it train fast; the rate drops when it stalls
    resnet_updates: int = 720        # 20 epochs: an update costs several times the CNN's
    resnet_lr: float = 1e-3          # Adam's default: 11M parameters, no dropout, a lower rate
    head_updates: int = 72           # fine-tuning stage 1 (2 epochs, resnet_lr): only the head
    finetune_updates: int = 720      # stage 2: everything learns, as long as from scratch
    finetune_lr: float = 3e-4        # ~3x below the from-scratch rate: adjust, don't overwrite
    screening_recall: float = 0.99   # 4.2: the screening threshold keeps this val recall
    bootstrap_resamples: int = 1000  # stratified test resamples for the 95% intervals (3.3)


QUICK = dict(train_images=512, cnn_updates=8, resnet_updates=4, head_updates=4, finetune_updates=4,
             bootstrap_resamples=200)


# ==================== Part 1: data loading and exploration ===================================
def load_data(cfg):
    """1.1: the three splits through medmnist (downloaded when missing), and their DataLoaders:
    images x (N, 1, 28, 28) in [0, 1] and labels y (N,), 1 = the finding, per split."""
    import medmnist
    info = medmnist.INFO[cfg.dataset]
    root = Path(cfg.data_dir or medmnist.info.DEFAULT_ROOT).expanduser()
    path = root / f"{cfg.dataset}.npz"
    finding = FINDING[cfg.dataset]
    x, y = {}, {}
    try:
        root.mkdir(parents=True, exist_ok=True)             # medmnist wants its root to exist
        for split in ("train", "val", "test"):
            ds = getattr(medmnist, info["python_class"])(split=split, root=str(root),
                                                         download=not path.exists())
            images, labels = ds.imgs, ds.labels.reshape(-1)    # labels come as (N, 1)
            if images.dtype != np.uint8 or images.shape[1:] != (28, 28) \
                    or len(labels) != len(images) or sorted(np.unique(labels)) != [0, 1]:
                raise ValueError(f"its {split} split is not 28x28 images labelled 0 and 1")
            x[split] = torch.from_numpy(images).float().div(255).unsqueeze(1)
            y[split] = torch.from_numpy(labels == finding).float()
        md5 = hashlib.md5(path.read_bytes()).hexdigest()
    except Exception as err:   # offline download, missing, truncated or foreign file, bad folder
        raise UserError(f"cannot load {path} ({brief(err)}). Download {path.name} from "
                        f"{info['url']} (md5 {info['MD5']}), put it in a folder and run again "
                        "with --data-dir FOLDER.") from None
    if cfg.train_images:                                 # --quick
        x["train"], y["train"] = x["train"][:cfg.train_images], y["train"][:cfg.train_images]
    # drop_last: every update averages a whole batch (4,708 = 36 x 128 + 100 left for later passes)
    loaders = {"train": DataLoader(TensorDataset(x["train"], y["train"]), cfg.batch_size,
                                   shuffle=True, generator=torch.Generator().manual_seed(cfg.seed),
                                   drop_last=True),
               "val": DataLoader(TensorDataset(x["val"], y["val"]), cfg.batch_size),
               "test": DataLoader(TensorDataset(x["test"], y["test"]), cfg.batch_size)}
    medmnist_labels = [1 - finding, finding]      # medmnist's numbers of our classes 0 and 1
    n_pos, n = y["train"].sum().item(), len(y["train"])
    return SimpleNamespace(x=x, y=y, loaders=loaders, name=info["python_class"], md5=md5,
                           class_names=[info["label"][str(k)] for k in medmnist_labels],
                           medmnist_labels=medmnist_labels, mean=x["train"].mean().item(),
                           std=x["train"].std().item(), pos_weight=(n - n_pos) / n_pos)  # neg/pos


def augment(x, cfg):
    """1.3: random flip, rotation, brightness and contrast, drawn anew for every image of batch x
    (torchvision's transforms draw once per call: a call per image doubles a CNN epoch)."""
    n, device = len(x), x.device
    flip = torch.rand(n, device=device) < cfg.flip_prob
    x = torch.where(flip.view(n, 1, 1, 1), x.flip(3), x)
    # Rotation by a matrix theta = [[cos, -sin, 0], [sin, cos, 0]] per image: affine_grid gives
    # each output pixel the position (-1 to 1 across the image) it reads, grid_sample reads there.
    # Reflection fills the uncovered corners with nearby anatomy, not black triangles.
    angle = torch.deg2rad(cfg.max_rotation_deg * (2 * torch.rand(n, device=device) - 1))
    theta = torch.zeros(n, 2, 3, device=device)
    theta[:, 0, 0], theta[:, 0, 1] = angle.cos(), -angle.sin()
    theta[:, 1, 0], theta[:, 1, 1] = angle.sin(), angle.cos()
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, padding_mode="reflection", align_corners=False)
    # Contrast stretches each image around its mean, brightness scales it; factors in [1-s, 1+s].
    contrast = 1 + cfg.contrast * (2 * torch.rand(n, 1, 1, 1, device=device) - 1)
    brightness = 1 + cfg.brightness * (2 * torch.rand(n, 1, 1, 1, device=device) - 1)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (((x - mean) * contrast + mean) * brightness).clamp(0, 1)


def standardize(x, data):
    """Zero mean and unit variance with the training split's statistics."""
    return (x - data.mean) / data.std


def plot_samples(data, path, per_class=8):
    """1.2: a row of training images per class."""
    fig, axes = plt.subplots(2, per_class, figsize=(per_class * 1.1, 2.6))
    for label, row in enumerate(axes):
        for ax, i in zip(row, torch.nonzero(data.y["train"] == label)[:per_class, 0]):
            show_image(ax, data.x["train"][i])
        row[0].set_title(f"{data.class_names[label]} ({'positive' if label else 'negative'}, "
                         f"medmnist label {data.medmnist_labels[label]})", fontsize=9, loc="left")
    fig.suptitle(f"{data.name} training samples per class")
    save_figure(fig, path)


def plot_class_distribution(data, path):
    """1.2: class counts per split as grouped bars, each labelled with its count and share."""
    fig, ax = plt.subplots(figsize=(7, 3.6))
    splits = ["train", "val", "test"]
    for label, name in enumerate(data.class_names):
        counts = [int((data.y[s] == label).sum()) for s in splits]
        shares = [f"{c}\n{c / len(data.y[s]):.1%}" for c, s in zip(counts, splits)]
        bars = ax.bar(np.arange(3) + (label - 0.5) * 0.38, counts, 0.38, label=name)
        ax.bar_label(bars, shares, fontsize=8)
    ax.set_xticks(range(3), [f"{s} (n={len(data.y[s])})" for s in splits])
    ax.set(ylabel="number of images", title="Class distribution per split")
    ax.margins(y=0.2)
    ax.legend(loc="upper right")
    save_figure(fig, path)


def plot_augmentation(data, cfg, path, per_class=2, draws=5):
    """1.3: two training images per class, each with several independent augmented draws."""
    idx = torch.cat([torch.nonzero(data.y["train"] == c)[:per_class, 0] for c in (0, 1)])
    images = data.x["train"][idx]
    augmented = augment(images.repeat_interleave(draws, 0), cfg).view(len(idx), draws, 1, 28, 28)
    fig, axes = plt.subplots(2 * per_class, draws + 1, figsize=(1.4 * (draws + 1) + 0.6,
                                                                3 * per_class))
    for i, row in enumerate(axes):
        show_image(row[0], images[i], "original" if i == 0 else None)
        row[0].text(-0.1, 0.5, data.class_names[i // per_class], transform=row[0].transAxes,
                    rotation=90, ha="right", va="center", fontsize=9)
        for j, ax in enumerate(row[1:]):
            show_image(ax, augmented[i, j], f"draw {j + 1}" if i == 0 else None)
    fig.suptitle(f"Training augmentation, drawn per image: flip (p={cfg.flip_prob}), rotation "
                 f"±{cfg.max_rotation_deg:g}° (corners filled by reflection), brightness "
                 f"±{cfg.brightness:.0%}, contrast ±{cfg.contrast:.0%}", fontsize=9)
    save_figure(fig, path)


def part1_data(data, cfg, out):
    """Part 1: split sizes and class balance, then the samples, distribution and augmentation."""
    for split, y in data.y.items():
        print(f"{split}: {len(y)} images, {y.mean().item():.1%} {data.class_names[1]}")
    plot_samples(data, out / "part1_samples.png")
    plot_class_distribution(data, out / "part1_class_distribution.png")
    plot_augmentation(data, cfg, out / "part1_augmentation.png")


# 1.2 Discussion: how might the class imbalance affect training? 74% of training images show
# pneumonia (part1_class_distribution.png): an unweighted loss is dominated by that class, always
# answering "pneumonia" scores 74% accuracy, and errors concentrate on normal lungs. So AUC,
# precision, recall, specificity and F1 stand beside accuracy, and the loss weights pneumonia by
# n_normal / n_pneumonia (pos_weight ~0.35): both classes weigh equally, no image is dropped.
#
# 1.3 Discussion: why is augmentation important for medical imaging? Labelled medical images are
# few (4,708 here) and a CNN memorises them quickly; augmentation shows it the variation it will
# meet anyway (positioning -> small rotations; exposure, scanner -> brightness and contrast), so
# it learns the disease, not the pixels, while label and anatomy stay plausible: the flip is
# questionable (a heart on the right is rare), kept as pneumonia can sit in either lung.


# ==================== Part 2: a simple CNN ===================================================
class SimpleCNN(nn.Module):
    """2.1: three conv blocks (conv 3x3 -> BatchNorm -> ReLU -> 2x2 max-pool) and two FC layers.

    - 3x3 kernels with padding 1 keep the size until each pool: 28 -> 14 -> 7 -> 3. Three blocks
      see most of a lung; a fourth would pool 3x3 to 1x1.
    - Channels double (32, 64, 128) as the resolution halves: similar cost per block, more room
      for later, more abstract patterns. BatchNorm allows a high learning rate, fewer epochs.
    - FC 1152 -> 128 -> 1, dropout 0.3 before each against memorising 4,708 images; one logit
      with BCE-with-logits is the natural binary head.
    """

    def __init__(self, channels=(32, 64, 128), hidden=128, dropout=0.3):
        super().__init__()
        blocks, c_in = [], 1
        for c_out in channels:
            blocks.append(nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
                                        nn.BatchNorm2d(c_out), nn.ReLU(), nn.MaxPool2d(2)))
            c_in = c_out
        self.features = nn.Sequential(*blocks)
        self.classifier = nn.Sequential(nn.Flatten(), nn.Dropout(dropout),
                                        nn.Linear(c_in * 3 * 3, hidden), nn.ReLU(),
                                        nn.Dropout(dropout), nn.Linear(hidden, 1))

    def forward(self, x):
        return self.classifier(self.features(x))


class EarlyStopping:
    """2.2: stop after `patience` epochs without a lower validation loss; keep the best weights."""

    def __init__(self, patience):
        self.patience, self.bad_epochs = patience, 0
        self.best_loss, self.best_epoch, self.best_state = float("inf"), 0, None

    def step(self, val_loss, model, epoch):
        """Record one epoch; return True when training should stop."""
        if val_loss < self.best_loss:
            self.best_loss, self.best_epoch, self.bad_epochs = val_loss, epoch, 0
            self.best_state = copy.deepcopy(model.state_dict())
        else:
            self.bad_epochs += 1
        return self.bad_epochs >= self.patience

    def new_stage(self):
        """A new training stage (3.2) gets the whole patience; the best epoch so far stays."""
        self.bad_epochs = 0


Stage = namedtuple("Stage", "name updates lr head_only", defaults=[False])


def epochs(updates, data):
    """2.2: how many epochs (passes over the training split) hold this many updates."""
    return math.ceil(updates / len(data.loaders["train"]))


def set_trainable(model, head_only):
    """3.2: freeze everything but the final classifier (head_only) or unfreeze everything."""
    for name, p in model.named_parameters():
        p.requires_grad = not head_only or name.startswith("fc.")


@torch.no_grad()
def predict(model, loader, data, device):
    """Logits and labels of a whole loader, in its order, as CPU tensors."""
    model.eval()
    logits, labels = [], []
    for x, y in loader:
        logits.append(model(standardize(x.to(device), data)).squeeze(1).cpu())
        labels.append(y)
    return torch.cat(logits), torch.cat(labels)


def train_epoch(model, data, cfg, criterion, optimizer, device):
    """2.2: one pass over the augmented training split; mean loss and accuracy."""
    model.train()
    total_loss = correct = seen = 0
    for x, y in data.loaders["train"]:
        x, y = x.to(device), y.to(device)
        logits = model(standardize(augment(x, cfg), data)).squeeze(1)
        loss = criterion(logits, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        total_loss += loss.item() * len(y)
        correct += ((logits > 0) == (y == 1)).sum().item()
        seen += len(y)
    return total_loss / seen, correct / seen


def validate(model, data, criterion, device):
    """2.2: loss (the training loss's weighting), accuracy and AUC on the validation split."""
    logits, labels = predict(model, data.loaders["val"], data, device)
    return dict(val_loss=criterion(logits.to(device), labels.to(device)).item(),
                val_acc=((logits > 0) == (labels == 1)).float().mean().item(),
                val_auc=skm.roc_auc_score(labels, logits))


def fit(model, data, cfg, stage, stopper, history, name, device):
    """2.2: train one stage by the rule in Config; `stopper` keeps the best epoch of all stages."""
    criterion = nn.BCEWithLogitsLoss(pos_weight=torch.tensor(data.pos_weight).to(device))  # 1.2
    set_trainable(model, stage.head_only)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], stage.lr)
    stopper.new_stage()
    for _ in range(epochs(stage.updates, data)):
        tic = time.perf_counter()
        row = dict(epoch=len(history) + 1, stage=stage.name, lr=optimizer.param_groups[0]["lr"])
        row["train_loss"], row["train_acc"] = train_epoch(model, data, cfg, criterion, optimizer,
                                                          device)
        row.update(validate(model, data, criterion, device), seconds=time.perf_counter() - tic)
        history.append(row)
        print("  {} epoch {epoch:2d} ({stage}, lr {lr:.0e}): train loss {train_loss:.3f} acc "
              "{train_acc:.3f} | val loss {val_loss:.3f} acc {val_acc:.3f} auc {val_auc:.4f}"
              .format(name, **row))
        if stopper.step(row["val_loss"], model, row["epoch"]):
            break
        if stopper.bad_epochs and stopper.bad_epochs % epochs(cfg.drop_after, data) == 0:
            for group in optimizer.param_groups:      # drop_after updates without a lower loss
                group["lr"] *= 0.1


def epoch_axes(ax, what, r, events=True):
    """2.3/3.2: whole-number epochs, a loss on a log scale (late differences stay visible), the
    start of r's stage 2 (fine-tuning) marked and, with events, its rate drops and best epoch."""
    stage2 = [e["epoch"] for e in r["history"] if e["stage"] == "unfrozen"]
    if stage2:
        ax.axvline(stage2[0] - 0.5, color="tab:red", ls=":", label="stage 2 from here")
    for i, epoch in enumerate(r["rate_drops"] if events else []):   # one legend entry for all
        ax.axvline(epoch - 0.5, color="tab:purple", ls="-.", lw=1,
                   label="learning rate x0.1" if i == 0 else None)
    if events:
        ax.axvline(r["best_epoch"], color="gray", ls="--", label=f"restored: epoch "
                   f"{r['best_epoch']}")
    ax.set(xlabel="epoch", ylabel=what, xlim=(0.5, ax.dataLim.x1 + 0.5))     # up to the last epoch
    ax.xaxis.get_major_locator().set_params(integer=True, min_n_ticks=1)
    if "loss" in what:                 # plain ticks (0.03, 0.05, 0.1), one beyond each data end
        ticks = [m * 10.0 ** e for e in range(-6, 3) for m in (1, 2, 3, 4, 5, 7)]
        low = max(t for t in ticks if t <= ax.dataLim.y0)
        high = min(t for t in ticks if t >= ax.dataLim.y1)
        ax.set(yscale="log", ylim=(low, high), yticks=[t for t in ticks if low <= t <= high])
        ax.yaxis.set(major_formatter=ticker.FormatStrFormatter("%g"),
                     minor_formatter=ticker.NullFormatter())
    else:                                               # accuracy and AUC end at 1
        ax.set_ylim(top=min(ax.get_ylim()[1], 1))
    ax.grid(alpha=0.3)


def plot_training_curves(results, path, title):
    """2.3/3.2: train vs val loss and accuracy per model; with both ResNet18s trained, a last row
    puts their val loss and val AUC on shared axes (3.2)."""
    trained = {k: r for k, r in results.items() if r["status"] == "trained"}
    pair = ("resnet18_pretrained", "resnet18_scratch")
    n_rows = len(trained) + set(pair).issubset(trained)
    fig, axes = plt.subplots(n_rows, 2, figsize=(13.5, 3.4 * n_rows + 0.6),
                             layout="constrained", squeeze=False)
    for row, (name, r) in zip(axes, trained.items()):
        x = [e["epoch"] for e in r["history"]]
        for ax, metric, what in zip(row, ("loss", "acc"), ("weighted BCE loss", "accuracy")):
            ax.plot(x, [e[f"train_{metric}"] for e in r["history"]], "o-", ms=3,
                    label="train (augmented, training mode)")
            ax.plot(x, [e[f"val_{metric}"] for e in r["history"]], "o-", ms=3, label="val")
            ax.set_title(f"{MODEL_NAMES[name]}: {what}")
            epoch_axes(ax, what, r)
        row[1].legend(fontsize=8, loc="center left", bbox_to_anchor=(1, 0.5),
                      title=f"{r['ended']} after epoch {len(x)}", title_fontsize=8)
    if set(pair).issubset(trained):     # 3.2: the two ResNet18s' val curves on shared axes
        for ax, metric, what in zip(axes[-1], ("val_loss", "val_auc"), ("val loss", "val AUC")):
            for name, colour in zip(pair, ("tab:green", "tab:brown")):
                r = trained[name]
                ax.plot([e["epoch"] for e in r["history"]], [e[metric] for e in r["history"]],
                        "o-", ms=3, color=colour,
                        label=f"{MODEL_NAMES[name]}, restored: epoch {r['best_epoch']}")
            ax.set_title(f"3.2 fine-tuned against from scratch: {what}")
            epoch_axes(ax, what, trained[pair[0]], events=False)
        axes[-1, 1].legend(fontsize=8, loc="center left", bbox_to_anchor=(1, 0.5))
    fig.suptitle(title)
    for k in results.keys() - trained.keys():        # a note below the plots says why
        fig.supxlabel(f"No curves for {MODEL_NAMES[k]}: {results[k]['reason']}"
                      .replace("; ", ";\n"), fontsize=9)
    save_figure(fig, path)


# A model's outcome: its metrics.json entry, and the network and its predictions if it trained.
Trained = namedtuple("Trained", "result model val_probs test_probs", defaults=[None] * 3)


def train_model(name, build, stages, data, cfg, device):
    """Build a model from the run's seed, train it stage by stage, predict val and test (once)."""
    torch.manual_seed(cfg.seed)      # every model's initial weights come from the run's seed
    model = build().to(device)
    history, stopper, start = [], EarlyStopping(epochs(cfg.stop_after, data)), time.perf_counter()
    for stage in stages:
        fit(model, data, cfg, stage, stopper, history, MODEL_NAMES[name], device)
    model.load_state_dict(stopper.best_state)    # the lowest val loss of all stages
    seconds = time.perf_counter() - start
    set_trainable(model, head_only=False)        # Grad-CAM needs gradients everywhere
    val_logits, val_labels = predict(model, data.loaders["val"], data, device)
    test_logits, test_labels = predict(model, data.loaders["test"], data, device)  # the one read
    # float64, as float32 rounds every P above 1 - 6e-8 to 1 and confident films would tie there
    val_probs, test_probs = (v.double().sigmoid().numpy() for v in (val_logits, test_logits))
    max_epochs = sum(epochs(s.updates, data) for s in stages)
    r = dict(status="trained", params=sum(p.numel() for p in model.parameters()),
             epochs_trained=len(history), max_epochs=max_epochs, best_epoch=stopper.best_epoch,
             rate_drops=[e["epoch"] for prev, e in zip(history, history[1:])
                         if e["lr"] < prev["lr"] and e["stage"] == prev["stage"]],
             ended="stopped early" if len(history) < max_epochs else "cap reached",
             val_loss=stopper.best_loss, train_seconds=round(seconds, 1),
             val=binary_metrics(val_labels.numpy(), val_probs),
             test=binary_metrics(test_labels.numpy(), test_probs), history=history)
    print(f"{MODEL_NAMES[name]} ({r['params']:,} parameters): {r['ended']} after {len(history)}"
          f"/{max_epochs} epochs, restored {r['best_epoch']} ({seconds:.0f} s)")
    return Trained(r, model, val_probs, test_probs)


def part2_simple_cnn(data, cfg, out, device):
    """Part 2: train the Simple CNN with early stopping and plot its training curves."""
    # channels_last (N, H, W, C): CPU convolutions ~20% faster (measured); on GPUs untested here,
    # and on Apple MPS it gave silently wrong updates (PyTorch issue 118115): so the CPU only.
    layout = torch.channels_last if device.type == "cpu" else torch.contiguous_format
    cnn = train_model("simple_cnn", lambda: SimpleCNN().to(memory_format=layout),
                      [Stage("train", cfg.cnn_updates, cfg.cnn_lr)], data, cfg, device)
    plot_training_curves({"simple_cnn": cnn.result}, out / "part2_training_curves.png",
                         "Part 2.3: Simple CNN training curves")
    return cnn


# 2.3 Discussion: is the model overfitting, and how can you tell? (This run: summary.md 2.3.)
# It would show as a val loss trending up while the training loss keeps falling. Over seeds 0-7
# the CNN's val loss jumps at the first rate, then after the last rate drop both losses go flat
# and the val loss wanders 2-13% above its low without a trend, where training stops. No gap
# opens: at the restored epoch the val loss is within 0.002 of the training loss (below it in 6
# of 8 seeds; augmentation and dropout inflate the training loss a little) and the accuracies
# within 0.02. The large gap is validation 0.962-0.983 to test 0.859-0.905: another source split.


# ==================== Part 3: transfer learning with ResNet18 ================================
def gray_conv1(conv):
    """3.1: a 1-channel conv whose filters sum the RGB ones: its response to a gray image equals
    the RGB conv's to the R=G=B copy, which the pretrained BatchNorm after it expects. From
    scratch it is a random init of 3x the variance, which that BatchNorm normalises away."""
    gray = nn.Conv2d(1, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, bias=False)
    gray.weight.data = conv.weight.data.sum(dim=1, keepdim=True)
    return gray


def build_resnet18(state_dict=None):
    """3.1: torchvision's ResNet18 for 1x28x28 input and one output logit. Its stem (7x7 stride-2
    conv, stride-2 max-pool) leaves 7x7 for layer1, 4x4 for layer2 (read by Grad-CAM), 1x1 after
    layer4; kept, as pretrained weights fit it and it trains 2x as fast (bench/results/stems.md)"""
    model = torchvision.models.resnet18()
    if state_dict is not None:
        model.load_state_dict(state_dict)
    model.conv1 = gray_conv1(model.conv1)
    model.fc = nn.Linear(model.fc.in_features, 1)
    return model


def load_imagenet_weights(cfg):
    """3.1: ImageNet ResNet18 weights from --pretrained-weights or torchvision; (state, reason)."""
    try:   # weights_only: tensors, never pickled code; checked on ResNet18 before any training
        state = (torch.load(cfg.pretrained_weights, map_location="cpu", weights_only=True)
                 if cfg.pretrained_weights else torchvision.models.ResNet18_Weights.IMAGENET1K_V1
                 .get_state_dict(progress=False, map_location="cpu", weights_only=True))
        torchvision.models.resnet18().load_state_dict(state)
        return state, None
    except Exception as err:   # offline (URLError), no such file, not a ResNet18 state dict
        if cfg.pretrained_weights:
            raise UserError(f"--pretrained-weights {cfg.pretrained_weights} is not a torchvision "
                            f"ResNet18 state dict ({brief(err)}). Pass the file "
                            "resnet18-f37072fd.pth that torchvision downloads.") from None
        return None, (f"not run: ImageNet weights unavailable ({type(err).__name__}); put "
                      "resnet18-f37072fd.pth in $TORCH_HOME/hub/checkpoints (default ~/.cache/"
                      "torch/hub/checkpoints) or pass --pretrained-weights PATH")


def part3_resnet18(data, cfg, out, device, imagenet_state, skip_reason):
    """Parts 3.1-3.2: ResNet18 from scratch, and fine-tuned from ImageNet when weights are here."""
    trained = {"resnet18_scratch": train_model(
        "resnet18_scratch", build_resnet18, [Stage("train", cfg.resnet_updates, cfg.resnet_lr)],
        data, cfg, device)}
    if imagenet_state is None:
        trained["resnet18_pretrained"] = Trained(dict(status="skipped", reason=skip_reason))
    else:
        trained["resnet18_pretrained"] = train_model(
            "resnet18_pretrained", lambda: build_resnet18(imagenet_state),
            [Stage("frozen", cfg.head_updates, cfg.resnet_lr, head_only=True),
             Stage("unfrozen", cfg.finetune_updates, cfg.finetune_lr)], data, cfg, device)
    plot_training_curves({k: t.result for k, t in trained.items()},
                         out / "part3_training_curves.png", "Part 3: ResNet18 training curves")
    return trained


def bootstrap(labels, probs, n_resamples, seed):
    """3.3: AUC, accuracy, recall and specificity (at 0.5) of every model ({name: test probs}) on
    the same seeded test resamples, each stratified: it keeps the split's class counts, so the
    spread is the model's, not the prevalence's (precision and F1 follow from the other four)."""
    rng, hits = np.random.default_rng(seed), {k: (p >= 0.5) == labels for k, p in probs.items()}
    draws = {k: {m: [] for m in ("auc", "accuracy", "recall", "specificity")} for k in probs}
    for _ in range(n_resamples):
        negatives = rng.choice(np.flatnonzero(labels == 0), (labels == 0).sum())
        positives = rng.choice(np.flatnonzero(labels == 1), (labels == 1).sum())
        idx = np.concatenate([negatives, positives])        # one resample for all models: paired
        for k, p in probs.items():
            hit = hits[k]
            draws[k]["auc"].append(skm.roc_auc_score(labels[idx], p[idx]))
            draws[k]["accuracy"].append(hit[idx].mean())
            draws[k]["recall"].append(hit[positives].mean())         # resampled positives found
            draws[k]["specificity"].append(hit[negatives].mean())
    return {k: {m: np.array(v) for m, v in d.items()} for k, d in draws.items()}


def auc_difference(draws, a, b):
    """3.2/3.3: AUC(a) - AUC(b) on the same test resamples (paired: the luck of the split cancels),
    its mean, 95% interval and what that says."""
    d = draws[a]["auc"] - draws[b]["auc"]
    low, high = np.percentile(d, [2.5, 97.5]).tolist()
    verdict = ("contains 0: this test split cannot tell the two apart" if low <= 0 <= high else
               f"excludes 0: {MODEL_NAMES[a if low > 0 else b]} ranks better")
    return dict(difference=float(d.mean()), ci95=[low, high], verdict=verdict)


def comparison_table(results):
    """3.3: the rubric's table in markdown, with specificity, validation, size and cost besides."""
    rows = ["| Model | Test Accuracy | Test AUC | Precision | Recall | Specificity | F1 | Val AUC "
            "/ loss | Params | Train time |", "|---" * 10 + "|"]
    for name, r in results.items():
        if r["status"] != "trained":
            rows.append(f"| {MODEL_NAMES[name]} | not run (below) |" + " |" * 8)
            continue
        cells = [f"{r['test'][m]:.3f}" + (" [{:.3f}–{:.3f}]".format(*r["test_ci95"][m])
                                            if m in r["test_ci95"] else "")
                 for m in ("accuracy", "auc", "precision", "recall", "specificity", "f1")]
        rows.append(f"| {MODEL_NAMES[name]} | {' | '.join(cells)} | {r['val']['auc']:.4f} / "
                    f"{r['val_loss']:.4f} | {r['params'] / 1e6:.2f}M | {r['train_seconds']:.0f} s "
                    f"({r['epochs_trained']}/{r['max_epochs']} epochs) |")
    return rows


def part3_compare(trained, data, cfg, out):
    """Part 3.3: choose the model for Parts 4-5 on validation, then compare all on test."""
    results = {k: t.result for k, t in trained.items()}
    scored = {k: t for k, t in trained.items() if t.model is not None}
    # Val AUCs within 0.001 of the best tie: one model's val AUC moves about that much between
    # seeds (sd 0.0005 over seeds 0-7). Then the val loss, which training minimises, decides.
    top = max(results[k]["val"]["auc"] for k in scored)
    best = min((k for k in scored if results[k]["val"]["auc"] >= top - 0.001),
               key=lambda k: results[k]["val_loss"])
    draws = bootstrap(data.y["test"].numpy(), {k: t.test_probs for k, t in scored.items()},
                      cfg.bootstrap_resamples, cfg.seed)
    for name in scored:
        results[name]["test_ci95"] = {k: np.percentile(v, [2.5, 97.5]).tolist()   # 95% interval
                                      for k, v in draws[name].items()}
    differences = {k: auc_difference(draws, best, k) for k in scored if k != best}
    if {"resnet18_pretrained", "resnet18_scratch"} <= set(scored):       # for 3.2
        results["resnet18_pretrained"]["test_auc_gain_over_scratch"] = auc_difference(
            draws, "resnet18_pretrained", "resnet18_scratch")
    md = comparison_table(results) + ["", f"- Test split, threshold 0.5, positive class "
                                      f"{data.class_names[1]}; [stratified bootstrap 95% "
                                      f"interval, {cfg.bootstrap_resamples:,} resamples]. Chosen "
                                      f"on validation for Parts 4-5: **{MODEL_NAMES[best]}**."]
    md += [f"- AUC({MODEL_NAMES[best]}) − AUC({MODEL_NAMES[k]}) on the same test resamples: "
           "{:+.3f} [{:+.3f}, {:+.3f}], {}.".format(d["difference"], *d["ci95"], d["verdict"])
           for k, d in differences.items()]
    md += [f"- {MODEL_NAMES[k]}: {r['reason']}" for k, r in results.items() if k not in scored]
    md = "\n".join(md) + "\n"
    (out / "part3_model_comparison.md").write_text(md, encoding="utf-8")
    return best, md, differences


# 3.1 Discussion: why might ImageNet pretrained weights help for medical images? X-rays are not
# photos, but an ImageNet network's early layers are generic (edges, blobs, gradients, textures),
# and lung fields, rib edges and opacities are made of them: from there the network needs fewer
# labelled images and epochs, and overfits less than 11M random parameters on 4,708 images. The
# gain shrinks far from ImageNet's domain and at 28x28, below the scale of its features.
#
# 3.2 Fine-tuning strategy: stage 1 trains only the new head, so its random weights cannot send
# large, noisy gradients into the pretrained features (BatchNorm statistics still move to
# X-rays'); stage 2 unfreezes everything at a ~3x lower rate, to adjust the features, not
# overwrite them; early stopping spans both stages. Against training from scratch (summary.md
# 3.2, last row of part3_training_curves.png): a lower val loss early means ImageNet's features
# transfer and save training, a lower one at the restored epoch a better model, and the paired
# test AUC interval says whether the test split can tell them apart. At 28x28 pretraining is no
# sure gain: ResNet18 fine-tuned reaches 0.831 / 0.950 test ACC / AUC [2], from scratch 0.854 /
# 0.944 [1]. Without ImageNet weights the model is skipped with its reason; nothing stands in.
#
# 3.3 Which model performs best, and why? Validation alone chooses (the lowest val loss among val
# AUCs within 0.001 of the best; this run: summary.md 3.3). Over seeds 0-7 the Simple CNN and
# ResNet18 from scratch end close on validation (val AUC 0.9965-0.9980; the CNN chosen 5 times,
# ResNet18 3). On test ResNet18 usually ranks better: AUC 0.966-0.975 against 0.962-0.969 (the
# paired 95% interval in its favour in 5 of 8 seeds, containing 0 in 3), accuracy at 0.5
# 0.888-0.912 against 0.859-0.905; it ends at its 20-epoch cap (a time limit), in 3 seeds still
# improving there, so its edge may be slightly understated. Saturated validation
# cannot see a gap that shows only after the shift; 46x the parameters buy at most ~0.01 test AUC
# for 2-4x the CNN's training time (run alone), as 28x28 holds little fine structure. The
# pretrained ResNet18, when it trains, enters the same choice; expect it level with training from
# scratch (3.2: the published 28x28 numbers show no clear gain [1, 2]), and read whether it is.


# ==================== Part 4: evaluation of the best model ===================================
def binary_metrics(labels, probs, threshold=0.5):
    """4.1: accuracy, precision (PPV), recall (sensitivity), specificity, NPV and F1 at a
    threshold, and the threshold-free AUC and AP; label 1 (the finding) is positive."""
    pred = (probs >= threshold).astype(int)
    tn, fp, fn, tp = skm.confusion_matrix(labels, pred, labels=[0, 1]).ravel()
    return dict(accuracy=skm.accuracy_score(labels, pred),
                precision=skm.precision_score(labels, pred, zero_division=0),
                recall=skm.recall_score(labels, pred, zero_division=0),
                specificity=tn / (tn + fp) if tn + fp else 0.0,
                npv=tn / (tn + fn) if tn + fn else 0.0,
                f1=skm.f1_score(labels, pred, zero_division=0),
                auc=skm.roc_auc_score(labels, probs),
                ap=skm.average_precision_score(labels, probs),
                tp=int(tp), tn=int(tn), fp=int(fp), fn=int(fn))


def screening_threshold(val_labels, val_probs, min_recall):
    """4.2: the highest threshold that finds at least min_recall of the val positives and more of
    them than 0.5 does (a screening point must buy sensitivity); 0.5 if 0.5 finds them all."""
    positives = val_probs[val_labels == 1]
    recall_at_half = (positives >= 0.5).mean()
    for t in sorted(positives, reverse=True):      # each positive's probability, highest first
        recall = (positives >= t).mean()
        if recall >= min_recall and recall > recall_at_half:
            return float(t)
    return 0.5


def operating_points(val_labels, val_probs, test_labels, test_probs, cfg):
    """4.2: two thresholds, each fixed on validation by its rule, then read on test."""
    rules = {"0.5": (0.5, "the default"),
             "screening": (screening_threshold(val_labels, val_probs, cfg.screening_recall),
                           f"highest with val recall ≥ {cfg.screening_recall}, above 0.5's")}
    points = {}
    for name, (t, rule) in rules.items():
        val = binary_metrics(val_labels, val_probs, t)
        points[name] = dict(threshold=t, rule=rule, val_recall=val["recall"],
                            val_specificity=val["specificity"],
                            **binary_metrics(test_labels, test_probs, t))
    return points


def plot_confusion_matrix(labels, probs, class_names, path, title):
    """4.1: the test confusion matrix at threshold 0.5, with the metrics it gives."""
    m = binary_metrics(labels, probs)
    fig, ax = plt.subplots(figsize=(4.8, 5), layout="constrained")
    skm.ConfusionMatrixDisplay.from_predictions(labels, (probs >= 0.5).astype(int), ax=ax,
                                                display_labels=class_names, cmap="Blues",
                                                colorbar=False)
    ax.set_title(title, fontsize=10)
    fig.supxlabel(f"positive class {class_names[1]}: accuracy {m['accuracy']:.3f}, precision "
                  f"{m['precision']:.3f}, recall {m['recall']:.3f}\nspecificity "
                  f"{m['specificity']:.3f}, F1 {m['f1']:.3f}, AUC {m['auc']:.3f}", fontsize=9)
    save_figure(fig, path)


def plot_roc_pr(labels, probs, points, class_names, path, title):
    """4.2: test ROC and PR curves, with the operating points (fixed on validation) marked."""
    neg, pos = class_names
    fpr, tpr, _ = skm.roc_curve(labels, probs)
    precision, recall, _ = skm.precision_recall_curve(labels, probs)
    fig, (roc, pr) = plt.subplots(1, 2, figsize=(11, 5.2), layout="constrained")
    roc.plot(fpr, tpr, label=f"test (AUC = {skm.roc_auc_score(labels, probs):.3f})", zorder=3,
             clip_on=False)                         # drawn over the frame where it runs along it
    roc.plot([0, 1], [0, 1], "k:", label="chance")
    pr.step(recall, precision, where="post", zorder=3, clip_on=False,
            label=f"test (AP = {skm.average_precision_score(labels, probs):.3f})")
    pr.axhline(labels.mean(), color="k", ls=":", label=f"chance ({pos} share)")
    for marker, (name, p) in zip("oD", points.items()):       # clip_on=False: whole at 0 or 1
        label = f"{name}: t = {p['threshold']:.3f}"
        roc.plot(1 - p["specificity"], p["recall"], marker, ms=9, mfc="none", mew=2, label=label,
                 clip_on=False)
        pr.plot(p["recall"], p["precision"], marker, ms=9, mfc="none", mew=2, label=label,
                clip_on=False)
    roc.set(title="ROC curve", ylabel=f"true positive rate: {pos} found (recall)",
            xlabel=f"false positive rate: {neg} called {pos} (1 − specificity)")
    pr.set(title="Precision-recall curve", xlabel=f"recall: {pos} found",
           ylabel=f"precision: {pos} calls right (PPV)")
    pr_bottom = max(0, min(precision.min(), labels.mean()) - 0.1)      # all drawn, room below
    for ax, corner, bottom in ((roc, "lower right", 0), (pr, "center left", pr_bottom)):
        ax.set(xlim=(0, 1), ylim=(bottom, 1))                  # rates stay within [0, 1]
        ax.legend(fontsize=8, loc=corner)
        ax.grid(alpha=0.3)
    fig.suptitle(f"{title}\noperating points: threshold t fixed on validation by its rule")
    save_figure(fig, path)


OUTCOMES = {"true positive": (1, 1), "true negative": (0, 0),     # (true label, prediction)
            "false positive": (0, 1), "false negative": (1, 0)}


def confidence_groups(labels, probs):
    """4.3: test indices of TP, TN, FP and FN at 0.5, each from most to least confident."""
    pred = (probs >= 0.5).astype(int)
    confidence = np.where(pred, probs, 1 - probs)
    order = np.argsort(-confidence, kind="stable")
    return {k: [i for i in order if labels[i] == truth and pred[i] == called]
            for k, (truth, called) in OUTCOMES.items()}


def plot_error_analysis(images, labels, probs, class_names, path, title, per_group=6):
    """4.3: the most confident TP, TN, FP and FN test images with their P(positive class)."""
    fig, axes = plt.subplots(4, per_group, figsize=(1.5 * per_group, 6.6))
    for row, (group, idx) in zip(axes, confidence_groups(labels, probs).items()):
        for ax in row:
            ax.set_axis_off()
        for ax, i in zip(row, idx):
            show_image(ax, images[i], p_text(probs[i]))
        truth, called = (class_names[k] for k in OUTCOMES[group])
        row[0].text(-0.15, 0.5, f"{group} (n={len(idx)}):\n{truth}\ncalled {called}",
                    transform=row[0].transAxes, ha="right", va="center", fontsize=9)
    fig.suptitle(title)
    save_figure(fig, path)


def part4_evaluate(best, chosen, data, cfg, out):
    """Part 4: the chosen model on test: confusion matrix, operating points, ROC/PR, errors."""
    val_labels, test_labels = data.y["val"].numpy(), data.y["test"].numpy()
    probs, names = chosen.test_probs, data.class_names
    points = operating_points(val_labels, chosen.val_probs, test_labels, probs, cfg)
    title = f"{MODEL_NAMES[best]}, chosen on validation (test split)"
    plot_confusion_matrix(test_labels, probs, names, out / "part4_confusion_matrix.png",
                          f"{title}\nthreshold 0.5")
    plot_roc_pr(test_labels, probs, points, names, out / "part4_roc_pr.png", title)
    plot_error_analysis(data.x["test"], test_labels, probs, names,
                        out / "part4_error_analysis.png", f"{title}: most confident cases per "
                        f"outcome at threshold 0.5\np = P({names[1]}); near 1, 1-p is shown")
    return points


# 4.1 Which metric matters most for pneumonia screening? Recall (sensitivity): a missed pneumonia
# goes home untreated, a false alarm costs a second read. Calling everyone sick games recall, so
# it is read with specificity (or precision) and the threshold-free AUC (this run: summary.md 4.1).
#
# 4.2 Operating points (summary.md 4.2): two thresholds fixed on validation, read on test: 0.5
# and the screening point, the highest threshold that keeps val recall >= 0.99 and finds more
# val pneumonias than 0.5 (validation is nearly separable: a plain recall rule could land above
# 0.5 and buy nothing). part4_roc_pr.png shows the price: specificity for the last recall.
#
# 4.3 Patterns in the errors (part4_error_analysis.png, most confident first; summary.md 4.3).
# False positives outnumber false negatives, 49-61 against 3-11 for the chosen model over seeds
# 0-7; from validation to test its specificity at 0.5 falls (0.978-0.993 to 0.739-0.791) while
# recall does not (0.954-0.972 to 0.972-0.992): the shift shows as normal films called pneumonia.
# Confident false positives include bright, low-contrast films with grayish lungs, as hazy as the
# true positives (at 28x28 a hazy exposure looks like a diffuse opacity), but also clear lungs.
# True negatives are high-contrast films with dark lungs, and the few false negatives often too.


# ==================== Part 5: interpretability ===============================================
def plot_filters(models, path, cols=16):
    """5.1: the first conv layer's filters of each trained model, a panel of rows per model."""
    weights = {k: (m.features[0][0] if k == "simple_cnn" else m.conv1).weight.detach().cpu()
               [:, 0].numpy() for k, m in models.items()}
    rows = [math.ceil(len(w) / cols) for w in weights.values()]
    fig = plt.figure(figsize=(0.5 * cols, 0.5 * sum(rows) + 0.4 * len(rows)))
    panels = fig.subfigures(len(rows), 1, squeeze=False, height_ratios=rows)[:, 0]
    for panel, (name, w), n_rows in zip(panels, weights.items(), rows):
        axes = panel.subplots(n_rows, cols, squeeze=False, gridspec_kw=dict(wspace=0.3))
        for ax in axes.flat:
            ax.set_axis_off()
        for ax, kernel, limit in zip(axes.flat, w, np.abs(w).max(axis=(1, 2))):
            ax.imshow(kernel, cmap="bwr", vmin=-limit, vmax=limit)
        panel.set_facecolor("0.85")                  # gray, so a filter's white (zero) cells show
        panel.suptitle(f"{MODEL_NAMES[name]}: first conv layer, {len(w)} filters "
                       f"{w.shape[1]}x{w.shape[2]}", fontsize=10, x=0.02, ha="left")
    fig.suptitle("First-layer filters, each on its own symmetric scale ±max|weight|: red "
                 "positive, blue negative, white zero", fontsize=10, y=1.07)
    save_figure(fig, path)


def gradcam_maps(name, model, x, data, classes):
    """5.2: Grad-CAM maps (N, 28, 28) in [0, 1] of classes[i] for image i (class 0 uses the negated
    logit: evidence for the negative class), from the CNN's last ReLU (7x7) or ResNet18's layer2
    (4x4; layer4 is 1x1 at 28x28, a blank map)."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import BinaryClassifierOutputTarget
    layer = model.features[-1][2] if name == "simple_cnn" else model.layer2[-1]
    with GradCAM(model=model, target_layers=[layer]) as cam:
        return cam(input_tensor=standardize(x, data),
                   targets=[BinaryClassifierOutputTarget(int(c)) for c in classes])


def plot_gradcam(trained, data, picks, device, path):
    """5.2: picked test X-rays ({index: outcome}), then per model its Grad-CAM maps in a row."""
    from pytorch_grad_cam.utils.image import show_cam_on_image
    idx = list(picks)
    x, labels = data.x["test"][idx], data.y["test"][idx].numpy().astype(int)
    fig, axes = plt.subplots(len(trained) + 1, len(idx), squeeze=False, layout="constrained",
                             figsize=(2.1 * len(idx) + 0.8, 2.5 * (len(trained) + 1)))
    for ax, img, y, outcome in zip(axes[0], x, labels, picks.values()):
        show_image(ax, img, f"{outcome}\ntrue: {data.class_names[y]}")
    for row, (name, t) in zip(axes[1:], trained.items()):
        probs = t.test_probs[idx]
        preds = (probs >= 0.5).astype(int)
        maps = gradcam_maps(name, t.model, x.to(device), data, preds)
        for ax, img, cam_map, y, p, pred in zip(row, x, maps, labels, probs, preds):
            rgb = np.repeat(img.numpy().transpose(1, 2, 0), 3, axis=2)   # (H, W, 3) in [0, 1]
            ax.imshow(show_cam_on_image(rgb, cam_map, use_rgb=True, image_weight=0.6))
            ax.set_axis_off()
            ax.set_title(f"pred: {data.class_names[pred]}, {p_text(p)}" + (", flat map" if
                         cam_map.max() < 1e-3 else ""), fontsize=8,   # no gradient to show
                         color="black" if pred == y else "tab:red")
        row[0].text(-0.08, 0.5, f"{MODEL_NAMES[name]}\n{'7x7' if name == 'simple_cnn' else '4x4'} "
                    "map, upsampled", transform=row[0].transAxes, rotation=90, ha="right",
                    va="center", fontsize=9)
    fig.colorbar(ScalarMappable(cmap="jet"), ax=axes[1:], shrink=0.8, pad=0.01,
                 label="evidence, scaled per image (0 least, 1 most)")
    fig.suptitle(f"Grad-CAM [3] of the predicted class on test images picked by their outcome for "
                 f"{MODEL_NAMES[next(iter(trained))]} (p = P({data.class_names[1]}); red: wrong)."
                 "\nEach map is scaled on its own: colours compare regions within an image only",
                 fontsize=10)
    save_figure(fig, path)


def part5_interpret(trained, best, data, device, out):
    """Part 5: every network's filters and its Grad-CAM on the chosen model's surest outcomes."""
    networks = {best: trained[best], **{k: t for k, t in trained.items() if t.model is not None}}
    plot_filters({k: t.model for k, t in networks.items()}, out / "part5_filters.png")
    groups = confidence_groups(data.y["test"].numpy(), trained[best].test_probs)
    picks = {i: group for group, n in (("true positive", 2), ("true negative", 2),
                                       ("false positive", 1), ("false negative", 1))
             for i in groups[group][:n]}                  # {test index: outcome}, 6 images
    plot_gradcam(networks, data, picks, device, out / "part5_gradcam.png")


# 5.1 What patterns do the filters detect? (part5_filters.png; each filter on its own colour
# scale: compare shapes, not strengths.) Some of the CNN's 3x3 filters are oriented edge
# detectors (a positive row or column beside a negative one), others blobs or irregular mixes.
# ResNet18's 7x7 filters from scratch look like noise: with a stride-2 stem and BatchNorm after
# them they act as a learned down-sampling. With ImageNet weights a third panel shows the summed
# pretrained ones (3.1): expect oriented edges and blobs; colour-opponent filters largely cancel.
#
# 5.2 Is the model looking at clinically relevant regions? (part5_gradcam.png: maps of the class
# each model predicts, on the chosen model's most confident TP, TN, FP and FN.) Only partly. The
# maps are coarse (7x7 CNN, 4x4 ResNet18): they show which region, never which opacity. Evidence
# on the lung fields is relevant; on the mediastinum, a border or a corner it is a shortcut
# (brightness, exposure, framing). Both appear, in correct predictions too: the models use both.


# ==================== Reflection questions ===================================================
# 1. Clinical deployment: which threshold, and what do false positives and negatives cost?
#    Not 0.5: for screening we fix the sensitivity we need on validation and take the highest
#    threshold that keeps it (the screening point, val recall >= 0.99; summary.md "Reflection
#    1"). Over seeds 0-7 it lies at t = 0.03-0.17 (pos_weight ~0.35 lowers every P(pneumonia))
#    and on test misses 0-3 pneumonias instead of 3-11, at specificity 0.513-0.671 (77-114 false
#    alarms instead of 49-61), below its val specificity: a site must re-choose it on its own data.
#    A miss means delayed antibiotics and possible deterioration, worst in young children; a false
#    alarm costs a second look and trust. We accept lower specificity: a triage aid for a reader.
# 2. Three limitations of MedMNIST (28x28) against clinical chest X-rays: (a) resolution erases
#    the fine findings radiologists use (small consolidations, air bronchograms, line tips);
#    (b) data: one pediatric source (Guangzhou), binary labels without subtype, location or
#    severity; (c) evaluation: 624 test images, no adults, other hospitals or scanners.
# 3. Next steps with full-resolution X-rays and a GPU cluster: 224-512 px, chest-X-ray-pretrained
#    backbones (CheXpert, MIMIC-CXR), stronger plausible augmentation; patient-level splits,
#    external test sites; tuning on validation only; calibration; heatmaps checked by radiologists.


# ==================== The whole run: its numbers into summary.md, Parts 1-5 in order ==========
def training_line(name, r):
    """2.3/3.2: how one model's training ended, and train against val at its restored epoch."""
    if r["status"] != "trained":
        return f"- {MODEL_NAMES[name]}: {r['reason']}."
    h, best = r["history"], r["history"][r["best_epoch"] - 1]
    return (f"- {MODEL_NAMES[name]}: {r['ended']} after epoch {len(h)} of at most "
            f"{r['max_epochs']}; learning rate x0.1 from epoch "
            f"{', '.join(map(str, r['rate_drops'])) or '(none)'}; restored epoch "
            f"{r['best_epoch']} ({best['stage']} stage), the lowest val loss. There train / val "
            f"loss {best['train_loss']:.3f} / {best['val_loss']:.3f}, accuracy "
            f"{best['train_acc']:.3f} / {best['val_acc']:.3f}; the last epoch's val loss is "
            f"{h[-1]['val_loss'] / best['val_loss'] - 1:.0%} above that.")


def finetune_lines(scratch, pre):
    """3.2: how fast the fine-tuned and the from-scratch ResNet18 learned, how good each became."""
    if pre["status"] != "trained":
        return ["Without ImageNet weights there is no fine-tuned model to compare: the answer to "
                "3.2 needs a run with internet (or --pretrained-weights)."]
    k = min(scratch["best_epoch"], pre["best_epoch"])         # an epoch both models reached
    at_k = [min(e["val_loss"] for e in r["history"][:k]) for r in (pre, scratch)]   # best so far
    seconds = [sum(e["seconds"] for e in r["history"][:r["best_epoch"]]) for r in (pre, scratch)]
    d = pre["test_auc_gain_over_scratch"]
    return [f"- How fast: the lowest val loss came at epoch {pre['best_epoch']} fine-tuned, after "
            f"{seconds[0]:.0f} s of training, and at epoch {scratch['best_epoch']} from scratch, "
            f"after {seconds[1]:.0f} s. Up to epoch {k}, the earlier of the two, the lowest val "
            f"loss was {at_k[0]:.3f} fine-tuned against {at_k[1]:.3f} from scratch.",
            f"- How good, at the restored epochs: val loss {pre['val_loss']:.3f} against "
            f"{scratch['val_loss']:.3f}, val AUC {pre['val']['auc']:.4f} against "
            f"{scratch['val']['auc']:.4f}.",
            f"- On test (read once, after training): AUC {pre['test']['auc']:.3f} against "
            f"{scratch['test']['auc']:.3f}; the 95% interval of the paired difference, "
            "{:+.3f} [{:+.3f}, {:+.3f}], {}.".format(d["difference"], *d["ci95"], d["verdict"]),
            f"- Verdict: fine-tuning {'learned' if at_k[0] < at_k[1] else 'was not'} faster "
            f"and ended {'lower' if pre['val_loss'] < scratch['val_loss'] else 'no lower'} in val "
            "loss than training from scratch."]


def evaluation_lines(name, r, points, class_names):
    """4.1-4.3 and reflection 1: the chosen model's test results and its operating points."""
    neg, pos = class_names
    m, val, half, screen = r["test"], r["val"], points["0.5"], points["screening"]
    lines = [f"## 4.1 {MODEL_NAMES[name]} on test at threshold 0.5 (part4_confusion_matrix.png)",
             "", f"{m['tp']} {pos} found, {m['fn']} missed; {m['tn']} {neg} cleared, {m['fp']} "
             f"false alarms; recall {m['recall']:.3f}, precision {m['precision']:.3f} (all "
             "metrics: its row in 3.3).", "",
             "## 4.2 Operating points, each fixed on validation (part4_roc_pr.png)", "",
             f"| point | threshold: rule | val recall / specificity | test recall ({pos} found) | "
             f"test specificity ({neg} cleared) | PPV | NPV | missed {pos} (FN) | false alarms "
             "(FP) |", "|---" * 9 + "|"]
    for k, p in points.items():
        lines.append(f"| {k} | {p['threshold']:.3f}: {p['rule']} | {p['val_recall']:.3f} / "
                     f"{p['val_specificity']:.3f} | {p['recall']:.3f} | {p['specificity']:.3f} | "
                     f"{p['precision']:.3f} | {p['npv']:.3f} | {p['fn']} | {p['fp']} |")
    return lines + [
        "", "## 4.3 Errors (part4_error_analysis.png)", "",
        f"At 0.5: {m['fp']} false positives against {m['fn']} false negatives. From validation "
        f"to test, specificity {val['specificity']:.3f} -> {m['specificity']:.3f}, recall "
        f"{val['recall']:.3f} -> {m['recall']:.3f}.", "",
        "## Reflection 1: the threshold this run would deploy", "",
        f"The screening point is t = {screen['threshold']:.3f} (val recall "
        f"{screen['val_recall']:.3f} against {half['val_recall']:.3f} at 0.5). On test it finds "
        f"{screen['recall']:.1%} of {pos} cases and clears {screen['specificity']:.1%} of {neg} "
        f"films: {screen['fn']} missed against {half['fn']} at 0.5, for {screen['fp']} false "
        f"alarms against {half['fp']}.", ""]


def write_summary(trained, best, table, points, data, cfg, path):
    """outputs/summary.md: what this run measured, a section per question that rests on it."""
    r = {k: t.result for k, t in trained.items()}
    scratch, pre = r["resnet18_scratch"], r["resnet18_pretrained"]
    md = [f"# This run in numbers: {data.name}, seed {cfg.seed}"
          + (" (--quick: a check that every part runs, not a result)" if cfg.quick else ""), "",
          f"Positive class (the finding): **{data.class_names[1]}** (medmnist label "
          f"{data.medmnist_labels[1]}). The comments in hw5_dl.py say how to read these "
          "numbers.", "",
          "## 2.3 Training curves (part2_training_curves.png)", "",
          training_line("simple_cnn", r["simple_cnn"]), "",
          "## 3.2 Fine-tuned against from scratch (part3_training_curves.png)", "",
          training_line("resnet18_scratch", scratch), training_line("resnet18_pretrained", pre),
          "", *finetune_lines(scratch, pre),
          "", "## 3.3 Which model is best (part3_model_comparison.md)", "", table,
          *evaluation_lines(best, r[best], points, data.class_names)]
    path.write_text("\n".join(md), encoding="utf-8")
    return "\n".join(md)


def run(cfg):
    """Parts 1-5 in order; returns the metrics written to metrics.json."""
    start = time.perf_counter()
    device = pick_device(cfg.device)     # every input is checked before anything is written
    print(f"device: {device} (torch {torch.__version__}, {torch.get_num_threads()} CPU threads)")
    data = load_data(cfg)
    imagenet_state, skip_reason = load_imagenet_weights(cfg)
    out = prepare_outputs(cfg.outputs)
    torch.manual_seed(cfg.seed)          # all randomness but the shuffle (its own generator)
    part1_data(data, cfg, out)
    trained = {"simple_cnn": part2_simple_cnn(data, cfg, out, device),
               **part3_resnet18(data, cfg, out, device, imagenet_state, skip_reason)}
    best, table, differences = part3_compare(trained, data, cfg, out)
    points = part4_evaluate(best, trained[best], data, cfg, out)
    part5_interpret(trained, best, data, device, out)
    print(write_summary(trained, best, table, points, data, cfg, out / "summary.md"))
    metrics = dict(dataset=cfg.dataset, positive_class=data.class_names[1], device=str(device),
                   python=sys.version.split()[0], torch=torch.__version__,
                   torchvision=torchvision.__version__, threads=torch.get_num_threads(),
                   data_file=f"{cfg.dataset}.npz", data_md5=data.md5, best_model=best,
                   auc_difference_vs_best=differences, operating_points=points,
                   models={k: t.result for k, t in trained.items()},
                   config={k: v for k, v in asdict(cfg).items()
                           if k not in ("data_dir", "outputs")},
                   total_seconds=round(time.perf_counter() - start, 1))
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, default=float),
                                      encoding="utf-8")
    print(f"wrote {out} in {metrics['total_seconds']:.0f} s")
    return metrics


def main(argv=None):
    """Command-line entry point: bad input prints one paragraph and exits with code 2."""
    for stream in (sys.stdout, sys.stderr):   # a Windows console or redirect may not be UTF-8
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="replace")
    cfg = parse_args(argv)
    try:
        run(cfg)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


# ==================== Plumbing: command line, errors, device, files, display =================
def parse_args(argv=None):
    """The command line as a Config (every flag is a Config field)."""
    d = Config()
    p = argparse.ArgumentParser(description=__doc__,            # usage, times, results
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=d.data_dir, help="folder of the npz (downloaded there "
                   "when missing); default: medmnist's ~/.medmnist")
    p.add_argument("--outputs", default=d.outputs,
                   help="folder for figures and metrics.json (default: %(default)s)")
    p.add_argument("--device", default=d.device, choices=["auto", "cuda", "mps", "cpu"],
                   help="auto (the default) picks CUDA, then Apple MPS, then the CPU")
    p.add_argument("--seed", type=int, default=d.seed, help="default: %(default)s")
    p.add_argument("--pretrained-weights", default=d.pretrained_weights, metavar="PATH",
                   help="torchvision ResNet18 state dict; default: torchvision's download/cache")
    p.add_argument("--dataset", default=d.dataset, choices=FINDING,
                   help="a binary 2D MedMNIST set (default: %(default)s); another needs its "
                   "finding added to FINDING")
    p.add_argument("--quick", action="store_true", help="check every part on 512 images")
    cfg = Config(**vars(p.parse_args(argv)))
    if not 0 <= cfg.seed < 2**32:
        p.error("--seed must be from 0 to 2**32 - 1")
    return replace(cfg, **QUICK) if cfg.quick else cfg


class UserError(Exception):
    """A problem with the user's input or machine: printed as one paragraph, exit code 2."""


def brief(err):
    """An exception's type and the first line of its message, for a one-paragraph error."""
    first_line = (str(err).strip().splitlines() or [""])[0]
    return f"{type(err).__name__}: {first_line[:160]}"


def pick_device(name):
    """Resolve --device: auto prefers CUDA, then Apple MPS, then the CPU; probe it with one op."""
    if name == "auto":
        name = ("cuda" if torch.cuda.is_available() else
                "mps" if torch.backends.mps.is_available() else "cpu")
    try:   # a GPU too new for the installed torch is "available" until its first op fails
        image, kernel = torch.ones(1, 1, 4, 4, device=name), torch.ones(1, 1, 3, 3, device=name)
        F.conv2d(image, kernel).cpu()                    # one small convolution, as models do
    except Exception as err:
        raise UserError(f"--device {name}: torch {torch.__version__} cannot run on this "
                        f"machine's {name.upper()} ({brief(err)}). Install a torch build that "
                        "supports this GPU, or run with --device cpu.") from None
    return torch.device(name)


def prepare_outputs(folder):
    """Create the outputs folder, check it is writable, and drop a previous metrics.json."""
    out = Path(folder)
    try:
        out.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=out).close()            # read-only: fail now, not at the end
        (out / "metrics.json").unlink(missing_ok=True)     # written last: present = run complete
    except OSError as err:
        raise UserError(f"--outputs {out} cannot hold the results ({err.strerror or err}). "
                        "Pass a folder you can write to, or a new path to create.") from None
    return out


def save_figure(fig, path):
    """Write a matplotlib figure as a PNG and close it, freeing its memory."""
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def p_text(p):
    """P(finding) as text that tells confident cases apart: 1-p=3.2e-05 where .2f says 1.00."""
    return f"p={p:.3f}" if 0.005 <= p < 0.995 else f"p={p:.1e}" if p < 0.5 else f"1-p={1 - p:.1e}"


def show_image(ax, img, title=None):
    """Draw one (1, H, W) image in [0, 1] without axes."""
    ax.imshow(np.asarray(img)[0], cmap="gray", vmin=0, vmax=1)
    ax.set_axis_off()
    ax.set_title(title or "", fontsize=8)


if __name__ == "__main__":
    sys.exit(main())
