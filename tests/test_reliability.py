"""Bad input, the console's encoding, reproducibility: clear messages, exit codes, no debris."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

import hw5_dl as H
from conftest import write_npz

ROOT = Path(__file__).resolve().parents[1]


def run_main(argv, capsys):
    """Run main() and return its exit code and stderr."""
    code = H.main(argv)
    return code, capsys.readouterr().err


def assert_clean_failure(code, err, out_dir, *needles):
    """Exit 2, one 'error:' paragraph naming what to fix, no traceback, no outputs folder."""
    assert code == 2
    message = err.strip().splitlines()[-1]
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
    assert_clean_failure(code, err, out, str(path), "md5", "--data-dir")


def test_missing_data_offline_exits_2_with_message(tmp_path, offline, capsys):
    out = tmp_path / "out"
    code, err = run_main(["--quick", "--data-dir", str(tmp_path / "nodata"), "--outputs",
                          str(out)], capsys)
    assert_clean_failure(code, err, out, "pneumoniamnist.npz", "download failed", "--data-dir",
                         "28209eda62fecd6e6a2d98b1501bb15f")


@pytest.mark.parametrize("dataset", ["pathmnist", "chestmnist", "nodulemnist3d", "nosuchmnist"])
def test_unknown_non_binary_or_3d_datasets_exit_2(dataset, capsys):
    with pytest.raises(SystemExit) as exc:
        H.parse_args(["--dataset", dataset])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "--dataset" in err and "pneumoniamnist" in err
    assert "Traceback" not in err


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
    assert_clean_failure(code, err, out, f"--device {device}", "--device cpu")


def test_gpu_that_torch_cannot_run_exits_2(data_dir, tmp_path, capsys, monkeypatch):
    """is_available() is True on a GPU that the installed torch cannot run: its first op fails."""
    def no_kernel(*args, **kwargs):
        raise RuntimeError("CUDA error: no kernel image is available for execution on the device")

    ones = torch.ones
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch, "ones", lambda *shape, device=None: ones(*shape))   # no driver here
    monkeypatch.setattr(H.F, "conv2d", no_kernel)
    out = tmp_path / "out"
    code, err = run_main(["--data-dir", str(data_dir), "--outputs", str(out)], capsys)   # auto
    assert_clean_failure(code, err, out, "CUDA", "no kernel image", "--device cpu")


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


@pytest.mark.parametrize("argv", [["--seed", "-1"], ["--seed", str(2**32)], ["--seed", "1.5"],
                                  ["--device", "tpu"]])
def test_impossible_arguments_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        H.parse_args(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and argv[0] in err and "Traceback" not in err
    assert H.parse_args(["--seed", str(2**32 - 1)]).seed == 2**32 - 1


def test_run_completes_when_the_console_cannot_encode_unicode(data_dir, resnet18_state_path,
                                                              tmp_path):
    """Windows' redirected output is cp1252: the summary's "≥" and "−" must not end the run."""
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONIOENCODING": "cp1252", "TORCH_HOME": str(tmp_path / "torch")}
    with open(tmp_path / "log.txt", "wb") as log:
        done = subprocess.run([sys.executable, str(ROOT / "hw5_dl.py"), "--quick",
                               "--data-dir", str(data_dir), "--outputs", str(out),
                               "--pretrained-weights", str(resnet18_state_path)],
                              stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp_path)
    log = (tmp_path / "log.txt").read_bytes().decode("cp1252")
    assert done.returncode == 0, log[-2000:]
    assert "Reflection 1" in log and (out / "metrics.json").exists()


def test_same_seed_gives_identical_metrics(data_dir, tmp_path, monkeypatch, offline):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    def metrics(folder):
        assert H.main(["--quick", "--data-dir", str(data_dir), "--device",
                       "cpu", "--outputs", str(folder)]) == 0   # GPUs promise no bit-identity
        return strip(json.loads((folder / "metrics.json").read_text()))

    def strip(value):
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items()
                    if k not in {"total_seconds", "train_seconds", "seconds"}}
        return [strip(v) for v in value] if isinstance(value, list) else value

    assert metrics(tmp_path / "a") == metrics(tmp_path / "b")
