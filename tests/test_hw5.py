"""Offline tests of hw5_dl's parts on synthetic data written in medmnist's npz format."""
import json
import shutil
from types import SimpleNamespace

import matplotlib.text
import numpy as np
import pytest
import torch
import torchvision
from sklearn import metrics as skm
from torch import nn

import hw5_dl as H

OUTPUT_FILES = ["part1_samples.png", "part1_class_distribution.png", "part1_augmentation.png",
                "part2_training_curves.png", "part3_training_curves.png",
                "part3_model_comparison.md", "part4_confusion_matrix.png", "part4_roc_pr.png",
                "part4_error_analysis.png", "part5_filters.png",
                "part5_gradcam.png", "summary.md", "metrics.json"]
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def data(data_dir):
    """The synthetic splits loaded through medmnist, as the script loads the real ones."""
    return H.load_data(H.Config(data_dir=str(data_dir), batch_size=64))


def test_loads_through_medmnist_from_local_root(data, data_dir):
    import medmnist
    ds = medmnist.PneumoniaMNIST(split="val", root=str(data_dir))
    assert data.x["val"].shape == (len(ds.imgs), 1, 28, 28)
    assert torch.equal(data.y["val"], torch.from_numpy(ds.labels[:, 0]).float())   # (N, 1) -> N
    assert 0 <= data.x["train"].min() and data.x["train"].max() <= 1
    assert data.class_names == ["normal", "pneumonia"] and data.medmnist_labels == [0, 1]
    n_pos = data.y["train"].sum().item()
    assert data.pos_weight == pytest.approx((len(data.y["train"]) - n_pos) / n_pos)
    xb, yb = next(iter(data.loaders["train"]))
    assert xb.shape == (64, 1, 28, 28) and yb.shape == (64,)
    assert sum(len(y) for _, y in data.loaders["test"]) == len(data.y["test"])


def test_an_epoch_is_one_seeded_shuffled_pass(data_dir):
    a = H.load_data(H.Config(data_dir=str(data_dir), batch_size=64))
    b = H.load_data(H.Config(data_dir=str(data_dir), batch_size=64))
    first = torch.cat([y for _, y in a.loaders["train"]])
    assert len(first) == len(a.y["train"]) // 64 * 64          # whole batches of one pass
    assert torch.equal(first, torch.cat([y for _, y in b.loaders["train"]]))   # seeded
    assert not torch.equal(first, torch.cat([y for _, y in a.loaders["train"]]))   # reshuffled


def test_quick_trains_on_the_first_images(data_dir):
    small = H.load_data(H.Config(data_dir=str(data_dir), train_images=100))
    full = H.load_data(H.Config(data_dir=str(data_dir)))
    assert torch.equal(small.x["train"], full.x["train"][:100])
    assert torch.equal(small.y["val"], full.y["val"])


def test_augmentation_draws_differ_per_image_and_stay_in_range(data):
    torch.manual_seed(0)
    same = data.x["train"][:1].repeat(16, 1, 1, 1)
    out = H.augment(same, H.Config())
    assert out.shape == same.shape and out.min() >= 0 and out.max() <= 1
    flat = out.flatten(1)
    assert torch.cdist(flat, flat)[~torch.eye(16, dtype=bool)].min() > 1e-3   # all differ


def test_augmentation_identity_when_disabled(data):
    cfg = H.Config(flip_prob=0, max_rotation_deg=0, brightness=0, contrast=0)
    x = data.x["train"][:8]
    assert torch.allclose(H.augment(x, cfg), x, atol=1e-5)


def test_model_output_shapes_and_rubric_architecture():
    x = torch.rand(4, 1, 28, 28)
    assert H.SimpleCNN()(x).shape == (4, 1)
    assert H.build_resnet18().eval()(x).shape == (4, 1)
    modules = list(H.SimpleCNN().modules())
    assert 2 <= sum(isinstance(m, nn.Conv2d) for m in modules) <= 3
    assert 1 <= sum(isinstance(m, nn.Linear) for m in modules) <= 2
    assert sum(isinstance(m, nn.MaxPool2d) for m in modules) == 3


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
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {"fc.weight", "fc.bias"}
    H.set_trainable(model, head_only=False)
    assert all(p.requires_grad for p in model.parameters())


def test_early_stopping_stops_and_keeps_best_weights():
    model = nn.Linear(2, 1)
    stopper = H.EarlyStopping(patience=2)
    for epoch, loss in enumerate([1.0, 0.5, 0.7, 0.6, 0.4], 1):
        with torch.no_grad():
            model.weight.fill_(epoch)                 # the weights of epoch k are all k
        if stopper.step(loss, model, epoch):
            break
    assert epoch == 4 and stopper.best_epoch == 2
    assert torch.all(stopper.best_state["weight"] == 2)


def test_fit_restores_weights_of_best_validation_epoch(data):
    torch.manual_seed(0)
    model, history = H.SimpleCNN(), []
    stopper = H.EarlyStopping(8)
    H.fit(model, data, H.Config(), H.Stage("train", 4 * 4, 3e-3), stopper, history, "t", CPU)
    model.load_state_dict(stopper.best_state)
    best = stopper.best_epoch
    assert len(history) == 4
    logits, labels = H.predict(model, data.loaders["val"], data, CPU)
    assert min(h["val_loss"] for h in history) == history[best - 1]["val_loss"]
    weighted_bce = nn.BCEWithLogitsLoss(pos_weight=torch.tensor(data.pos_weight))
    assert weighted_bce(logits, labels).item() == pytest.approx(history[best - 1]["val_loss"],
                                                                abs=1e-5)
    assert history[best - 1]["val_auc"] > 0.8        # the synthetic signal is learnable


def test_patience_and_caps_count_updates_whatever_the_training_size(data_dir):
    full = H.load_data(H.Config(data_dir=str(data_dir), batch_size=64))     # 4 updates a pass
    small = H.load_data(H.Config(data_dir=str(data_dir), batch_size=64, train_images=128))
    assert len(full.loaders["train"]) == 4 and len(small.loaders["train"]) == 2
    assert H.epochs(144, full) == 36 and H.epochs(144, small) == 72      # same updates
    assert H.epochs(1, full) == 1 and H.epochs(5, full) == 2              # whole epochs


def test_fit_drops_the_rate_then_stops_when_val_loss_stalls(data, monkeypatch):
    monkeypatch.setattr(H, "train_epoch", lambda *args: (0.5, 0.5))   # weights never change
    cfg, history, stopper = H.Config(drop_after=3 * 4, stop_after=6 * 4), [], H.EarlyStopping(6)
    H.fit(H.SimpleCNN(), data, cfg, H.Stage("train", 400, 1e-3), stopper, history, "t", CPU)
    assert stopper.best_epoch == 1 and len(history) == 1 + 6   # epoch 1 never beaten: stop
    lrs = [h["lr"] for h in history]
    assert lrs[:4] == [1e-3] * 4 and lrs[4] == pytest.approx(1e-4)   # 3 stalled: rate / 10


def test_finetuning_restores_the_lowest_val_loss_of_both_stages(data, monkeypatch):
    """Stage 2 never beats stage 1's best epoch: the weights of that epoch come back."""
    epoch = iter(range(1, 100))
    val_losses = iter([0.30, 0.20, 0.50, 0.40, 0.45, 0.35, 0.60, 0.25, 0.30, 0.40, 0.50, 0.60])

    def fake_epoch(model, *args):
        with torch.no_grad():
            model.fc.bias.fill_(next(epoch))          # the weights of epoch k carry k
        return 0.5, 0.5

    monkeypatch.setattr(H, "train_epoch", fake_epoch)
    monkeypatch.setattr(H, "validate", lambda *args: dict(val_loss=next(val_losses), val_acc=0.5,
                                                          val_auc=0.5))
    stages = [H.Stage("frozen", 2 * 4, 1e-3, head_only=True), H.Stage("unfrozen", 20 * 4, 3e-4)]
    t = H.train_model("resnet18_pretrained", H.build_resnet18, stages, data,
                      H.Config(stop_after=8 * 4), CPU)              # 4 updates a pass: 8 epochs
    assert [h["stage"] for h in t.result["history"]] == ["frozen"] * 2 + ["unfrozen"] * 8
    assert t.result["best_epoch"] == 2 and t.result["val_loss"] == 0.20
    assert t.model.fc.bias.item() == 2


def test_metrics_equal_sklearn():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 200)
    probs = np.clip(labels * 0.3 + rng.random(200) * 0.7, 0, 1)
    m, pred = H.binary_metrics(labels, probs, 0.5), probs >= 0.5
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(labels, pred))
    assert m["precision"] == pytest.approx(skm.precision_score(labels, pred))
    assert m["recall"] == pytest.approx(skm.recall_score(labels, pred))
    assert m["specificity"] == pytest.approx(skm.recall_score(labels, pred, pos_label=0))
    assert m["npv"] == pytest.approx(skm.precision_score(labels, pred, pos_label=0))
    assert m["f1"] == pytest.approx(skm.f1_score(labels, pred))
    assert m["auc"] == pytest.approx(skm.roc_auc_score(labels, probs))      # from probabilities
    assert m["ap"] == pytest.approx(skm.average_precision_score(labels, probs))
    assert m["tp"] + m["fn"] == labels.sum()


def test_screening_threshold_reaches_recall_on_validation():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, 300)
    probs = np.clip(labels * 0.4 + rng.random(300) * 0.6, 0, 1)
    t = H.screening_threshold(labels, probs, 0.95)
    assert skm.recall_score(labels, probs >= t) >= 0.95
    assert skm.recall_score(labels, probs >= probs[probs > t].min()) < 0.95   # next one up


def test_screening_threshold_buys_recall_when_half_already_meets_the_target():
    labels = np.array([0] * 50 + [1] * 100)
    probs = np.r_[np.linspace(0.0, 0.45, 50), [0.3, 0.4], np.linspace(0.55, 1.0, 98)]
    assert skm.recall_score(labels, probs >= 0.5) == 0.98       # 0.5 keeps 0.95 already
    assert H.screening_threshold(labels, probs, 0.95) == 0.4    # one more positive, no further
    everyone = np.r_[np.linspace(0.0, 0.45, 50), np.linspace(0.7, 1.0, 100)]
    assert H.screening_threshold(labels, everyone, 0.95) <= 0.5  # 0.5 finds all: not above it


def fake_trained(val_auc, val_loss, test_probs):
    """A Trained record with made-up validation results and test probabilities."""
    return H.Trained(dict(status="trained", val=dict(auc=val_auc), val_loss=val_loss,
                          test=H.binary_metrics(np.r_[[0] * 40, [1] * 60], test_probs),
                          params=1, train_seconds=1, epochs_trained=1, max_epochs=1),
                     model=nn.Linear(1, 1), test_probs=test_probs)


@pytest.mark.parametrize("aucs, losses, chosen", [((0.9971, 0.9960), (0.05, 0.01), "a"),
                                                  ((0.9971, 0.9968), (0.05, 0.01), "b")])
def test_choice_is_lowest_val_loss_among_val_aucs_within_0_001_of_the_best(aucs, losses, chosen,
                                                                           tmp_path):
    labels = np.r_[[0] * 40, [1] * 60]
    probs = np.clip(labels * 0.5 + np.random.default_rng(0).random(100) * 0.6, 0, 1)
    trained = {"simple_cnn": fake_trained(aucs[0], losses[0], probs),
               "resnet18_scratch": fake_trained(aucs[1], losses[1], probs[::-1].copy())}
    data = SimpleNamespace(y={"test": torch.from_numpy(labels).float()},
                           class_names=["normal", "pneumonia"])
    best, table, differences = H.part3_compare(trained, data, H.Config(bootstrap_resamples=50),
                                               tmp_path)
    assert best == {"a": "simple_cnn", "b": "resnet18_scratch"}[chosen]
    assert set(differences) == set(trained) - {best}
    assert table == (tmp_path / "part3_model_comparison.md").read_text(encoding="utf-8")
    assert f"**{H.MODEL_NAMES[best]}**" in table


def test_gradcam_maps_differ_per_class_and_are_not_constant(data):
    torch.manual_seed(0)
    for name, model in [("simple_cnn", H.SimpleCNN()), ("resnet18_scratch", H.build_resnet18())]:
        H.fit(model, data, H.Config(), H.Stage("train", 2 * 4, 3e-3), H.EarlyStopping(8), [],
              name, CPU)
        x = data.x["test"][:4]
        maps = H.gradcam_maps(name, model, x, data, [1] * 4)
        assert maps.shape == (4, 28, 28) and max(m.std() for m in maps) > 0.01, name
        assert not np.allclose(maps, H.gradcam_maps(name, model, x, data, [0] * 4)), name


def record_figures(monkeypatch):
    """Record, per saved figure (by file name), every text drawn in it and, per panel title,
    the labels of the lines in that panel."""
    texts, panels, save = {}, {}, H.save_figure

    def recording_save(fig, path):
        texts[path.name] = " | ".join(t.get_text() for t in fig.findobj(matplotlib.text.Text))
        panels[path.name] = {ax.get_title(): [line.get_label() for line in ax.get_lines()]
                             for ax in fig.axes}
        save(fig, path)

    monkeypatch.setattr(H, "save_figure", recording_save)
    return texts, panels


def test_main_quick_with_cached_weights_hands_in_three_models(data_dir, resnet18_state_path,
                                                               tmp_path, monkeypatch):
    """A stand-in state dict where torchvision's cache looks: the three-model hand-in (the
    numbers it gives are not results: the stand-in is random)."""
    torch_home = tmp_path / "torch"
    (torch_home / "hub" / "checkpoints").mkdir(parents=True)
    shutil.copy(resnet18_state_path, torch_home / "hub" / "checkpoints")
    monkeypatch.setenv("TORCH_HOME", str(torch_home))
    (texts, panels), out = record_figures(monkeypatch), tmp_path / "out"
    assert H.main(["--quick", "--data-dir", str(data_dir), "--outputs", str(out),
                   "--device", "cpu"]) == 0
    for name in OUTPUT_FILES:
        assert (out / name).stat().st_size > 0, name
    m = json.loads((out / "metrics.json").read_text())
    assert m["dataset"] == "pneumoniamnist" and m["positive_class"] == "pneumonia"
    assert m["device"] == "cpu" and m["config"]["quick"] is True and m["best_model"] in m["models"]
    for r in m["models"].values():
        assert r["status"] == "trained" and 1 <= r["best_epoch"] <= r["epochs_trained"]
        assert r["val_loss"] == min(h["val_loss"] for h in r["history"])
        assert set(r["test"]) >= {"accuracy", "auc", "precision", "recall", "specificity", "f1"}
        assert all(0 <= low <= high <= 1 for low, high in r["test_ci95"].values())
    stages = [h["stage"] for h in m["models"]["resnet18_pretrained"]["history"]]
    n_frozen = stages.count("frozen")                                # stage 1, then stage 2
    assert 1 <= n_frozen < len(stages) and stages == sorted(stages)  # "frozen" < "unfrozen"
    assert set(m["auc_difference_vs_best"]) == set(m["models"]) - {m["best_model"]}
    table = (out / "part3_model_comparison.md").read_text(encoding="utf-8")
    assert "not run" not in table and table.count("| ResNet18 (pretrained) | 0.") == 1
    summary = (out / "summary.md").read_text(encoding="utf-8")
    assert "not a result" in summary
    for section in ("## 2.3", "## 3.2", "## 3.3", "## 4.1", "## 4.2", "## 4.3", "Reflection 1"):
        assert section in summary
    screening = m["operating_points"]["screening"]
    assert f"t = {screening['threshold']:.3f}" in summary
    assert "stage 2 from here" in texts["part3_training_curves.png"]
    # 3.2 answered by the run: the summary's comparison and a panel that holds both models
    pre, scratch = m["models"]["resnet18_pretrained"], m["models"]["resnet18_scratch"]
    answer = summary.split("## 3.2")[1].split("## 3.3")[0]
    assert f"at epoch {pre['best_epoch']} fine-tuned" in answer
    assert f"at epoch {scratch['best_epoch']} from scratch" in answer
    k = min(pre["best_epoch"], scratch["best_epoch"])
    lowest = [min(e["val_loss"] for e in r["history"][:k]) for r in (pre, scratch)]
    assert (f"Up to epoch {k}, the earlier of the two, the lowest val loss was "
            f"{lowest[0]:.3f} fine-tuned against {lowest[1]:.3f} from scratch") in answer
    low, high = pre["test_auc_gain_over_scratch"]["ci95"]
    verdict = "contains 0" if low <= 0 <= high else "excludes 0"
    assert f"[{low:+.3f}, {high:+.3f}], {verdict}" in answer and "Verdict: fine-tuning" in answer
    for what in ("val loss", "val AUC"):
        lines = panels["part3_training_curves.png"][f"3.2 fine-tuned against from scratch: {what}"]
        for name in ("ResNet18 (pretrained)", "ResNet18 (from scratch)"):
            assert sum(label.startswith(name) for label in lines) == 1, (what, name)
    assert "ResNet18 (pretrained): weighted BCE loss" in texts["part3_training_curves.png"]
    for figure in ("part5_filters.png", "part5_gradcam.png"):
        assert all(name in texts[figure] for name in H.MODEL_NAMES.values()), figure
    for figure in ("part4_confusion_matrix.png", "part4_roc_pr.png", "part4_error_analysis.png"):
        assert H.MODEL_NAMES[m["best_model"]] in texts[figure], figure


def test_main_offline_skips_pretrained_with_reason(data_dir, tmp_path, monkeypatch, offline):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_torch_home"))
    (_, panels), out = record_figures(monkeypatch), tmp_path / "out"
    assert H.main(["--quick", "--data-dir", str(data_dir),
                   "--outputs", str(out)]) == 0
    m = json.loads((out / "metrics.json").read_text())
    skipped = m["models"]["resnet18_pretrained"]
    assert skipped["status"] == "skipped" and skipped["reason"].startswith("not run:")
    assert m["best_model"] != "resnet18_pretrained"
    assert "not run:" in (out / "part3_model_comparison.md").read_text(encoding="utf-8")
    summary = (out / "summary.md").read_text(encoding="utf-8")
    assert "ResNet18 (pretrained): not run" in summary
    assert "no fine-tuned model to compare" in summary and "Verdict: fine-tuning" not in summary
    assert not any(title.startswith("3.2") for title in panels["part3_training_curves.png"])
    assert all((out / name).exists() for name in OUTPUT_FILES)


@pytest.mark.parametrize("dataset", ["breastmnist"])
def test_other_binary_dataset_makes_the_finding_positive(dataset, tmp_path, monkeypatch,
                                                         offline):
    import medmnist
    from conftest import write_npz
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    folder = tmp_path / "data"
    folder.mkdir()
    write_npz(folder, name=dataset)
    out = tmp_path / "out"
    assert H.main(["--quick", "--dataset", dataset, "--data-dir", str(folder),
                   "--outputs", str(out)]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["dataset"] == dataset and m["positive_class"] == "malignant"
    data = H.load_data(H.Config(dataset=dataset, data_dir=str(folder)))
    raw = medmnist.BreastMNIST(split="test", root=str(folder)).labels[:, 0]
    assert data.class_names == ["normal, benign", "malignant"] and data.medmnist_labels == [1, 0]
    assert torch.equal(data.y["test"], torch.from_numpy(raw == 0).float())   # malignant -> 1
    recall = m["models"][m["best_model"]]["test"]
    assert recall["tp"] + recall["fn"] == (raw == 0).sum()
