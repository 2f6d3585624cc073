"""Shared fixtures: a small synthetic PneumoniaMNIST in medmnist's npz format, and fake weights."""
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SPLIT_SIZES = {"train": 256, "val": 96, "test": 96}
FINDING_LABEL = {"pneumoniamnist": 1, "breastmnist": 0}   # medmnist's number for the finding


def synthetic_split(n, rng, finding_label=1, size=28):
    """Noisy gray 'chest' images; the finding (~70%) adds a bright blob in one lung."""
    finding = rng.random(n) < 0.7
    labels = np.where(finding, finding_label, 1 - finding_label).astype(np.uint8)
    yy, xx = np.mgrid[:size, :size] / size
    images = 0.45 + 0.1 * rng.standard_normal((n, size, size))
    for img, sick in zip(images, finding):
        if sick:
            cx, cy = rng.choice([0.3, 0.7]), rng.uniform(0.35, 0.65)
            img += 0.35 * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / 0.02)
    return (np.clip(images, 0, 1) * 255).astype(np.uint8), labels[:, None]


def write_npz(folder, name="pneumoniamnist", seed=0):
    """Write medmnist's {name}.npz with its keys, shapes, dtypes and labels."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, n in SPLIT_SIZES.items():
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = synthetic_split(
            n, rng, FINDING_LABEL[name])
    np.savez_compressed(Path(folder) / f"{name}.npz", **arrays)
    return Path(folder)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """A folder holding a synthetic pneumoniamnist.npz."""
    return write_npz(tmp_path_factory.mktemp("medmnist"))


@pytest.fixture(scope="session")
def resnet18_state_path(tmp_path_factory):
    """A randomly initialised torchvision ResNet18 state dict standing in for ImageNet weights."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "resnet18-f37072fd.pth"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    return path


@pytest.fixture
def offline(monkeypatch):
    """Make every download fail as it does without network, whatever this machine can reach."""
    import urllib.error

    def refuse(*args, **kwargs):
        raise urllib.error.URLError("offline (test)")

    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    monkeypatch.setattr(torchvision.datasets.utils, "download_url", refuse)
