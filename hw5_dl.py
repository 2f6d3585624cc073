"""HW5: deep learning for chest X-ray classification on PneumoniaMNIST (28x28, normal vs pneumonia).

One script answers Parts 1-5 of the assignment in order, then the reflection questions; the
discussion answers are comments beside the code that makes their evidence. Every figure and
number goes to outputs/; where a comment quotes a number, it describes the committed run there.

    python hw5_dl.py                    # full run (medmnist downloads the data on first use)
    python hw5_dl.py --data-dir data    # read data/pneumoniamnist.npz, no network needed
    python hw5_dl.py --quick            # every part on 512 images, under a minute on a CPU

Result (bench/results/recipe.md: seeds 0-2 on 2 CPU cores, test split, threshold 0.5): the model
chosen on validation (the Simple CNN in every seed) reaches ACC 0.903 +- 0.006 / AUC 0.966 +-
0.002 in a default run of about 4 minutes; the MedMNIST v2 paper's ResNet-18 (28), with 3-channel
input, a CIFAR-style stem and 100 epochs, reaches 0.854 / 0.944.
Early stopping, the choice of model and every threshold use the validation split; the test split
is predicted once per model, right after its training.
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import sys
import time
from collections import namedtuple
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from matplotlib.cm import ScalarMappable
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from sklearn import metrics as skm
from torch import nn
from torch.utils.data import DataLoader, RandomSampler, TensorDataset
from tqdm import tqdm

MODEL_NAMES = {"simple_cnn": "Simple CNN", "resnet18_scratch": "ResNet18 (from scratch)",
               "resnet18_pretrained": "ResNet18 (pretrained)"}
# The finding is the positive class (label 1 from load_data on), whatever medmnist's number for
# it: label names do not say which class is the disease (BreastMNIST's label 0 is "malignant").
FINDING = {"pneumoniamnist": "pneumonia", "breastmnist": "malignant"}


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
    epochs: int = 0                  # 0 = the per-model maximum below; --epochs N caps every stage
    train_images: int = 0            # 0 = the whole training split; N = a stratified subset
    batch_size: int = 128            # the rubric's suggestion
    # An epoch is one pass over the training split, but at least 36 batches: a small data set
    # (BreastMNIST: 546 images, 4 batches) is passed over several times per epoch, so that the
    # patience and the caps below mean as many updates for it as for PneumoniaMNIST.
    epoch_images: int = 36 * 128
    # Augmentation (training split only): the rubric's three, drawn anew for every image.
    flip_prob: float = 0.5           # rubric item, though clinically questionable (see 1.3)
    max_rotation_deg: float = 10.0   # patients are never perfectly aligned on the detector
    brightness: float = 0.2          # factor in [0.8, 1.2]: exposure differs between machines
    contrast: float = 0.2            # factor in [0.8, 1.2]: so does the window/level
    # Training (2.2), one rule for every model: Adam; the learning rate drops 10x after
    # `drop_after` epochs without a lower validation loss, training stops after `stop_after`
    # such epochs and the best epoch (lowest val loss) is restored. Patience spans several epochs:
    # at the first rate the val loss jumps from epoch to epoch (part2_training_curves.png).
    drop_after: int = 4
    stop_after: int = 8              # leaves 4 epochs at the lower rate to find a new best
    cnn_epochs: int = 40
    cnn_lr: float = 3e-3             # BatchNorm lets it train fast; the rate drops when it stalls
    resnet_epochs: int = 20
    resnet_lr: float = 1e-3          # Adam's default: 11M parameters, no dropout, a lower rate
    head_epochs: int = 2             # fine-tuning stage 1: only the new classifier learns
    head_lr: float = 1e-3
    finetune_epochs: int = 20        # stage 2: everything learns, as long as from scratch
    finetune_lr: float = 3e-4        # ~3x below the from-scratch rate: adjust, don't overwrite
    # Evaluation.
    screening_recall: float = 0.99   # the screening threshold keeps this val recall (4.2)
    thresholds: tuple = (0.1, 0.3, 0.5, 0.7, 0.9)
    bootstrap_resamples: int = 1000  # stratified test resamples for the 95% intervals (3.3)


QUICK = dict(train_images=512, epoch_images=512, cnn_epochs=2, resnet_epochs=1, head_epochs=1,
             finetune_epochs=1, bootstrap_resamples=200)


# ==================== Part 1: data loading and exploration ===================================
@dataclass
class Data:
    """Images (N, 1, 28, 28) in [0, 1], labels (N,) with 1 = the finding, DataLoaders per split."""
    x: dict
    y: dict
    loaders: dict
    class_names: list
    finding_label: int               # medmnist's number for the finding
    name: str                        # medmnist's name, e.g. PneumoniaMNIST
    md5: str

    def __post_init__(self):
        self.mean, self.std = self.x["train"].mean().item(), self.x["train"].std().item()
        n_pos = self.y["train"].sum().item()
        self.pos_weight = (len(self.y["train"]) - n_pos) / n_pos   # n_negative / n_positive


def load_data(cfg):
    """1.1: the three splits through medmnist (downloaded when missing), and their DataLoaders."""
    import medmnist
    info = medmnist.INFO[cfg.dataset]
    root = Path(cfg.data_dir or medmnist.info.DEFAULT_ROOT).expanduser()
    path = root / f"{cfg.dataset}.npz"
    finding = next(int(k) for k, name in info["label"].items() if name == FINDING[cfg.dataset])
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
    if 0 < cfg.train_images < len(y["train"]):   # a stratified subset (--quick, bench/)
        from sklearn.model_selection import train_test_split
        keep, _ = train_test_split(np.arange(len(y["train"])), train_size=cfg.train_images,
                                   stratify=y["train"], random_state=cfg.seed)
        x["train"], y["train"] = x["train"][np.sort(keep)], y["train"][np.sort(keep)]
    sampler = RandomSampler(y["train"], num_samples=max(len(y["train"]), cfg.epoch_images),
                            generator=torch.Generator().manual_seed(cfg.seed))
    loaders = {split: DataLoader(TensorDataset(x[split], y[split]), cfg.batch_size,
                                 sampler=sampler if split == "train" else None,
                                 drop_last=split == "train")   # a batch of 1 breaks BatchNorm
               for split in x}
    return Data(x, y, loaders, [info["label"][str(1 - finding)], FINDING[cfg.dataset]], finding,
                info["python_class"], md5)


def augment(x, cfg):
    """1.3: random flip, rotation, brightness and contrast, drawn anew for every image in x
    (torchvision's v2 transforms would draw one set of parameters for a whole batch tensor)."""
    n = len(x)
    uniform = lambda: 2 * torch.rand(n, 1, 1, 1, device=x.device) - 1   # noqa: E731 (-1 to 1)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = ((x - mean) * (1 + cfg.contrast * uniform()) + mean) * (1 + cfg.brightness * uniform())
    angle = torch.deg2rad(cfg.max_rotation_deg * uniform().view(n))
    flip = torch.where(torch.rand(n, device=x.device) < cfg.flip_prob, -1.0, 1.0)
    cos, sin, zero = angle.cos(), angle.sin(), torch.zeros_like(angle)
    theta = torch.stack([torch.stack([cos * flip, -sin, zero], 1),
                         torch.stack([sin * flip, cos, zero], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    # Reflection fills the corners a rotation uncovers with nearby anatomy; zeros would paint
    # black triangles that no real film has (and a network could learn to key on).
    return F.grid_sample(x.clamp(0, 1), grid, padding_mode="reflection", align_corners=False)


def standardize(x, data):
    """Zero mean and unit variance with the training split's statistics."""
    return (x - data.mean) / data.std


def plot_samples(data, path, per_class=8):
    """1.2: a row of training images per class."""
    fig = Figure(figsize=(per_class * 1.1, 2.6))
    for label, row in enumerate(fig.subplots(2, per_class)):
        for ax, i in zip(row, torch.nonzero(data.y["train"] == label)[:per_class, 0]):
            show_image(ax, data.x["train"][i])
        medmnist_label = data.finding_label if label else 1 - data.finding_label
        row[0].set_title(f"{data.class_names[label]} ({'positive' if label else 'negative'} "
                         f"class; medmnist label {medmnist_label})", fontsize=9, loc="left")
    fig.suptitle(f"{data.name} training samples per class")
    save_figure(fig, path)


def plot_class_distribution(data, path):
    """1.2: class counts per split as grouped bars, each labelled with its count and share."""
    fig = Figure(figsize=(7, 3.6))
    ax = fig.subplots()
    splits = ["train", "val", "test"]
    for label, name in enumerate(data.class_names):
        counts = [int((data.y[s] == label).sum()) for s in splits]
        bars = ax.bar(np.arange(3) + (label - 0.5) * 0.38, counts, 0.38, label=name)
        ax.bar_label(bars, [f"{c}\n{c / len(data.y[s]):.0%}" for c, s in zip(counts, splits)],
                     fontsize=8)
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
    fig = Figure(figsize=(1.4 * (draws + 1) + 0.6, 3 * per_class))
    for i, row in enumerate(fig.subplots(2 * per_class, draws + 1)):
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
    print(f"positive class (the finding): {data.class_names[1]} (medmnist label "
          f"{data.finding_label}); negative: {data.class_names[0]}")
    for split, y in data.y.items():
        print(f"{split}: {len(y)} images, {y.mean().item():.1%} {data.class_names[1]}")
    plot_samples(data, out / "part1_samples.png")
    plot_class_distribution(data, out / "part1_class_distribution.png")
    plot_augmentation(data, cfg, out / "part1_augmentation.png")


# 1.2 Discussion: how might the class imbalance affect training?
# About 74% of training images show pneumonia (part1_class_distribution.png). An unweighted loss
# is dominated by that class: always answering "pneumonia" already gives ~74% training accuracy,
# and the errors concentrate on the minority class (normal lungs called pneumonia). Accuracy
# hides this, and its baseline moves between splits (test is 62.5% pneumonia), so we report AUC,
# precision, recall, specificity and F1 beside it. The loss weights the positive class by
# n_normal / n_pneumonia (pos_weight ~0.35), so both classes carry equal total weight while every
# image is kept (undersampling would throw images away).
#
# 1.3 Discussion: why is augmentation important for medical imaging?
# Labelled medical images are few (4,708 here) and a CNN memorises them quickly; augmentation
# shows it the variation it will meet anyway (patient positioning -> small rotations; exposure
# and scanner settings -> brightness and contrast), so it learns the disease, not the pixels.
# Augmentations must keep the label and the anatomy plausible. The rubric's horizontal flip is
# clinically questionable (the heart on the right is very rare, and side markers move); we keep
# it (p=0.5) because pneumonia can sit in either lung and at 28x28 the heart is a weak cue.
# Large rotations, crops that cut off a lung, elastic warps or inverted intensities would create
# anatomy or physics that does not exist, as would a rotation's black corners (ours reflects).


# ==================== Part 2: a simple CNN ===================================================
class SimpleCNN(nn.Module):
    """2.1: three conv blocks (conv 3x3 -> BatchNorm -> ReLU -> 2x2 max-pool) and two FC layers.

    - 3x3 kernels with padding 1 keep the size until each pool: 28 -> 14 -> 7 -> 3.
    - Channels double per block (32, 64, 128) as the resolution halves: similar cost per block,
      more room for the more abstract patterns of later blocks.
    - Three blocks see most of a lung; a fourth would pool 3x3 to 1x1. BatchNorm (beyond the
      rubric's minimum) allows a high learning rate and fewer epochs.
    - FC 1152 -> 128 -> 1 with dropout 0.3 before each against memorising 4,708 images; one
      output logit with BCE-with-logits is the natural binary head.
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


# One phase of training: its name, at most how many epochs, the learning rate, and whether only
# the classifier head learns (fine-tuning stage 1).
Stage = namedtuple("Stage", "name epochs lr head_only", defaults=[False])


def set_trainable(model, head_only):
    """3.2: freeze everything but the final classifier (head_only) or unfreeze everything."""
    for name, p in model.named_parameters():
        p.requires_grad = not head_only or name.startswith("fc.")


@torch.no_grad()
def predict(model, loader, data, device):
    """Logits and labels of a whole loader, in its order, as CPU tensors."""
    model.eval()
    logits, labels = zip(*[(model(standardize(x.to(device), data)).squeeze(1).cpu(), y)
                           for x, y in loader])
    return torch.cat(logits), torch.cat(labels)


def train_epoch(model, data, cfg, criterion, optimizer, device):
    """2.2: one epoch on augmented training batches; mean loss and accuracy."""
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


def fit(model, data, cfg, stage, history, name, device):
    """2.2: train one stage by the rule in Config, restore its best epoch; that epoch's number."""
    # Class imbalance (1.2): weighting positives by n_negative / n_positive balances the classes.
    criterion = nn.BCEWithLogitsLoss(pos_weight=torch.tensor(data.pos_weight, device=device))
    set_trainable(model, stage.head_only)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], stage.lr)
    # ReduceLROnPlateau drops the rate on the first epoch past `patience` without improvement.
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=0.1,
                                                           patience=cfg.drop_after - 1)
    stopper = EarlyStopping(cfg.stop_after)
    for _ in tqdm(range(min(stage.epochs, cfg.epochs or stage.epochs)), f"{name} {stage.name}",
                  leave=False, disable=not sys.stderr.isatty()):
        row = dict(epoch=len(history) + 1, stage=stage.name, lr=optimizer.param_groups[0]["lr"])
        row["train_loss"], row["train_acc"] = train_epoch(model, data, cfg, criterion, optimizer,
                                                          device)
        logits, labels = predict(model, data.loaders["val"], data, device)
        row.update(val_loss=criterion(logits.to(device), labels.to(device)).item(),
                   val_acc=((logits > 0) == (labels == 1)).float().mean().item(),
                   val_auc=skm.roc_auc_score(labels, logits))
        history.append(row)
        print(f"  {name} epoch {row['epoch']:2d} ({stage.name}, lr {row['lr']:.0e}): train loss "
              "{train_loss:.3f} acc {train_acc:.3f} | val loss {val_loss:.3f} acc {val_acc:.3f} "
              "auc {val_auc:.4f}".format(**row))
        scheduler.step(row["val_loss"])
        if stopper.step(row["val_loss"], model, row["epoch"]):
            break
    model.load_state_dict(stopper.best_state)
    return stopper.best_epoch


def plot_training_curves(results, path, title):
    """2.3/3.2: train vs val loss and accuracy per model, the schedule's events marked."""
    trained = {k: r for k, r in results.items() if r["status"] == "trained"}
    fig = Figure(figsize=(13.5, 3.4 * len(trained) + 0.6), layout="constrained")
    for row, (name, r) in zip(fig.subplots(len(trained), 2, squeeze=False), trained.items()):
        h = r["history"]
        for ax, (metric, what) in zip(row, (("loss", "weighted BCE loss"), ("acc", "accuracy"))):
            for split in ("train", "val"):
                ax.plot([e["epoch"] for e in h], [e[f"{split}_{metric}"] for e in h], "o-", ms=3,
                        label="train (augmented, training mode)" if split == "train" else "val")
            for prev, e in zip(h, h[1:]):
                if prev["stage"] != e["stage"]:
                    ax.axvline(e["epoch"] - 0.5, color="tab:red", ls=":", label="stage 2 "
                               f"({e['stage']}) from here")
                elif e["lr"] < prev["lr"]:
                    ax.axvline(e["epoch"] - 0.5, color="tab:purple", ls="-.", lw=1,
                               label="learning rate x0.1")
            ax.axvline(r["best_epoch"], color="gray", ls="--", label=f"restored: epoch "
                       f"{r['best_epoch']}")
            ax.axvline(len(h) + 0.5, color="black", label=f"{r['ended']} after epoch {len(h)}")
            ax.set(xlabel="epoch", ylabel=what, title=f"{MODEL_NAMES[name]}: {what}",
                   xlim=(0.5, len(h) + 1), yscale="log" if metric == "loss" else "linear")
            ax.xaxis.get_major_locator().set_params(integer=True)
            ax.grid(alpha=0.3)
        labels = dict(zip(*reversed(ax.get_legend_handles_labels())))   # one entry per label
        ax.legend(labels.values(), labels, fontsize=8, loc="center left", bbox_to_anchor=(1, 0.5))
    fig.suptitle(title)
    fig.supxlabel("\n".join(f"No curves for {MODEL_NAMES[k]}: {r['reason']}".replace("; ", ";\n")
                            for k, r in results.items() if k not in trained), fontsize=9)
    save_figure(fig, path)


# A model's outcome: its metrics.json entry, and the network and its predictions if it trained.
Trained = namedtuple("Trained", "result model val_probs test_probs", defaults=[None] * 3)


def train_model(name, build, stages, data, cfg, device):
    """Build a model from the run's seed, train it stage by stage, predict val and test (once)."""
    torch.manual_seed(cfg.seed)      # every model starts from the same seed, whatever ran before
    model = build().to(device)
    params = sum(p.numel() for p in model.parameters())
    print(f"{MODEL_NAMES[name]}: {params:,} parameters")
    history, start = [], time.perf_counter()
    for stage in stages:
        best_epoch = fit(model, data, cfg, stage, history, MODEL_NAMES[name], device)
    seconds = time.perf_counter() - start
    set_trainable(model, head_only=False)        # Grad-CAM needs gradients everywhere
    val_logits, val_labels = predict(model, data.loaders["val"], data, device)
    test_logits, test_labels = predict(model, data.loaders["test"], data, device)  # the one read
    val_probs, test_probs = val_logits.sigmoid().numpy(), test_logits.sigmoid().numpy()
    max_epochs = sum(min(s.epochs, cfg.epochs or s.epochs) for s in stages)
    images = len(history) * len(data.loaders["train"]) * cfg.batch_size
    r = dict(status="trained", params=params,
             epochs_trained=len(history), max_epochs=max_epochs, best_epoch=best_epoch,
             ended="stopped early" if len(history) < max_epochs else "cap reached",
             val_loss=history[best_epoch - 1]["val_loss"], train_seconds=round(seconds, 1),
             train_images_per_second=round(images / seconds, 1),
             val=binary_metrics(val_labels.numpy(), val_probs),
             test=binary_metrics(test_labels.numpy(), test_probs), history=history)
    print(f"{MODEL_NAMES[name]}: {r['ended']} after {len(history)}/{max_epochs} epochs, restored "
          f"{best_epoch}; val AUC {r['val']['auc']:.4f}; test acc {r['test']['accuracy']:.4f} AUC "
          f"{r['test']['auc']:.4f} ({seconds:.0f} s, {images / seconds:.0f} images/s)")
    return Trained(r, model, val_probs, test_probs)


def part2_simple_cnn(data, cfg, out, device):
    """Part 2: train the Simple CNN with early stopping and plot its training curves."""
    # channels_last speeds up the CNN's CPU epochs; on Apple MPS it has given silently wrong
    # weight updates (a known PyTorch bug), so GPUs keep the default layout.
    layout = torch.channels_last if device.type == "cpu" else torch.contiguous_format
    cnn = train_model("simple_cnn", lambda: SimpleCNN().to(memory_format=layout),
                      [Stage("train", cfg.cnn_epochs, cfg.cnn_lr)], data, cfg, device)
    plot_training_curves({"simple_cnn": cnn.result}, out / "part2_training_curves.png",
                         "Part 2.3: Simple CNN training curves")
    return cnn


# 2.3 Discussion: is the model overfitting, and how can you tell? Overfitting shows as a
# validation loss that turns upward while the training loss keeps falling, with a widening
# train/val accuracy gap. part2_training_curves.png marks each rate drop, the restored epoch
# (lowest val loss) and the early stop. In outputs/ the val loss jumps at the first rate but
# follows the training loss down; from the rate drop (epoch 17) on it is steady, and 8 epochs
# without a new low after epoch 21 end training. At the restored epoch train/val loss are
# 0.036/0.032, accuracy 0.969/0.975: no overfitting (augmentation and dropout regularise). The
# large gap is between validation (~0.97 accuracy) and test (~0.90): the test split comes from
# another source split of the original data, a dataset shift rather than overfitting, and
# nothing is tuned on it. Validation, split off the source's training images (perhaps with
# films of the same patients on both sides), is optimistic too.


# ==================== Part 3: transfer learning with ResNet18 ================================
def gray_conv1(conv):
    """3.1: a 1-channel conv whose filters sum the RGB ones: its response to a gray image equals
    the RGB conv's to the R=G=B copy, which the pretrained BatchNorm after it expects."""
    gray = nn.Conv2d(1, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, bias=False)
    gray.weight.data = conv.weight.data.sum(dim=1, keepdim=True)
    return gray


def build_resnet18(state_dict=None):
    """3.1: torchvision's ResNet18 for 1x28x28 input and one output logit.

    Its stem (7x7 stride-2 conv, stride-2 max-pool) leaves 7x7 for layer1, 4x4 for layer2 (read
    by Grad-CAM) and 1x1 after layer4 at 28x28. We keep it: pretrained weights fit it, and it
    trains about twice as fast as without the max-pool (bench/results/stems.md), which lets
    ResNet18 train past its rate drop and its best epoch within the run's few minutes.
    """
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
                      "resnet18-f37072fd.pth in torchvision's cache ($TORCH_HOME/hub/checkpoints,"
                      " by default ~/.cache/torch/hub/checkpoints) or pass --pretrained-weights "
                      "PATH")


def part3_resnet18(data, cfg, out, device, imagenet_state, skip_reason):
    """Parts 3.1-3.2: ResNet18 from scratch, and fine-tuned from ImageNet when weights are here."""
    trained = {"resnet18_scratch": train_model(
        "resnet18_scratch", build_resnet18, [Stage("train", cfg.resnet_epochs, cfg.resnet_lr)],
        data, cfg, device)}
    if imagenet_state is None:
        print(f"ResNet18 (pretrained): {skip_reason}")
        trained["resnet18_pretrained"] = Trained(dict(status="skipped", reason=skip_reason))
    else:
        trained["resnet18_pretrained"] = train_model(
            "resnet18_pretrained", lambda: build_resnet18(imagenet_state),
            [Stage("frozen", cfg.head_epochs, cfg.head_lr, head_only=True),
             Stage("unfrozen", cfg.finetune_epochs, cfg.finetune_lr)], data, cfg, device)
    plot_training_curves({k: t.result for k, t in trained.items()},
                         out / "part3_training_curves.png", "Part 3: ResNet18 training curves")
    return trained


def bootstrap(labels, probs, n_resamples, seed):
    """3.3: AUC, accuracy, recall, specificity (at 0.5) on stratified resamples of the test split
    (each class resampled with replacement, keeping its count; the same for every model)."""
    rng = np.random.default_rng(seed)
    hit = (probs >= 0.5) == labels
    draws = {"auc": [], "accuracy": [], "recall": [], "specificity": []}
    for _ in range(n_resamples):
        idx = np.concatenate([rng.choice(np.flatnonzero(labels == c), (labels == c).sum())
                              for c in (0, 1)])
        draws["auc"].append(skm.roc_auc_score(labels[idx], probs[idx]))
        draws["accuracy"].append(hit[idx].mean())
        draws["recall"].append(hit[idx][labels[idx] == 1].mean())
        draws["specificity"].append(hit[idx][labels[idx] == 0].mean())
    return {k: np.array(v) for k, v in draws.items()}


def part3_compare(trained, data, cfg, out):
    """Part 3.3: choose the model for Parts 4-5 on validation, then compare all on test."""
    results = {k: t.result for k, t in trained.items()}
    scored = {k: t for k, t in trained.items() if t.model is not None}
    # The highest val AUC to three decimals wins (validation is near-saturated: smaller gaps are
    # noise), a tie goes to the lower val loss. The test split has no say.
    best = max(scored, key=lambda k: (round(results[k]["val"]["auc"], 3),
                                      -results[k]["val_loss"]))
    labels, ci95 = data.y["test"].numpy(), lambda v: np.percentile(v, [2.5, 97.5]).tolist()
    draws = {k: bootstrap(labels, t.test_probs, cfg.bootstrap_resamples, cfg.seed)
             for k, t in scored.items()}
    rows = ["| Model | Test Accuracy | Test AUC | Precision | Recall | Specificity | F1 | Val AUC "
            "/ loss | Params | Train time |", "|---" * 10 + "|"]
    for name, r in results.items():
        if name not in draws:
            rows.append(f"| {MODEL_NAMES[name]} | not run (below) |" + " |" * 8)
            continue
        r["test_ci95"] = {k: ci95(v) for k, v in draws[name].items()}
        cells = [f"{r['test'][k]:.3f}" + (" [{:.3f}–{:.3f}]".format(*r["test_ci95"][k])
                                          if k in r["test_ci95"] else "")
                 for k in ("accuracy", "auc", "precision", "recall", "specificity", "f1")]
        rows.append(f"| {MODEL_NAMES[name]} | {' | '.join(cells)} | {r['val']['auc']:.4f} / "
                    f"{r['val_loss']:.4f} | {r['params'] / 1e6:.2f}M | {r['train_seconds']:.0f} s "
                    f"({r['epochs_trained']}/{r['max_epochs']} epochs) |")
    # Paired: AUC(best) - AUC(other) on the same resamples, so the split's luck cancels out.
    differences = {k: dict(difference=float(d.mean()), ci95=ci95(d))
                   for k, d in ((k, draws[best]["auc"] - v["auc"]) for k, v in draws.items())
                   if k != best}
    notes = [f"Test split, threshold 0.5, positive class {data.class_names[1]}; [stratified "
             f"bootstrap 95% interval, {cfg.bootstrap_resamples:,} resamples]. Chosen on "
             f"validation for Parts 4-5 (highest val AUC to 3 decimals, then lower val loss): "
             f"**{MODEL_NAMES[best]}**."]
    notes += ["AUC({}) − AUC({}) on the same test resamples: {:+.3f} [{:+.3f}, {:+.3f}]".format(
        MODEL_NAMES[best], MODEL_NAMES[k], d["difference"], *d["ci95"])
        for k, d in differences.items()] + [f"{MODEL_NAMES[k]}: {r['reason']}"
                                            for k, r in results.items() if k not in draws]
    md = "\n".join(rows + [""] + [f"- {note}" for note in notes]) + "\n"
    (out / "part3_model_comparison.md").write_text(md, encoding="utf-8")
    print(md)
    return best, differences


# 3.1 Discussion: why might ImageNet pretrained weights help for medical images?
# X-rays are not photos, but an ImageNet network's early layers are generic (edges, blobs,
# gradients, textures at several scales), and lung fields, rib edges and opacities are made of
# them. From there the network needs fewer labelled images and epochs to learn the task's later
# layers, and overfits less than 11M random parameters on 4,708 images. The gain shrinks far
# from ImageNet's domain and at 28x28, below the scale those filters were learned at.
#
# 3.2 Fine-tuning strategy: stage 1 freezes the backbone and trains only the new head, so its
# random weights cannot send large, noisy gradients into the pretrained features (BatchNorm
# stays in training mode: its running statistics move to X-rays' while its weights stay fixed).
# Stage 2 unfreezes everything at a ~3x lower rate, so the features are adjusted rather than
# overwritten, under the same rule and cap as from scratch; each stage restores its best epoch.
# The run in outputs/ had no ImageNet weights (no internet where it was made): its pretrained
# row says "not run", nothing stands in for it (summary.md 3.2 compares the two when the weights
# are there). Published, not this run: at 28x28, MedMNIST+ (Doerrich et al., 2024)
# reports ImageNet-pretrained ResNet18 at test ACC / AUC 0.831 / 0.950, MedMNIST v2 (Yang et
# al., Scientific Data 2023) ResNet-18 from scratch at 0.854 / 0.944 (3-channel input).
#
# 3.3 Which model performs best, and why?
# Validation alone chooses (part3_compare; table and choice in part3_model_comparison.md). The
# Simple CNN and ResNet18 from scratch end level on validation (val AUC 0.998 and 0.997 in the
# run in outputs/) and the rule takes the CNN, as in all three seeds of bench/results/recipe.md.
# On test ResNet18 ranks slightly better (AUC 0.969 against 0.965, but the paired 95% interval
# of the difference contains 0) and the CNN is more accurate at 0.5 (0.909 against 0.894); over
# seeds 0-2: CNN 0.903 / 0.966, ResNet18 0.900 / 0.971. Neither is clearly best: at 28x28 there
# is little fine structure for ResNet18's 11M parameters (46x the CNN's) to exploit, and the
# limit on test is the shift between source splits, which capacity does not fix. The CNN gets
# there in about 30% of ResNet18's training time (part3_model_comparison.md).


# ==================== Part 4: evaluation of the best model ===================================
def binary_metrics(labels, probs, threshold=0.5):
    """4.1: accuracy, precision (PPV), recall (sensitivity), specificity, NPV and F1 at a
    threshold, and the threshold-free AUC, AP and Brier score; label 1 (the finding) is positive."""
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
                brier=skm.brier_score_loss(labels, probs),
                tp=int(tp), tn=int(tn), fp=int(fp), fn=int(fn))


def screening_threshold(val_labels, val_probs, min_recall):
    """4.2: the highest threshold whose val recall is >= min_recall and above that of 0.5 (at
    most 0.5 when 0.5 finds every val positive): a screening point must buy sensitivity."""
    _, tpr, thresholds = skm.roc_curve(val_labels, val_probs, drop_intermediate=False)
    at_half = (val_probs[val_labels == 1] >= 0.5).mean()
    # np.nextafter(r, 2): the smallest number above r, i.e. strictly more recall than 0.5 gives
    need = min_recall if at_half == 1 else max(min_recall, np.nextafter(at_half, 2))
    return float(min(thresholds[np.argmax(tpr >= need)], 0.5 if at_half == 1 else 1.0))


def youden_threshold(val_labels, val_probs):
    """4.2: the threshold maximising Youden's J (sensitivity + specificity - 1) on validation."""
    fpr, tpr, thresholds = skm.roc_curve(val_labels, val_probs, drop_intermediate=False)
    return float(min(thresholds[np.argmax(tpr - fpr)], 1.0))


def operating_points(val_labels, val_probs, test_labels, test_probs, cfg):
    """4.2: three thresholds, each fixed on validation by its rule, then read on test."""
    rules = {"0.5": (0.5, "the default"),
             "max Youden J": (youden_threshold(val_labels, val_probs),
                              "max sensitivity + specificity - 1 on val"),
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
    fig = Figure(figsize=(4.8, 5), layout="constrained")
    ax = fig.subplots()
    skm.ConfusionMatrixDisplay.from_predictions(labels, (probs >= 0.5).astype(int), ax=ax,
                                                display_labels=class_names, cmap="Blues",
                                                colorbar=False)
    ax.set_title(title, fontsize=10)
    fig.supxlabel(f"positive class {class_names[1]}: accuracy {m['accuracy']:.3f}, precision "
                  f"{m['precision']:.3f}, recall {m['recall']:.3f}\nspecificity "
                  f"{m['specificity']:.3f}, F1 {m['f1']:.3f}, AUC {m['auc']:.3f} "
                  "(threshold-free)", fontsize=9)
    save_figure(fig, path)


def plot_roc_pr(labels, probs, points, class_names, path, title):
    """4.2: ROC and PR curves, whole (top) and zoomed on the marked operating points (bottom)."""
    neg, pos = class_names
    fig = Figure(figsize=(11, 10), layout="constrained")
    axes = fig.subplots(2, 2)
    kinds = {"ROC curve": (skm.RocCurveDisplay, lambda m: (1 - m["specificity"], m["recall"]),
                           f"AUC = {skm.roc_auc_score(labels, probs):.3f}",
                           f"false positive rate: {neg} called {pos} (1 − specificity)",
                           f"true positive rate: {pos} found (recall)"),
             "Precision-recall curve": (
                 skm.PrecisionRecallDisplay, lambda m: (m["recall"], m["precision"]),
                 f"AP = {skm.average_precision_score(labels, probs):.3f}",
                 f"recall: {pos} found (sensitivity)", f"precision: {pos} calls right (PPV)")}
    for col, (kind, (display, xy, score, xlabel, ylabel)) in zip(axes.T, kinds.items()):
        marks = {name: xy(binary_metrics(labels, probs, t)) for name, t in points.items()}
        for ax, what in zip(col, ("whole curve", "zoom on the dashed box")):
            display.from_predictions(labels, probs, ax=ax, plot_chance_level=True)
            ax.lines[0].set_label(f"test ({score})")      # sklearn would round to 2 decimals
            for i, (name, (x, y)) in enumerate(marks.items()):
                fixed = not name.startswith("t=")    # fixed on validation: hollow, on top
                ax.plot(x, y, "osD^vPX*"[i], ms=10 if fixed else 7, color=f"C{i + 1}",
                        mfc="none" if fixed else None, mew=2, zorder=4 if fixed else 3,
                        label=name, clip_on=what != "whole curve")
            ax.set(xlabel=xlabel, ylabel=ylabel, title=f"{kind}: {what}")
            ax.grid(alpha=0.3)
        box = np.array([marks[k] for k in marks if k == "t=0.5" or not k.startswith("t=")])
        (x0, y0), (x1, y1) = np.clip([box.min(0) - 0.04, box.max(0) + 0.04], -0.01, 1.01)
        col[1].set(xlim=(x0, x1), ylim=(y0, y1), aspect="auto")
        col[0].add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, ls="--"))
        col[0].legend(*[h[:2] for h in col[0].get_legend_handles_labels()], fontsize=8)
        col[1].get_legend().remove()
    handles, names = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles[2:], names[2:], loc="outside lower center", ncols=4, fontsize=9,
               title="operating points: threshold t; hollow = fixed on validation")
    fig.suptitle(title)
    save_figure(fig, path)


def plot_calibration(labels, probs, class_names, path, title):
    """4.2: reliability diagram (10 equal-width bins) with the Brier score, and the histograms."""
    from sklearn.calibration import CalibrationDisplay
    fig = Figure(figsize=(10, 4.2), layout="constrained")
    ax_rel, ax_hist = fig.subplots(1, 2)
    CalibrationDisplay.from_predictions(labels, probs, n_bins=10, ax=ax_rel, name=f"test (Brier "
                                        f"{skm.brier_score_loss(labels, probs):.3f})")
    ax_rel.set(xlabel=f"mean predicted P({class_names[1]}) in the bin",
               ylabel=f"fraction of the bin truly {class_names[1]}")
    ax_rel.set_title("Reliability diagram (10 equal-width bins;\nthe middle ones hold few "
                     "images, see the histogram)", fontsize=10)
    ax_rel.legend(loc="upper left")
    for label, name in enumerate(class_names):
        ax_hist.hist(probs[labels == label], bins=20, range=(0, 1), histtype="step", lw=2,
                     label=f"true {name}")
    ax_hist.set(yscale="log", xlabel=f"predicted P({class_names[1]})",
                ylabel="test images (log)", title="Predicted probabilities by true class")
    ax_hist.legend()
    fig.suptitle(title)
    save_figure(fig, path)


OUTCOMES = {"true positive": (1, 1), "true negative": (0, 0),     # (true label, prediction)
            "false positive": (0, 1), "false negative": (1, 0)}


def confidence_groups(labels, probs):
    """4.3: test indices of TP, TN, FP and FN at 0.5, each from most to least confident."""
    pred = (probs >= 0.5).astype(int)
    confidence = np.where(pred, probs, 1 - probs)
    return {k: [i for i in np.argsort(-confidence, kind="stable")
                if labels[i] == truth and pred[i] == called]
            for k, (truth, called) in OUTCOMES.items()}


def plot_error_analysis(images, labels, probs, class_names, path, title, per_group=6):
    """4.3: the most confident TP, TN, FP and FN test images with their P(positive class)."""
    fig = Figure(figsize=(1.5 * per_group, 6.6))
    for row, (group, idx) in zip(fig.subplots(4, per_group), confidence_groups(labels,
                                                                               probs).items()):
        for ax, i in zip(row, idx):
            show_image(ax, images[i], f"p={probs[i]:.2f}")
        for ax in row:
            ax.set_axis_off()
        truth, called = (class_names[k] for k in OUTCOMES[group])
        row[0].text(-0.15, 0.5, f"{group} (n={len(idx)}):\n{truth}\ncalled {called}",
                    transform=row[0].transAxes, ha="right", va="center", fontsize=9)
    fig.suptitle(title)
    save_figure(fig, path)


def part4_evaluate(best, chosen, data, cfg, out):
    """Part 4: the chosen model on test: confusion matrix, ROC/PR, errors, calibration, points."""
    val_labels, test_labels = data.y["val"].numpy(), data.y["test"].numpy()
    probs, names = chosen.test_probs, data.class_names
    points = operating_points(val_labels, chosen.val_probs, test_labels, probs, cfg)
    marks = {**{f"t={t:g}": t for t in cfg.thresholds},
             **{f"{k}: t={p['threshold']:.3f}": p["threshold"] for k, p in points.items()
                if k != "0.5"}}
    title = f"{MODEL_NAMES[best]} (chosen on validation), test split"
    plot_confusion_matrix(test_labels, probs, names, out / "part4_confusion_matrix.png",
                          f"{title}\nthreshold 0.5")
    plot_roc_pr(test_labels, probs, marks, names, out / "part4_roc_pr.png", title)
    plot_error_analysis(data.x["test"], test_labels, probs, names,
                        out / "part4_error_analysis.png", f"{title}: most confident cases per "
                        f"outcome at threshold 0.5, p = P({names[1]})")
    plot_calibration(test_labels, probs, names, out / "part4_calibration.png", title)
    return points


# 4.1 Which metric matters most for pneumonia screening? Recall (sensitivity): a missed pneumonia
# goes home untreated, a false alarm costs a second read or a follow-up film. Calling everyone
# sick games recall, so it is read with specificity (or precision) and the threshold-free AUC:
# screening fixes a recall target on validation and reports the specificity left (4.2).
#
# 4.2 Operating points and calibration. Three thresholds are fixed on validation, then read on
# test (summary.md 4.2; part4_roc_pr.png marks them and zooms in): 0.5; the maximum of Youden's
# J; and the screening point, the highest threshold that keeps val recall >= 0.99 and finds more
# val pneumonias than 0.5 does (validation is nearly separable: a plain recall rule could land
# above 0.5 and buy no sensitivity). part4_calibration.png: most probabilities sit in the outer
# bins, some normal films among them at P(pneumonia) > 0.95 (over-confidence), and the
# reliability curve runs below the diagonal: on test the model over-states pneumonia (the Brier
# score sums both). Deployment would recalibrate (Platt or isotonic) on local data.
#
# 4.3 Patterns in the errors (part4_error_analysis.png, most confident first; counts in
# part4_confusion_matrix.png), in the run in outputs/. Most errors are false positives (49
# against 8): from validation to test, specificity at 0.5 falls from 1.000 to 0.791 while recall
# does not (0.967, 0.979), so the shift between source splits shows as normal films called
# pneumonia. Three of the six most confident false positives (p = 1.00) are bright, low-contrast
# films with uniformly gray lungs, like the true positives above them: at 28x28 a hazy exposure
# looks like a diffuse opacity; the other three show clear lungs, no cause visible at this size.
# The true negatives are high-contrast films with dark, aerated lungs. Four of the six false
# negatives shown (p = 0.14-0.34) have dark, clear lungs; at 0.40 a lighter, hazier film, at
# 0.45 one of low contrast. The screening point finds all 8.


# ==================== Part 5: interpretability ===============================================
def plot_filters(models, path, cols=16):
    """5.1: the first conv layer's filters of each trained model, one band of rows per model."""
    weights = {k: (m.features[0][0] if k == "simple_cnn" else m.conv1).weight.detach().cpu()
               [:, 0].numpy() for k, m in models.items()}
    rows = [math.ceil(len(w) / cols) for w in weights.values()]
    fig = Figure(figsize=(0.55 * cols, 0.6 * sum(rows) + 0.45 * len(rows) + 0.4),
                 layout="constrained")
    for band, n_rows, (name, w) in zip(fig.subfigures(len(weights), 1, squeeze=False,
                                                      height_ratios=rows)[:, 0],
                                       rows, weights.items()):
        axes = band.subplots(n_rows, cols, squeeze=False).flat
        for ax, k in zip(axes, w):
            ax.imshow(k, cmap="bwr", vmin=-np.abs(k).max(), vmax=np.abs(k).max())
        for ax in band.axes:
            ax.set_axis_off()
        band.suptitle(f"{MODEL_NAMES[name]}: first conv layer, {len(w)} filters "
                      f"{w.shape[1]}x{w.shape[2]}",
                      fontsize=10)
    fig.suptitle("First-layer filters, each on its own symmetric scale ±max|weight|: "
                 "red positive, blue negative, white zero", fontsize=10)
    save_figure(fig, path)


def gradcam_maps(name, model, x, data, classes):
    """5.2: Grad-CAM maps (N, 28, 28) in [0, 1] of classes[i] for image i, from the CNN's last
    ReLU (7x7) or ResNet18's layer2 (4x4; layer4 is 1x1 at 28x28)."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import BinaryClassifierOutputTarget
    layer = model.features[-1][2] if name == "simple_cnn" else model.layer2[-1]
    with GradCAM(model=model, target_layers=[layer]) as cam:
        return cam(input_tensor=standardize(x, data),
                   targets=[BinaryClassifierOutputTarget(int(c)) for c in classes])


def plot_gradcam(trained, data, idx, outcomes, device, path):
    """5.2: six test X-rays, then per model a row of Grad-CAM maps of the class it predicts."""
    from pytorch_grad_cam.utils.image import show_cam_on_image
    x, labels = data.x["test"][idx], data.y["test"][idx].numpy().astype(int)
    fig = Figure(figsize=(2.1 * len(idx) + 0.8, 2.5 * (len(trained) + 1)), layout="constrained")
    axes = fig.subplots(len(trained) + 1, len(idx), squeeze=False)
    for ax, img, y, outcome in zip(axes[0], x, labels, outcomes):
        show_image(ax, img, f"{outcome} for {MODEL_NAMES[next(iter(trained))]}\n"
                            f"true: {data.class_names[y]}")
    for row, (name, t) in zip(axes[1:], trained.items()):
        probs = t.test_probs[idx]
        preds = (probs >= 0.5).astype(int)
        maps = gradcam_maps(name, t.model, x.to(device), data, preds)
        for ax, img, cam_map, y, p, pred in zip(row, x, maps, labels, probs, preds):
            ax.imshow(show_cam_on_image(as_rgb(img), cam_map, use_rgb=True, image_weight=0.6))
            ax.set_axis_off()
            blank = "\nblank: no evidence for it" if cam_map.max() == 0 else ""
            ax.set_title(f"pred: {data.class_names[pred]}, p={p:.2f}{blank}", fontsize=8,
                         color="black" if pred == y else "tab:red")
        row[0].text(-0.08, 0.5, MODEL_NAMES[name], transform=row[0].transAxes, rotation=90,
                    ha="right", va="center", fontsize=9)
    fig.colorbar(ScalarMappable(cmap="jet"), ax=axes[1:], shrink=0.8, pad=0.01,
                 label="evidence, scaled per image (0 least, 1 most)")
    fig.suptitle(f"Grad-CAM of the predicted class on test images (p = P({data.class_names[1]}), "
                 "red title: wrong prediction).\nEach map is min-max scaled on its own: colours "
                 "compare regions within an image, not across images", fontsize=10)
    save_figure(fig, path)


def part5_interpret(trained, best, data, device, out):
    """Part 5: filters of every network; Grad-CAM on the chosen model's 2 most confident TP and
    TN and its most confident FP and FN."""
    networks = {best: trained[best], **{k: t for k, t in trained.items() if t.model is not None}}
    plot_filters({k: t.model for k, t in networks.items()}, out / "part5_filters.png")
    groups = confidence_groups(data.y["test"].numpy(), trained[best].test_probs)
    picks = [(i, group) for group, n in (("true positive", 2), ("true negative", 2),
                                         ("false positive", 1), ("false negative", 1))
             for i in groups[group][:n]]
    plot_gradcam(networks, data, [i for i, _ in picks], [g for _, g in picks], device,
                 out / "part5_gradcam.png")


# 5.1 What patterns do the filters detect? (part5_filters.png; each filter on its own colour
# scale: compare shapes, not strengths.) A few of the CNN's 3x3 filters resemble oriented edge
# detectors, a positive row or column beside a negative one; others are blobs or uniform
# brightness, most are irregular mixes: 3x3 leaves little room.
# ResNet18's 7x7 filters from scratch look like noise: with a stride-2 stem and BatchNorm after
# it, on 4,708 images of 28x28, they act as a learned down-sampling, not clean edge detectors.
# With ImageNet weights a third band would show the pretrained filters (not in this run).
#
# 5.2 Is the model looking at clinically relevant regions? (part5_gradcam.png; each map explains
# the class that model predicts.) Partly, in the run in outputs/:
# - True positives: the CNN's pneumonia evidence is a blob centred on the mediastinum (the heart
#   shadow), not on the lung fields: at 7x7 it reads the central brightness, not an opacity.
# - True negatives: the CNN's "normal" evidence lies on the dark, aerated upper lung zones, but
#   in one film its strongest spot is the bottom-right corner, outside the body: a shortcut.
# - ResNet18's layer2 maps (4x4) show one spot low, right of centre, in five of the six films,
#   whichever class they explain: a fixed position, not anatomy, so they say little.
# - False positive (normal called pneumonia, p = 1.00): the CNN lights the same central region
#   as for its true positives (4.3: hazy exposure looks like diffuse opacity).
# - False negative (pneumonia called normal, p = 0.14): no opacity is visible at 28x28; the CNN's
#   "normal" evidence is the upper lung zones and the right edge.
# At 28x28 a 7x7 or 4x4 map localises only coarsely: a sanity check that exposes shortcuts
# (image edges, overall brightness, fixed positions), not proof of clinical validity.


# ==================== Reflection questions ===================================================
# 1. Clinical deployment: which threshold, and what do false positives and negatives cost?
#    Not 0.5 by default. For screening we fix the sensitivity we need on validation and take
#    the highest threshold that keeps it (the screening point: val recall >= 0.99, more than 0.5
#    gives; summary.md has this run's). In outputs/: t = 0.077, test sensitivity 1.000 and
#    specificity 0.538, no missed pneumonia instead of 8 for 108 false alarms instead of 49. The
#    threshold is low because probabilities crowd near 0 and 1 (4.2) and pos_weight ~0.35 lowers
#    P(pneumonia) for every film. Its specificity is lower on test than on validation: normal
#    films shift between source splits, so it must be re-chosen on the deploying site's data.
#    A false negative is a missed pneumonia: delayed antibiotics and possible deterioration,
#    most dangerous in young children. A false positive costs a radiologist's second look,
#    perhaps unneeded antibiotics or a repeat film, and erodes trust if frequent. A missed case
#    costs far more, so we accept lower specificity: the model is a triage aid that prioritises
#    films for a human reader, not a replacement for one.
# 2. Three limitations of MedMNIST (28x28) compared with clinical chest X-rays:
#    (a) resolution: 28x28 erases the fine findings radiologists use (small consolidations, air
#    bronchograms, line tips); (b) data: one pediatric source (Guangzhou), binary labels without
#    subtype (bacterial/viral), location or severity, no patient metadata or prior films;
#    (c) evaluation: a small test split (624), splits not guaranteed patient-disjoint, and no
#    adults, other hospitals or scanners: numbers need intervals and external validation.
# 3. Next steps with full-resolution X-rays and a GPU cluster: train at 224-512 px from
#    ImageNet- or, better, chest-X-ray-pretrained backbones (CheXpert/MIMIC-CXR) with stronger
#    but plausible augmentation; patient-level splits, cross-validation and external test sites;
#    a hyperparameter search on validation only; calibrated probabilities with intervals;
#    ensembles; heatmaps checked by radiologists or against lung segmentations (shortcuts).


# ==================== The whole run ==========================================================
def write_summary(results, best, points, data, cfg, path):
    """outputs/summary.md: the run's numbers behind the 3.2, 4.2 and reflection 1 answers."""
    neg, pos = data.class_names
    half, screen = points["0.5"], points["screening"]
    scratch, pre = results["resnet18_scratch"], results["resnet18_pretrained"]
    md = [f"# This run in numbers: {data.name}, seed {cfg.seed}"
          + (" (--quick: a check that every part runs, not a result)" if cfg.quick else ""), "",
          f"Positive class (the finding): **{pos}** (medmnist label {data.finding_label}). Test "
          "metrics of every model and the choice of model: part3_model_comparison.md.", "",
          "## 3.2 Pretrained against from scratch", "",
          "Pretrained minus from-scratch ResNet18 on test: {:+.3f} accuracy, {:+.3f} AUC.".format(
              *(pre["test"][k] - scratch["test"][k] for k in ("accuracy", "auc")))
          if pre["status"] == scratch["status"] == "trained" else
          f"No comparison in this run: ResNet18 (pretrained) {pre['reason']}.", "",
          f"## 4.2 Operating points of {MODEL_NAMES[best]}, each fixed on validation "
          "(part4_roc_pr.png)", "",
          f"| point | threshold: rule | val recall / specificity | test recall ({pos} found) | "
          f"test specificity ({neg} cleared) | PPV | NPV | missed {pos} (FN) | false alarms "
          f"(FP) |", "|---" * 9 + "|"]
    md += [f"| {k} | {m['threshold']:.3f}: {m['rule']} | {m['val_recall']:.3f} / "
           f"{m['val_specificity']:.3f} | {m['recall']:.3f} | {m['specificity']:.3f} | "
           f"{m['precision']:.3f} | {m['npv']:.3f} | {m['fn']} | {m['fp']} |"
           for k, m in points.items()]
    md += ["", "## Reflection 1: the threshold this run would deploy", "",
           f"The screening point is t = {screen['threshold']:.3f} (val recall "
           f"{screen['val_recall']:.3f} against {half['val_recall']:.3f} at 0.5). On test it "
           f"finds {screen['recall']:.1%} of {pos} cases and clears {screen['specificity']:.1%} "
           f"of {neg} films: {screen['fn']} missed against {half['fn']} at 0.5, for "
           f"{screen['fp']} false alarms against {half['fp']}.", ""]
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
    best, differences = part3_compare(trained, data, cfg, out)
    points = part4_evaluate(best, trained[best], data, cfg, out)
    part5_interpret(trained, best, data, device, out)
    results = {k: t.result for k, t in trained.items()}
    print(write_summary(results, best, points, data, cfg, out / "summary.md"))

    metrics = dict(dataset=cfg.dataset, positive_class=data.class_names[1], device=str(device),
                   python=sys.version.split()[0], torch=torch.__version__,
                   torchvision=torchvision.__version__, threads=torch.get_num_threads(),
                   data_file=f"{cfg.dataset}.npz", data_md5=data.md5, best_model=best,
                   auc_difference_vs_best=differences, operating_points=points, models=results,
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
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data-dir", default=d.data_dir, help="folder of the npz, downloaded there "
                   "when missing (medmnist's root); default: ~/.medmnist")
    p.add_argument("--outputs", default=d.outputs, help="folder for figures and metrics.json")
    p.add_argument("--device", default=d.device, choices=["auto", "cuda", "mps", "cpu"],
                   help="auto picks CUDA, then Apple MPS, then the CPU")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--epochs", type=int, default=d.epochs, help="cap on every model's epochs")
    p.add_argument("--pretrained-weights", default=d.pretrained_weights, metavar="PATH",
                   help="torchvision ResNet18 state dict; default: torchvision's download/cache")
    p.add_argument("--dataset", default=d.dataset, choices=FINDING,
                   help="a binary 2D MedMNIST set; another needs its finding added to FINDING")
    p.add_argument("--quick", action="store_true", help="check every part on 512 images")
    args = p.parse_args(argv)
    if not 0 <= args.seed < 2**32 or args.epochs < 0:
        p.error("--seed must be from 0 to 2**32 - 1 and --epochs 0 or more")
    return Config(**vars(args), **(QUICK if args.quick else {}))


class UserError(Exception):
    """A problem with the user's input or machine: printed as one paragraph, exit code 2."""


def brief(err):
    """An exception as one short line, for a one-paragraph message."""
    return f"{type(err).__name__}: {' '.join(str(err).split()).split('!')[0][:160]}"


def pick_device(name):
    """Resolve --device: auto prefers CUDA, then Apple MPS, then the CPU; probe it with one op."""
    if name == "auto":
        name = ("cuda" if torch.cuda.is_available() else
                "mps" if torch.backends.mps.is_available() else "cpu")
    try:   # a GPU too new for the installed torch is "available" until its first op fails
        probe = torch.ones(1, 1, 4, 4, device=name)
        F.conv2d(probe, probe[..., :3, :3]).cpu()
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
        (out / "metrics.json").write_text("")    # fails now, not after training, if read-only
        (out / "metrics.json").unlink()          # written last: present = the run completed
    except OSError as err:
        raise UserError(f"--outputs {out} cannot hold the results ({err.strerror or err}). "
                        "Pass a folder you can write to, or a new path to create.") from None
    return out


def save_figure(fig, path):
    """Write a matplotlib figure as a PNG."""
    fig.savefig(path, dpi=120, bbox_inches="tight")


def as_rgb(img):
    """A (1, H, W) image in [0, 1] as float32 (H, W, 3), as show_cam_on_image wants it."""
    return np.repeat(np.asarray(img, dtype=np.float32)[0, :, :, None], 3, axis=2)


def show_image(ax, img, title=None):
    """Draw one (1, H, W) image in [0, 1] without axes."""
    ax.imshow(np.asarray(img)[0], cmap="gray", vmin=0, vmax=1)
    ax.set_axis_off()
    if title:
        ax.set_title(title, fontsize=8)


if __name__ == "__main__":
    sys.exit(main())
