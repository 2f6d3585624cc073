"""What ResNet18's stem costs at 28x28: training images/s with ours and two alternatives.

    python bench/stems.py [--device cpu] [--repeats 3]     # ~1 minute on 2 CPU cores

hw5_dl.build_resnet18 keeps torchvision's stem, a 7x7 stride-2 conv1 and a stride-2 max-pool
(layer2 4x4, layer4 1x1). Without the max-pool layer4 ends at 2x2; the MedMNIST paper's
CIFAR-style 3x3 stride-1 stem ends at 4x4. Each is timed on random batches (forward and backward,
one warm-up step), the median of --repeats timings kept; the table goes to
bench/results/stems.md with the machine it ran on. Speeds differ between CPUs by about 2x: the
ratios are what carries over.
"""
import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import hw5_dl  # noqa: E402


def machine():
    """One line: CPU model, torch threads, torch and Python versions, system."""
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (f"{cpu}, {torch.get_num_threads()} torch threads, torch {torch.__version__}, "
            f"Python {platform.python_version()}, {platform.system()}")


def synchronize(device):
    """Wait for the work queued on a GPU, so that a timing measures it."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    elif device.type == "mps":
        torch.mps.synchronize()


def variants():
    """The three stems on one ResNet18 body, by name."""
    def stem(conv, pool):
        model = hw5_dl.build_resnet18()
        model.conv1, model.maxpool = conv, pool
        return model
    return {"ours, torchvision's: 7x7/2 conv + max-pool (layer4 1x1)": hw5_dl.build_resnet18(),
            "7x7/2 conv, no max-pool (layer4 2x2)":
                stem(nn.Conv2d(1, 64, 7, 2, 3, bias=False), nn.Identity()),
            "CIFAR / MedMNIST paper: 3x3/1 conv, no max-pool (layer4 4x4)":
                stem(nn.Conv2d(1, 64, 3, 1, 1, bias=False), nn.Identity())}


def images_per_second(model, device, batch=128, steps=4):
    """Training images/s of one model on random 28x28 batches, after one warm-up step."""
    model.to(device).train()
    x = torch.randn(batch, 1, 28, 28, device=device)
    y = torch.rand(batch, 1, device=device)
    for step in range(steps + 1):
        if step == 1:
            synchronize(device)
            start = time.perf_counter()
        F.binary_cross_entropy_with_logits(model(x), y).backward()
    synchronize(device)
    return batch * steps / (time.perf_counter() - start)


def main():
    """Time each stem --repeats times and write the median speeds and their ratios."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    device = hw5_dl.pick_device(args.device)
    speeds = {name: statistics.median(images_per_second(model, device)
                                      for _ in range(args.repeats))
              for name, model in variants().items()}
    ours = next(iter(speeds.values()))
    lines = [f"# ResNet18 stems at 28x28 ({time.strftime('%Y-%m-%d')})", "",
             f"Machine: {machine()}; device {device}.", "",
             f"Command: `python bench/stems.py {' '.join(sys.argv[1:])}`", "",
             "| stem | training images/s | ours is ... times as fast |", "|---|---|---|",
             *(f"| {name} | {v:,.0f} | {ours / v:.2f} |" for name, v in speeds.items())]
    out = Path(__file__).parent / "results" / "stems.md"
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
