"""Offline tests of hw5_dl on synthetic data written in medmnist's npz format."""
import json
import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch
import torchvision
from sklearn import metrics as skm
from torch import nn

import hw5_dl as H

OUTPUT_FILES = ["part1_samples.png", "part1_class_distribution.png", "part1_augmentation.png",
                "part2_training_curves.png", "part3_training_curves.png",
                "part3_model_comparison.png", "part3_model_comparison.md",
                "part4_confusion_matrix.png", "part4_roc_pr.png", "part4_error_analysis.png",
                "part4_calibration.png",
                "part5_filters.png", "part5_gradcam.png", "summary.md", "metrics.json"]


@pytest.fixture(scope="module")
def data(data_dir):
    """The synthetic splits loaded through medmnist, as the script loads the real ones."""
    return H.load_data(H.Config(data_dir=str(data_dir), batch_size=64), torch.device("cpu"))


def test_loads_through_medmnist_from_local_root(data, data_dir):
    import medmnist
    ds = medmnist.PneumoniaMNIST(split="val", root=str(data_dir))
    assert data.x["val"].shape == (len(ds.imgs), 1, 28, 28)
    assert data.y["val"].shape == (len(ds.imgs),)                    # (N, 1) squeezed
    assert torch.equal(data.y["val"], torch.from_numpy(ds.labels[:, 0]).float())
    assert 0 <= data.x["train"].min() and data.x["train"].max() <= 1
    assert data.class_names == ["normal", "pneumonia"]
    n_pos = data.y["train"].sum().item()
    assert data.pos_weight == pytest.approx((len(data.y["train"]) - n_pos) / n_pos)
    xb, yb = next(iter(data.loaders["train"]))
    assert xb.shape == (64, 1, 28, 28) and yb.shape == (64,)
    assert sum(len(y) for _, y in data.loaders["test"]) == len(data.y["test"])


def test_augmentation_draws_differ_per_image_and_stay_in_range(data):
    torch.manual_seed(0)
    same = data.x["train"][:1].repeat(16, 1, 1, 1)
    out = H.augment(same, H.Config())
    assert out.shape == same.shape
    assert out.min() >= 0 and out.max() <= 1
    flat = out.flatten(1)
    distances = torch.cdist(flat, flat)[~torch.eye(16, dtype=bool)]
    assert distances.min() > 1e-3                 # every pair of draws differs


def test_augmentation_identity_when_disabled(data):
    cfg = H.Config(flip_prob=0, max_rotation_deg=0, brightness=0, contrast=0)
    x = data.x["train"][:8]
    assert torch.allclose(H.augment(x, cfg), x, atol=1e-5)


def test_model_output_shapes():
    x = torch.rand(4, 1, 28, 28)
    assert H.SimpleCNN()(x).shape == (4, 1)
    assert H.build_resnet18().eval()(x).shape == (4, 1)
    n_conv = sum(isinstance(m, nn.Conv2d) for m in H.SimpleCNN().modules())
    n_fc = sum(isinstance(m, nn.Linear) for m in H.SimpleCNN().modules())
    assert 2 <= n_conv <= 3 and 1 <= n_fc <= 2   # the rubric's architecture


def test_trained_cnn_is_channels_last_on_the_cpu_only_and_computes_the_same():
    torch.manual_seed(0)
    reference = H.SimpleCNN().eval()
    model = H.simple_cnn(1, 28, torch.device("cpu")).eval()
    model.load_state_dict(reference.state_dict())
    assert model.features[1][0].weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.rand(4, 1, 28, 28)
    assert torch.allclose(model(x), reference(x), atol=1e-5)
    for device in ("cuda", "mps"):          # built on the CPU, moved to the GPU by train_model
        weights = H.simple_cnn(1, 28, torch.device(device)).features[1][0].weight
        assert weights.is_contiguous() and not weights.is_contiguous(
            memory_format=torch.channels_last)


@pytest.mark.parametrize("size", H.SIZES)
def test_cnn_pools_its_last_map_into_equal_windows(size):
    model = H.SimpleCNN(1, size)
    last = model.features(torch.rand(1, 1, size, size)).shape[-1]
    grid = model.classifier[0].output_size
    assert last % grid == 0 and (size > 28 or grid == last == 3)
    assert model(torch.rand(2, 1, size, size)).shape == (2, 1)


def test_loader_slices_batches_from_one_seeded_permutation_per_epoch():
    x, y = torch.rand(300, 1, 4, 4), torch.arange(300).float()
    loader = H.make_loader(x, y, 128, shuffle=True, seed=3)
    generator = torch.Generator().manual_seed(3)
    for _ in range(2):                               # RandomSampler's order, drop_last
        batches = list(loader)
        assert len(batches) == len(loader) == 2
        assert torch.equal(torch.cat([b for _, b in batches]).long(),
                           torch.randperm(300, generator=generator)[:256])
    assert torch.equal(torch.cat([b for _, b in H.make_loader(x, y, 128, False)]), y)


def test_loader_never_indexes_with_a_host_built_list():
    """Indexing device tensors with a Python list copies it to the device at every batch."""
    from torch.overrides import TorchFunctionMode
    indices = []

    class RecordIndexing(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func is torch.Tensor.__getitem__:
                indices.append(args[1])
            return func(*args, **(kwargs or {}))

    x, y = torch.rand(300, 1, 4, 4), torch.rand(300)
    with RecordIndexing():
        for shuffle in (True, False):
            list(H.make_loader(x, y, 128, shuffle))
    assert indices and all(isinstance(i, (torch.Tensor, slice)) for i in indices)


def test_gray_conv1_matches_rgb_copy():
    torch.manual_seed(0)
    rgb = torchvision.models.resnet18().conv1
    gray = torch.rand(2, 1, 28, 28)
    assert torch.allclose(H.gray_conv1(rgb)(gray), rgb(gray.repeat(1, 3, 1, 1)), atol=1e-5)


def test_pretrained_weights_are_loaded(resnet18_state_path):
    state, reason = H.load_imagenet_weights(H.Config(pretrained_weights=str(resnet18_state_path)))
    assert reason is None
    model = H.build_resnet18(state)
    assert torch.equal(model.layer1[0].conv1.weight, state["layer1.0.conv1.weight"])
    assert torch.equal(model.conv1.weight, state["conv1.weight"].sum(1, keepdim=True))


def test_freezing_leaves_only_classifier_trainable():
    model = H.build_resnet18()
    H.set_trainable(model, head_only=True)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"fc.weight", "fc.bias"}
    H.set_trainable(model, head_only=False)
    assert all(p.requires_grad for p in model.parameters())


def test_early_stopping_stops_and_restores_best_weights():
    model = nn.Linear(2, 1)
    stopper = H.EarlyStopping(patience=2, min_delta=1e-4)
    stopped_at = None
    for epoch, loss in enumerate([1.0, 0.5, 0.7, 0.6, 0.4], 1):
        with torch.no_grad():
            model.weight.fill_(epoch)                 # the weights of epoch k are all k
        if stopper.step(loss, model, epoch):
            stopped_at = epoch
            break
    assert stopped_at == 4 and stopper.best_epoch == 2
    stopper.restore(model)
    assert torch.all(model.weight == 2)


def test_fit_restores_weights_of_best_validation_epoch(data):
    torch.manual_seed(0)
    model = H.SimpleCNN()
    cfg = H.Config(plateau_steps=4)                                   # 4 steps an epoch
    history = []
    planned, best = H.fit(model, data, cfg, H.Stage("train", 16, 3e-3), history, "test")
    assert planned == 4 and 1 <= len(history) <= 4
    logits, labels = H.predict_logits(model, data.loaders["val"], data)
    best_row = history[best - 1]
    assert min(h["val_loss"] for h in history) == best_row["val_loss"]
    weighted_bce = nn.BCEWithLogitsLoss(pos_weight=torch.tensor(data.pos_weight))
    assert weighted_bce(logits, labels).item() == pytest.approx(best_row["val_loss"], abs=1e-5)
    assert best_row["val_auc"] > 0.8                 # the synthetic signal is learnable


def test_metrics_equal_sklearn():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 200)
    probs = np.clip(labels * 0.3 + rng.random(200) * 0.7, 0, 1)
    m = H.binary_metrics(labels, probs, 0.5)
    pred = probs >= 0.5
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(labels, pred))
    assert m["precision"] == pytest.approx(skm.precision_score(labels, pred))
    assert m["recall"] == pytest.approx(skm.recall_score(labels, pred))
    assert m["specificity"] == pytest.approx(skm.recall_score(labels, pred, pos_label=0))
    assert m["f1"] == pytest.approx(skm.f1_score(labels, pred))
    assert m["auc"] == pytest.approx(skm.roc_auc_score(labels, probs))
    assert m["ap"] == pytest.approx(skm.average_precision_score(labels, probs))
    assert m["npv"] == pytest.approx(skm.precision_score(labels, pred, pos_label=0))
    assert m["brier"] == pytest.approx(skm.brier_score_loss(labels, probs))
    assert m["tp"] + m["fn"] == labels.sum()


def test_screening_threshold_reaches_recall_on_validation():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, 300)
    probs = np.clip(labels * 0.4 + rng.random(300) * 0.6, 0, 1)
    t = H.screening_threshold(labels, probs, 0.95)
    assert skm.recall_score(labels, probs >= t) >= 0.95
    higher = probs[probs > t].min()                  # the next threshold up misses the target
    assert skm.recall_score(labels, probs >= higher) < 0.95


def test_screening_threshold_buys_recall_when_half_already_meets_the_target():
    labels = np.array([0] * 50 + [1] * 100)
    probs = np.r_[np.linspace(0.0, 0.45, 50), [0.3, 0.4], np.linspace(0.55, 1.0, 98)]
    assert skm.recall_score(labels, probs >= 0.5) == 0.98       # 0.5 keeps 0.95 already
    t = H.screening_threshold(labels, probs, 0.95)
    assert t < 0.5 and skm.recall_score(labels, probs >= t) > 0.98
    assert t == 0.4                                             # one more positive, no further
    everyone = np.r_[np.linspace(0.0, 0.45, 50), np.linspace(0.7, 1.0, 100)]
    assert H.screening_threshold(labels, everyone, 0.95) <= 0.5  # 0.5 finds all: not above it


def test_gradcam_map_is_not_constant(data):
    torch.manual_seed(0)
    for name, model in [("simple_cnn", H.SimpleCNN()), ("resnet18_scratch", H.build_resnet18())]:
        H.fit(model, data, H.Config(), H.Stage("train", 8, 3e-3), [], name)
        maps = H.gradcam_maps(name, model, data.x["test"][:4], data)
        assert maps.shape == (4, 28, 28)
        assert max(m.std() for m in maps) > 0.01, name
        normal = H.gradcam_maps(name, model, data.x["test"][:4], data, classes=[0] * 4)
        assert not np.allclose(maps, normal), name       # each class has its own evidence


def test_main_quick_writes_every_output(data_dir, resnet18_state_path, tmp_path, monkeypatch):
    torch_home = tmp_path / "torch"                   # where torchvision's cache looks
    (torch_home / "hub" / "checkpoints").mkdir(parents=True)
    shutil.copy(resnet18_state_path, torch_home / "hub" / "checkpoints")
    monkeypatch.setenv("TORCH_HOME", str(torch_home))
    out = tmp_path / "out"
    argv = ["--quick", "--data-dir", str(data_dir), "--outputs", str(out), "--device", "cpu"]
    assert H.main(argv) == 0
    for name in OUTPUT_FILES:
        assert (out / name).stat().st_size > 0, name
    m = json.loads((out / "metrics.json").read_text())
    assert m["dataset"] == "pneumoniamnist" and m["size"] == 28 and m["quick"] is True
    assert m["positive_class"] == "pneumonia"
    assert m["device"] == "cpu" and m["seed"] == 0 and m["total_seconds"] > 0
    assert m["best_model"] in m["models"]
    assert m["selection"]["leader"] in m["selection"]["tied"] and m["best_model"] in \
        m["selection"]["tied"]
    for name in ("simple_cnn", "resnet18_scratch", "resnet18_pretrained"):
        r = m["models"][name]
        assert r["status"] == "trained" and r["params"] > 0 and r["epochs_trained"] >= 1
        assert r["train_seconds"] > 0 and set(r["val"]) >= {"accuracy", "auc"}
        assert 1 <= r["best_epoch"] <= r["epochs_trained"] <= r["max_epochs"]
        assert r["stopped_early"] == (r["epochs_trained"] < r["max_epochs"])
        assert r["val_loss"] == r["history"][r["best_epoch"] - 1]["val_loss"]
        assert all(h["lr"] > 0 for h in r["history"]) and r["train_images_per_second"] > 0
        assert set(r["test"]) >= {"accuracy", "auc", "precision", "recall", "specificity",
                                  "f1", "ap"}
    stages = [h["stage"] for h in m["models"]["resnet18_pretrained"]["history"]]
    assert stages[0] == "frozen" and stages[-1] == "unfrozen"        # stage 1, then stage 2
    assert stages == sorted(stages)
    for r in m["models"].values():
        for key in ("auc", "accuracy", "recall", "specificity"):
            low, high = r["test_ci95"][key]
            assert 0 <= low <= high <= 1
    assert set(m["auc_difference_vs_best"]) == set(m["models"]) - {m["best_model"]}
    assert len(m["operating_points"]) == 3
    for op in m["operating_points"].values():
        assert {"threshold", "rule", "val_recall", "recall", "specificity", "precision", "npv",
                "fn"} <= set(op)
    half, screening = m["operating_points"]["0.5"], m["operating_points"]["screening"]
    assert screening["threshold"] <= 0.5
    assert screening["val_recall"] > half["val_recall"] or half["val_recall"] == 1
    summary = (out / "summary.md").read_text()
    assert f"t = {screening['threshold']:.3f}" in summary and "smoke run" in summary
    assert "ResNet18 (pretrained)" in (out / "part3_model_comparison.md").read_text()


def test_main_offline_skips_pretrained_with_reason(data_dir, tmp_path, monkeypatch, offline):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_torch_home"))
    out = tmp_path / "out"
    argv = ["--quick", "--epochs", "1", "--data-dir", str(data_dir), "--outputs", str(out)]
    assert H.main(argv) == 0
    m = json.loads((out / "metrics.json").read_text())
    skipped = m["models"]["resnet18_pretrained"]
    assert skipped["status"] == "skipped" and skipped["reason"].startswith("not run:")
    assert m["best_model"] != "resnet18_pretrained"
    assert "not run:" in (out / "part3_model_comparison.md").read_text()
    assert all((out / name).exists() for name in OUTPUT_FILES)


def test_missing_data_offline_exits_2_with_message(tmp_path, offline, capsys):
    code = H.main(["--quick", "--data-dir", str(tmp_path / "nodata"),
                   "--outputs", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2
    assert "pneumoniamnist.npz" in err and "--data-dir" in err and "Traceback" not in err
    assert not (tmp_path / "out" / "metrics.json").exists()


def test_unavailable_device_is_a_clear_error(tmp_path, data_dir, capsys):
    missing = "cuda" if not torch.cuda.is_available() else "mps"
    if missing == "mps" and torch.backends.mps.is_available():
        pytest.skip("both CUDA and MPS are available here")
    code = H.main(["--device", missing, "--data-dir", str(data_dir), "--outputs", str(tmp_path)])
    assert code == 2 and f"--device {missing}" in capsys.readouterr().err


def test_impossible_numbers_are_rejected_by_argparse(capsys):
    for argv in (["--epochs", "0"], ["--batch-size", "-1"], ["--seed", "-1"],
                 ["--seed", str(2**32)]):
        with pytest.raises(SystemExit) as exc:
            H.parse_args(argv)
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert f"argument {argv[0]}: must be" in err and "Traceback" not in err
    assert H.parse_args(["--seed", str(2**32 - 1)]).seed == 2**32 - 1


def test_youden_threshold_maximises_j_on_validation():
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 2, 300)
    probs = np.clip(labels * 0.3 + rng.random(300) * 0.7, 0, 1)
    t = H.youden_threshold(labels, probs)

    def j(threshold):
        pred = probs >= threshold
        return skm.recall_score(labels, pred) + skm.recall_score(labels, pred, pos_label=0) - 1

    assert j(t) == pytest.approx(max(j(c) for c in np.unique(probs)))


def test_stratified_bootstrap_keeps_class_counts_and_is_seeded():
    labels = np.array([0] * 30 + [1] * 70)
    first = H.stratified_resamples(labels, 50, seed=3)
    assert all(labels[idx].sum() == 70 and len(idx) == 100 for idx in first)
    assert all(np.array_equal(a, b) for a, b in zip(first, H.stratified_resamples(labels, 50, 3)))
    probs = np.clip(labels * 0.4 + np.random.default_rng(0).random(100) * 0.6, 0, 1)
    draws = H.bootstrap(labels, probs, first)
    low, high = H.interval95(draws["auc"])
    assert low <= skm.roc_auc_score(labels, probs) <= high
    same = H.paired_auc_differences({"a": draws, "b": draws}, "a")["b"]
    assert same["difference"] == 0 and same["best_ahead"] == 0


@pytest.mark.parametrize("dataset, size", [("breastmnist", 28), ("pneumoniamnist", 64)])
def test_other_binary_dataset_and_size(dataset, size, tmp_path, monkeypatch, offline):
    from conftest import write_npz
    import medmnist
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    folder = tmp_path / "data"
    folder.mkdir()
    write_npz(folder, name=dataset, size=size)
    out = tmp_path / "out"
    argv = ["--quick", "--epochs", "1", "--dataset", dataset, "--size", str(size),
            "--data-dir", str(folder), "--outputs", str(out)]
    assert H.main(argv) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["dataset"] == dataset and m["size"] == size
    assert m["positive_class"] == H.FINDING[dataset]
    assert m["data_file"]["name"] == f"{dataset}{'' if size == 28 else f'_{size}'}.npz"
    assert m["data_file"]["md5_expected"] == medmnist.INFO[dataset][
        "MD5" + ("" if size == 28 else f"_{size}")]
    assert all((out / name).exists() for name in OUTPUT_FILES)
    data = H.load_data(H.Config(dataset=dataset, size=size, data_dir=str(folder)),
                       torch.device("cpu"))
    assert data.x["test"].shape[1:] == (1, size, size)
    finding = int(next(k for k, v in medmnist.INFO[dataset]["label"].items()
                       if v == H.FINDING[dataset]))
    assert data.class_names[1] == H.FINDING[dataset] and data.medmnist_labels[1] == finding
    model = H.build_resnet18(None, 1, size)
    H.fit(model, data, H.Config(), H.Stage("train", 4, 1e-3), [], "test")
    maps = H.gradcam_maps("resnet18_scratch", model, data.x["test"][:2], data)
    assert maps.shape == (2, size, size)


@pytest.mark.parametrize("dataset", ["pathmnist", "chestmnist", "nodulemnist3d"])
def test_non_binary_or_3d_datasets_are_refused(dataset, tmp_path, capsys):
    code = H.main(["--dataset", dataset, "--data-dir", str(tmp_path), "--outputs",
                   str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "binary datasets only" in err and "Traceback" not in err


def test_step_budget_gives_a_small_split_as_many_updates():
    cfg = H.Config()
    full, small = H.epoch_budget(cfg.cnn_steps, 36, cfg), H.epoch_budget(cfg.cnn_steps, 4, cfg)
    assert full * 36 >= cfg.cnn_steps and small * 4 >= cfg.cnn_steps   # the whole budget fits
    assert small * 4 - cfg.cnn_steps < 4                              # and not much more
    assert H.epoch_budget(cfg.cnn_steps, 10_000, cfg) == 1              # a huge split: 1 epoch
    assert H.epoch_budget(cfg.cnn_steps, 4, H.Config(epochs=7)) == 7     # --epochs caps it


def test_fit_on_a_tiny_split_takes_the_step_budget(data):
    tiny = H.training_subset(data.y["train"].numpy(), 40, seed=0)       # 40 images
    small = replace(data, loaders={**data.loaders, "train": H.make_loader(
        data.x["train"][tiny], data.y["train"][tiny], 16, shuffle=True)})  # 2 steps an epoch
    torch.manual_seed(0)
    cfg = H.Config(plateau_steps=1000)                                  # no stop: use the budget
    history = []
    planned, best = H.fit(H.SimpleCNN(), small, cfg, H.Stage("train", 30, 3e-3), history, "t")
    assert planned == 15 and len(history) == 15                          # 30 steps, 2 an epoch
    assert 1 <= best <= 15


def test_fit_stops_early_when_val_loss_stalls(data, monkeypatch):
    monkeypatch.setattr(H, "train_epoch", lambda *args: (0.5, 0.5))   # weights never change
    cfg = H.Config(plateau_steps=3 * len(data.loaders["train"]))      # a plateau is 3 epochs
    history = []
    planned, best = H.fit(H.SimpleCNN(), data, cfg, H.Stage("train", 10**4, 1e-3), history, "t")
    assert planned > 1000 and best == 1                                # epoch 1 is never beaten
    assert len(history) == 1 + 2 * 3                                   # stopped after 2 plateaus
    lrs = [h["lr"] for h in history]
    assert lrs[4] == pytest.approx(lrs[3] * cfg.lr_drop)               # 3 stalled epochs: rate/10
    assert lrs[:4] == [lrs[0]] * 4


def test_training_subset_is_stratified_and_seeded():
    labels = np.array([0] * 300 + [1] * 700)
    a, b = H.training_subset(labels, 100, 0), H.training_subset(labels, 100, 0)
    assert torch.equal(a, b) and len(a) == 100 and len(set(a.tolist())) == 100
    assert labels[a.numpy()].sum() == 70                                # the class ratio holds
    assert not torch.equal(a, H.training_subset(labels, 100, 1))
    assert torch.equal(H.training_subset(labels, 1000, 0), torch.arange(1000))
    with pytest.raises(H.UserError, match="more than"):
        H.training_subset(labels, 1001, 0)


def choice_for(val_labels, probs, losses):
    """choose_best on made-up validation predictions and losses."""
    results = {k: dict(val=dict(auc=skm.roc_auc_score(val_labels, p)), val_loss=losses[k])
               for k, p in probs.items()}
    return H.choose_best(results, probs, val_labels, H.Config(bootstrap_resamples=300))


def test_selection_breaks_val_auc_ties_by_val_loss():
    rng = np.random.default_rng(0)
    labels = np.array([0] * 20 + [1] * 58)                             # 78 images, like BreastMNIST
    base = labels * 0.5 + rng.random(78) * 0.7
    nudged = base + rng.normal(0, 0.05, 78)                            # a few ranks change
    probs = {"simple_cnn": base, "resnet18_scratch": nudged}
    aucs = {k: skm.roc_auc_score(labels, p) for k, p in probs.items()}
    leader = max(aucs, key=aucs.get)
    other = min(aucs, key=aucs.get)
    best, choice = choice_for(labels, probs, {leader: 0.30, other: 0.20})
    assert choice["leader"] == leader and set(choice["tied"]) == set(probs)
    assert best == other                                               # tie: the lower val loss
    text = H.describe_choice(best, choice, {k: dict(val=dict(auc=a)) for k, a in aucs.items()})
    assert "cannot separate" in text and H.MODEL_NAMES[other] in text


def test_selection_keeps_a_clear_val_auc_leader():
    rng = np.random.default_rng(1)
    labels = np.array([0] * 130 + [1] * 390)
    good = labels * 0.8 + rng.random(520) * 0.5
    poor = labels * 0.2 + rng.random(520) * 0.8
    best, choice = choice_for(labels, {"simple_cnn": poor, "resnet18_scratch": good},
                              {"simple_cnn": 0.1, "resnet18_scratch": 0.9})
    assert best == "resnet18_scratch" and choice["tied"] == ["resnet18_scratch"]
