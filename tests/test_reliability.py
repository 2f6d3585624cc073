"""Bad input, divergence, interruption, reproducibility: clear messages, exit codes, no debris."""
import json
import os

import numpy as np
import pytest
import torch
import torchvision

import hw5_dl as H
from conftest import write_npz

TIMING_KEYS = {"total_seconds", "train_seconds", "train_images_per_second"}


def run_main(argv, capsys):
    """Run main() and return its exit code and stderr."""
    code = H.main(argv)
    return code, capsys.readouterr().err


def assert_clean_failure(code, err, out_dir, *needles):
    """Exit 2, one 'error:' paragraph naming what to fix, no traceback, no outputs folder."""
    assert code == 2
    message = err.strip().splitlines()[-1]           # after any md5 warning
    assert message.startswith("error: ") and "Traceback" not in err
    for needle in needles:
        assert needle in message
    assert not out_dir.exists()


def corrupt_npz(folder, how):
    """Write a broken pneumoniamnist.npz into folder, broken in the named way."""
    path = write_npz(folder) / "pneumoniamnist.npz"
    arrays = dict(np.load(path))
    if how == "truncated":
        path.write_bytes(path.read_bytes()[:2000])
        return path
    if how == "not an npz":
        path.write_bytes(b"<html>rate limited</html>" * 40)
        return path
    if how == "wrong keys":
        arrays = {k.replace("images", "x"): v for k, v in arrays.items()}
    elif how == "float images":
        arrays["train_images"] = arrays["train_images"].astype(np.float32)
    elif how == "rgb images":
        arrays["val_images"] = np.repeat(arrays["val_images"][..., None], 3, axis=3)
    elif how == "labels out of range":
        arrays["test_labels"] = arrays["test_labels"] + 1
    elif how == "labels do not match images":
        arrays["train_labels"] = arrays["train_labels"][:10]
    elif how == "one class":
        arrays["train_labels"] = np.ones_like(arrays["train_labels"])
    path.unlink()
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize("how", ["truncated", "not an npz", "wrong keys", "float images",
                                 "rgb images", "labels out of range",
                                 "labels do not match images", "one class"])
def test_bad_npz_exits_2_with_message(how, tmp_path, capsys, offline):
    path = corrupt_npz(tmp_path, how)
    out = tmp_path / "out"
    code, err = run_main(["--quick", "--data-dir", str(tmp_path), "--outputs", str(out)], capsys)
    assert_clean_failure(code, err, out, str(path))


def test_md5_mismatch_warns_and_is_recorded(data_dir, tmp_path, capsys, offline):
    out = tmp_path / "out"
    code, err = run_main(["--quick", "--epochs", "1", "--data-dir", str(data_dir),
                          "--outputs", str(out)], capsys)
    assert code == 0 and "warning:" in err and "md5" in err
    source = json.loads((out / "metrics.json").read_text())["data_file"]
    assert source["md5_ok"] is False
    assert source["md5_expected"] == "28209eda62fecd6e6a2d98b1501bb15f"


@pytest.mark.parametrize("content", ["missing", "not a torch file", "not a state dict",
                                     "wrong architecture"])
def test_bad_pretrained_weights_exit_2(content, data_dir, tmp_path, capsys):
    path = tmp_path / "weights.pth"
    if content == "not a torch file":
        path.write_bytes(b"not a checkpoint" * 10)
    elif content == "not a state dict":
        torch.save([1, 2, 3], path)
    elif content == "wrong architecture":
        torch.save(torchvision.models.resnet34().state_dict(), path)
    out = tmp_path / "out"
    code, err = run_main(["--quick", "--data-dir", str(data_dir), "--outputs", str(out),
                          "--pretrained-weights", str(path)], capsys)
    assert_clean_failure(code, err, out, "--pretrained-weights", str(path))


def test_broken_weights_in_torch_cache_skip_the_pretrained_model(tmp_path, monkeypatch, offline):
    cache = tmp_path / "torch" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(torchvision.models.resnet34().state_dict(), cache / "resnet18-f37072fd.pth")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    state, reason = H.load_imagenet_weights(H.Config())
    assert state is None and reason.startswith("not run: ImageNet weights unavailable")


@pytest.mark.parametrize("device", ["cuda", "mps"])
def test_unavailable_device_exits_2(device, data_dir, tmp_path, capsys):
    if device == "cuda" and torch.cuda.is_available() or \
            device == "mps" and torch.backends.mps.is_available():
        pytest.skip(f"{device} is available here")
    out = tmp_path / "out"
    code, err = run_main(["--device", device, "--data-dir", str(data_dir), "--outputs", str(out)],
                         capsys)
    assert_clean_failure(code, err, out, f"--device {device}")


def test_gpu_that_torch_cannot_run_exits_2(data_dir, tmp_path, capsys, monkeypatch):
    """is_available() is True on a GPU that the installed torch cannot run: its first op fails."""
    def no_kernel(*args, **kwargs):
        raise RuntimeError("CUDA error: no kernel image is available for execution on the device")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(H.F, "conv2d", no_kernel)
    out = tmp_path / "out"
    code, err = run_main(["--data-dir", str(data_dir), "--outputs", str(out)], capsys)   # auto
    assert_clean_failure(code, err, out, "CUDA", "cannot run on it", "--device cpu")


@pytest.mark.parametrize("where", ["a file", "inside a file"])
def test_unusable_outputs_exit_2(where, data_dir, tmp_path, capsys, offline, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    blocker = tmp_path / "blocker"
    blocker.write_text("not a folder")
    out = blocker if where == "a file" else blocker / "outputs"
    code, err = run_main(["--quick", "--data-dir", str(data_dir), "--outputs", str(out)], capsys)
    assert code == 2 and "error: --outputs" in err and "Traceback" not in err
    assert blocker.read_text() == "not a folder"


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root can write anywhere")
def test_read_only_outputs_exit_2(data_dir, tmp_path, capsys, offline, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    out = tmp_path / "locked"
    out.mkdir(mode=0o500)
    code, err = run_main(["--quick", "--data-dir", str(data_dir), "--outputs", str(out)], capsys)
    assert code == 2 and "error: --outputs" in err


@pytest.mark.parametrize("n_images", ["100000", "1"])
def test_impossible_training_subset_exits_2(n_images, data_dir, tmp_path, capsys):
    out = tmp_path / "out"
    code, err = run_main(["--train-images", n_images, "--data-dir", str(data_dir),
                          "--outputs", str(out)], capsys)
    assert_clean_failure(code, err, out, f"--train-images {n_images}")


@pytest.mark.parametrize("argv", [["--epochs", "0"], ["--batch-size", "-1"], ["--epochs", "x"],
                                  ["--train-images", "0"], ["--device", "tpu"], ["--seed", "1.5"]])
def test_impossible_arguments_are_rejected(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        H.parse_args(argv)
    assert exc.value.code == 2 and "Traceback" not in capsys.readouterr().err


def test_nan_loss_stops_that_model_only(data_dir, tmp_path, capsys, monkeypatch, offline):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(H.SimpleCNN, "forward", lambda self, x: self.classifier(
        self.features(x)) * float("nan"))
    out = tmp_path / "out"
    code, err = run_main(["--quick", "--epochs", "1", "--data-dir", str(data_dir),
                          "--outputs", str(out)], capsys)
    assert code == 0 and "Simple CNN: stopped" in err and "nan" in err
    m = json.loads((out / "metrics.json").read_text())
    failed = m["models"]["simple_cnn"]
    assert failed["status"] == "failed" and "nan" in failed["reason"]
    assert m["models"]["resnet18_scratch"]["status"] == "trained"
    assert m["best_model"] == "resnet18_scratch"
    assert "failed:" in (out / "part3_model_comparison.md").read_text()
    assert (out / "part2_training_curves.png").exists()


def test_ctrl_c_exits_130_and_leaves_no_partial_files(data_dir, tmp_path, capsys, monkeypatch,
                                                      offline):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(H, "train_epoch", interrupt)
    out = tmp_path / "out"
    out.mkdir()
    (out / "metrics.json").write_text("{}")           # a previous run's file must not survive
    code, err = run_main(["--quick", "--data-dir", str(data_dir), "--outputs", str(out)], capsys)
    assert code == 130 and err.strip().splitlines()[-1].startswith("interrupted: ")
    names = {p.name for p in out.iterdir()}
    assert "metrics.json" not in names and not any(n.endswith(".tmp") for n in names)
    assert "part1_samples.png" in names                # Part 1 finished before the interrupt


def test_atomic_write_leaves_nothing_when_writing_fails(tmp_path):
    target = tmp_path / "figure.png"

    def half_write(tmp):
        tmp.write_bytes(b"half a png")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        H.write_atomically(target, half_write)
    assert list(tmp_path.iterdir()) == []


def test_same_seed_gives_identical_metrics(data_dir, tmp_path, monkeypatch, offline):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    def metrics(folder):
        assert H.main(["--quick", "--epochs", "1", "--data-dir", str(data_dir), "--device",
                       "cpu", "--outputs", str(folder)]) == 0   # GPUs promise no bit-identity
        return strip(json.loads((folder / "metrics.json").read_text()))

    def strip(value):
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items() if k not in TIMING_KEYS | {"outputs"}}
        return [strip(v) for v in value] if isinstance(value, list) else value

    assert metrics(tmp_path / "a") == metrics(tmp_path / "b")
