"""Correctness properties, each checked on data where breaking it must show: augmentation per
image and in training only, choices read from validation alone, the training rule, and the
evaluation's resampling, Grad-CAM target and loss weighting."""
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from sklearn import metrics as skm
from torch import nn

import hw5_dl as H

CPU = torch.device("cpu")
ONLY = dict(flip_prob=0.0, max_rotation_deg=0.0, brightness=0.0, contrast=0.0)


@pytest.fixture(scope="module")
def data(data_dir):
    """The synthetic splits loaded through medmnist, 64 images a batch (4 updates a pass)."""
    return H.load_data(H.Config(data_dir=str(data_dir), batch_size=64))


def augmented_copies(image, n=400, seed=0, **only):
    """n copies of one (1, 28, 28) image through augment with only the named settings on."""
    torch.manual_seed(seed)
    return H.augment(image.repeat(n, 1, 1, 1), H.Config(**{**ONLY, **only}))


def bar_image():
    """A bright elongated blob, horizontal, centred: its orientation shows any rotation."""
    yy, xx = torch.meshgrid(torch.arange(28.0) - 13.5, torch.arange(28.0) - 13.5, indexing="ij")
    return (0.8 * torch.exp(-(xx ** 2 / 50 + yy ** 2 / 6)))[None]


def orientation_deg(image):
    """Angle of the principal axis of an image's intensity, from its second moments."""
    yy, xx = torch.meshgrid(torch.arange(28.0), torch.arange(28.0), indexing="ij")
    w = image[0] / image[0].sum()
    dx, dy = xx - (w * xx).sum(), yy - (w * yy).sum()
    mu20, mu02, mu11 = (w * dx ** 2).sum(), (w * dy ** 2).sum(), (w * dx * dy).sum()
    return math.degrees(0.5 * math.atan2(2 * mu11, mu20 - mu02))


# ---- Augmentation: each transform drawn per image, at its rate or range, in training only ----
def test_flip_alone_mirrors_each_image_with_its_own_draw_at_the_configured_rate(data):
    image = data.x["train"][:1]
    out = augmented_copies(image, flip_prob=0.5)
    flipped = [torch.allclose(o, image[0].flip(2), atol=1e-5) for o in out]
    kept = [torch.allclose(o, image[0], atol=1e-5) for o in out]
    assert all(f != k for f, k in zip(flipped, kept))          # mirrored whole, or untouched
    assert 0.4 < np.mean(flipped) < 0.6                          # 400 draws: 0.5 +- 4 sd
    assert all(torch.allclose(o, image[0].flip(2), atol=1e-5)
               for o in augmented_copies(image, n=8, flip_prob=1.0))


def test_rotation_alone_turns_each_image_by_its_own_angle_within_range():
    angles = np.array([orientation_deg(o) for o in augmented_copies(bar_image(), n=300,
                                                                      max_rotation_deg=10.0)])
    assert abs(orientation_deg(bar_image())) < 1e-3
    assert np.abs(angles).max() < 10.5                           # +-10 degrees (interpolation)
    assert angles.min() < -8 and angles.max() > 8                # the whole range is drawn
    assert len(np.unique(angles.round(2))) > 250                 # one angle per image


def test_brightness_alone_scales_each_image_by_its_own_factor_within_range(data):
    image = 0.2 + 0.4 * data.x["train"][:1]                      # no pixel reaches 0 or 1
    ratios = (augmented_copies(image, brightness=0.2) / image).flatten(1)
    assert ratios.std(dim=1).max() < 1e-4                        # one factor per image
    factors = ratios.mean(dim=1)
    assert factors.min() >= 0.8 - 1e-5 and factors.max() <= 1.2 + 1e-5
    assert factors.min() < 0.85 and factors.max() > 1.15
    assert len(np.unique(factors.numpy().round(5))) > 350


def test_contrast_alone_stretches_each_image_about_its_mean_within_range(data):
    image = 0.3 + 0.4 * data.x["train"][:1]
    out = augmented_copies(image, contrast=0.2)
    assert torch.allclose(out.mean(dim=(1, 2, 3)), image.mean().expand(len(out)), atol=1e-5)
    factors = out.std(dim=(1, 2, 3)) / image.std()
    assert factors.min() >= 0.8 - 1e-4 and factors.max() <= 1.2 + 1e-4
    assert factors.min() < 0.85 and factors.max() > 1.15
    assert len(np.unique(factors.numpy().round(5))) > 350


def test_augmentation_runs_on_training_batches_only(data, monkeypatch):
    seen, augment = [], H.augment

    def recording_augment(x, cfg):
        seen.append(len(x))
        return augment(x, cfg)

    monkeypatch.setattr(H, "augment", recording_augment)
    torch.manual_seed(0)
    model = H.SimpleCNN()
    H.fit(model, data, H.Config(), H.Stage("train", 4, 3e-3), H.EarlyStopping(8), [], "t", CPU)
    assert seen == [64] * len(data.loaders["train"])             # one pass, nothing else
    logits, _ = H.predict(model, data.loaders["val"], data, CPU)
    with torch.no_grad():
        plain = model(H.standardize(data.x["val"], data)).squeeze(1)
    assert len(seen) == len(data.loaders["train"]) and torch.allclose(logits, plain, atol=1e-5)


# ---- Validation alone chooses: val and test differ, so reading the wrong split shows ----------
def scores(seed, n=300, signal=0.3):
    """Labels and noisy probabilities of one split."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    return labels, np.clip(labels * signal + rng.random(n) * (1 - signal), 0, 1)


def test_screening_threshold_is_fixed_on_validation_and_read_on_test():
    val, test = scores(3), scores(4)
    points = H.operating_points(*val, *test, H.Config())
    t = points["screening"]["threshold"]
    assert t == H.screening_threshold(*val, 0.99) != H.screening_threshold(*test, 0.99)
    for name, point in points.items():
        at_t = H.binary_metrics(*test, point["threshold"])
        assert point["recall"] == at_t["recall"] and point["fp"] == at_t["fp"], name
        assert point["val_recall"] == H.binary_metrics(*val, point["threshold"])["recall"], name
    assert points["screening"]["val_recall"] >= 0.99 > points["0.5"]["val_recall"]


class ForbiddenLoader:
    """A loader that fails the test when anything iterates it."""

    def __iter__(self):
        raise AssertionError("the test split was read")


def test_early_stopping_reads_validation_and_never_the_test_split(data):
    no_test = SimpleNamespace(**{**vars(data), "loaders": {**data.loaders,
                                                           "test": ForbiddenLoader()}})
    torch.manual_seed(0)
    model, history = H.SimpleCNN(), []
    H.fit(model, no_test, H.Config(), H.Stage("train", 3 * 4, 3e-3), H.EarlyStopping(8),
          history, "t", CPU)
    logits, labels = H.predict(model, data.loaders["val"], data, CPU)
    weighted = nn.BCEWithLogitsLoss(pos_weight=torch.tensor(data.pos_weight))
    assert history[-1]["val_loss"] == pytest.approx(weighted(logits, labels).item(), abs=1e-5)
    assert history[-1]["val_auc"] == pytest.approx(skm.roc_auc_score(labels, logits))


def test_each_model_predicts_the_test_split_once(data_dir, resnet18_state_path, tmp_path,
                                                 monkeypatch):
    loaded, test_reads, load, predict = [], [], H.load_data, H.predict

    def recording_load(cfg):
        loaded.append(load(cfg))
        return loaded[-1]

    def recording_predict(model, loader, data, device):
        if loader is loaded[0].loaders["test"]:
            test_reads.append(type(model).__name__)
        return predict(model, loader, data, device)

    monkeypatch.setattr(H, "load_data", recording_load)
    monkeypatch.setattr(H, "predict", recording_predict)
    assert H.main(["--quick", "--data-dir", str(data_dir), "--outputs", str(tmp_path / "out"),
                   "--pretrained-weights", str(resnet18_state_path)]) == 0
    assert sorted(test_reads) == ["ResNet", "ResNet", "SimpleCNN"]


# ---- The training rule -----------------------------------------------------------------------
def test_each_stage_gets_the_whole_patience_and_one_best_spans_both(data, monkeypatch):
    """Stage 1 ends on a bad epoch; stage 2 must still wait the whole patience (3 epochs)."""
    val_losses = iter([0.20, 0.30, 0.40, 0.50, 0.60, 0.70, 0.80, 0.90])
    monkeypatch.setattr(H, "train_epoch", lambda *args: (0.5, 0.5))
    monkeypatch.setattr(H, "validate", lambda *args: dict(val_loss=next(val_losses), val_acc=0.5,
                                                          val_auc=0.5))
    stages = [H.Stage("frozen", 2 * 4, 1e-3, head_only=True), H.Stage("unfrozen", 20 * 4, 3e-4)]
    t = H.train_model("resnet18_pretrained", H.build_resnet18, stages, data,
                      H.Config(stop_after=3 * 4, drop_after=2 * 4), CPU)
    assert [h["stage"] for h in t.result["history"]] == ["frozen"] * 2 + ["unfrozen"] * 3
    assert t.result["best_epoch"] == 1 and t.result["val_loss"] == 0.20


def test_stage_one_trains_only_the_head_and_stage_two_everything(data, monkeypatch):
    changed, train_epoch = [], H.train_epoch

    def recording_epoch(model, *args):
        before = {k: v.clone() for k, v in model.named_parameters()}
        result = train_epoch(model, *args)
        changed.append({k for k, v in model.named_parameters() if not torch.equal(v, before[k])})
        return result

    monkeypatch.setattr(H, "train_epoch", recording_epoch)
    torch.manual_seed(0)
    stages = [H.Stage("frozen", 4, 1e-3, head_only=True), H.Stage("unfrozen", 4, 3e-4)]
    t = H.train_model("resnet18_pretrained", H.build_resnet18, stages, data, H.Config(), CPU)
    assert changed[0] == {"fc.weight", "fc.bias"}
    assert changed[1] == {k for k, _ in t.model.named_parameters()}


def test_training_loss_is_bce_weighted_by_negatives_over_positives(data, monkeypatch):
    weights, loss = [], nn.BCEWithLogitsLoss

    def recording_loss(pos_weight=None):
        weights.append(float(pos_weight))
        return loss(pos_weight=pos_weight)

    monkeypatch.setattr(H.nn, "BCEWithLogitsLoss", recording_loss)
    H.fit(H.SimpleCNN(), data, H.Config(), H.Stage("train", 4, 3e-3), H.EarlyStopping(8), [],
          "t", CPU)
    n_pos = data.y["train"].sum().item()
    assert weights == [pytest.approx((len(data.y["train"]) - n_pos) / n_pos)]
    assert weights[0] < 1                                        # the finding is the majority


# ---- Evaluation --------------------------------------------------------------------------------
def test_bootstrap_keeps_class_counts_and_draws_positives_among_positives():
    """Every positive is found and every negative is missed: a resample that keeps the counts
    and draws positives among positives has recall 1, specificity 0 and accuracy 0.7 exactly."""
    labels = np.array([0] * 30 + [1] * 70)
    probs = np.r_[np.linspace(0.6, 0.9, 30), np.linspace(0.55, 0.95, 70)]
    draws = H.bootstrap(labels, {"m": probs}, 300, seed=3)["m"]
    assert np.all(draws["recall"] == 1) and np.all(draws["specificity"] == 0)
    assert np.allclose(draws["accuracy"], 0.7)
    assert draws["auc"].std() > 0                                # resamples do differ
    again = H.bootstrap(labels, {"m": probs}, 300, seed=3)["m"]
    assert all(np.array_equal(draws[k], again[k]) for k in draws)      # seeded


def test_bootstrap_interval_brackets_the_auc():
    labels, probs = scores(0, n=200)
    low, high = np.percentile(H.bootstrap(labels, {"m": probs}, 300, seed=0)["m"]["auc"],
                              [2.5, 97.5])
    assert low < skm.roc_auc_score(labels, probs) < high and high - low < 0.2


def test_bootstrap_draws_the_same_resamples_for_every_model():
    """Model b is right exactly where model a is wrong: on shared resamples their accuracies
    add up to 1 every time."""
    labels, probs = scores(7, n=200)
    right = (probs >= 0.5) == labels
    draws = H.bootstrap(labels, {"a": probs, "b": np.where(right, 1 - labels, labels) * 1.0},
                        300, seed=1)
    assert np.allclose(draws["a"]["accuracy"] + draws["b"]["accuracy"], 1)
    assert draws["a"]["accuracy"].std() > 0


def test_auc_difference_is_paired_across_models(tmp_path):
    """Two models with the same test probabilities: paired resamples give a difference of 0 in
    every resample; unpaired ones would not."""
    labels, probs = scores(1, n=200)
    record = dict(status="trained", val=dict(auc=0.99), val_loss=0.1, params=1, train_seconds=1,
                  epochs_trained=1, max_epochs=1, test=H.binary_metrics(labels, probs))
    trained = {k: H.Trained(dict(record), nn.Linear(1, 1), probs, probs)
               for k in ("simple_cnn", "resnet18_scratch", "resnet18_pretrained")}
    data = SimpleNamespace(y={"test": torch.from_numpy(labels).float()},
                           class_names=["normal", "pneumonia"])
    best, _, differences = H.part3_compare(trained, data, H.Config(bootstrap_resamples=100),
                                           tmp_path)
    for d in [*differences.values(), trained["resnet18_pretrained"].result[
            "test_auc_gain_over_scratch"]]:
        assert d["difference"] == 0 and d["ci95"] == [0, 0]


def test_auc_and_ap_come_from_probabilities_not_thresholded_calls():
    labels, probs = scores(6, n=200)
    m = H.binary_metrics(labels, probs)
    assert m["auc"] == pytest.approx(skm.roc_auc_score(labels, probs))
    assert m["ap"] == pytest.approx(skm.average_precision_score(labels, probs))
    assert m["auc"] != pytest.approx(skm.roc_auc_score(labels, probs >= 0.5))


def test_gradcam_explains_the_predicted_class_also_when_it_is_wrong(data, monkeypatch, tmp_path):
    asked, gradcam_maps = [], H.gradcam_maps

    def recording_maps(name, model, x, data, classes):
        asked.append((name, list(classes)))
        return gradcam_maps(name, model, x, data, classes)

    monkeypatch.setattr(H, "gradcam_maps", recording_maps)
    labels = data.y["test"].numpy()
    probs = np.where(labels == 1, 0.9, 0.1).astype(np.float32)
    probs[np.flatnonzero(labels == 1)[:2]] = 0.2                  # false negatives
    probs[np.flatnonzero(labels == 0)[:2]] = 0.8                  # false positives
    torch.manual_seed(0)
    trained = {"simple_cnn": H.Trained({}, H.SimpleCNN().eval(), None, probs)}
    H.part5_interpret(trained, "simple_cnn", data, CPU, tmp_path)
    picks = H.confidence_groups(labels, probs)
    idx = [*picks["true positive"][:2], *picks["true negative"][:2], picks["false positive"][0],
           picks["false negative"][0]]
    assert asked == [("simple_cnn", [int(probs[i] >= 0.5) for i in idx])]
    assert [int(labels[i]) for i in idx] != asked[0][1]          # some predictions are wrong
