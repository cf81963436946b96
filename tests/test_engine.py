"""Training engine: config, loaders, loss/optimiser, one epoch, FedProx term, fit, SMOTE."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn as nn

from engine_helpers import CLASS_NAMES, write_easy_dataset
from kidneyscan.config import (
    ConfigError,
    ExperimentConfig,
    TrainConfig,
    load_config,
    save_config,
)
from kidneyscan.data.datasets import DataError, scan_dataset
from kidneyscan.data.loaders import make_loader, task_samples
from kidneyscan.engine import (
    class_weights,
    evaluate,
    fit,
    make_loss,
    make_optimizer,
    predict,
    set_seed,
    smote_refit_head,
    train_one_epoch,
)
from kidneyscan.models.factory import create_classifier
from kidneyscan.preprocess.pipeline import Preprocessor

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def easy_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_easy_dataset(tmp_path_factory.mktemp("easy"), per_class=12)


@pytest.fixture(scope="module")
def samples(easy_dir: Path) -> list:
    return scan_dataset(easy_dir)


@pytest.fixture()
def pre() -> Preprocessor:
    return Preprocessor(image_size=64)


class TinyNet(nn.Module):
    """A 2-layer CNN with timm's forward_features / forward_head / get_classifier."""

    def __init__(self, num_classes: int = 4) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2)
        )
        self.fc = nn.Linear(32, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = x.flatten(1)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        return self.fc


# ---------------------------------------------------------------- config
@pytest.mark.parametrize("suffix", [".yaml", ".toml", ".json"])
def test_config_round_trip_and_formats(tmp_path: Path, suffix: str) -> None:
    # Prepare
    text = {
        ".yaml": "model: resnet50\nimage_size: 128\ntrain:\n  epochs: 3\n  lr: 0.0005\n",
        ".toml": 'model = "resnet50"\nimage_size = 128\n[train]\nepochs = 3\nlr = 0.0005\n',
        ".json": '{"model": "resnet50", "image_size": 128, "train": {"epochs": 3, "lr": 5e-4}}',
    }[suffix]
    path = tmp_path / f"c{suffix}"
    path.write_text(text)
    # Execute
    cfg = load_config(path)
    saved = load_config(save_config(cfg, tmp_path / "saved.yaml"))
    # Assert
    assert cfg.model == "resnet50" and cfg.image_size == 128
    assert cfg.train.epochs == 3 and cfg.train.lr == pytest.approx(5e-4)
    assert cfg.train.batch_size == TrainConfig().batch_size
    assert saved == cfg


def test_config_top_level_training_keys(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("epochs: 4\nsmote: true\n")
    cfg = load_config(path)
    assert cfg.train.epochs == 4 and cfg.train.smote is True and cfg.model == "hybrid"


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("train:\n  epoch: 3\n", "epoch"),
        ("modle: hybrid\n", "modle"),
        ("train:\n  class_weighting: inverse\n", "class_weighting"),
        ("train:\n  lr: fast\n", "lr"),
        ("train:\n  smote: 1\n", "smote"),
        ("task: stones\n", "task"),
        ("train:\n  epochs: 2.5\n", "epochs"),
    ],
)
def test_config_errors_name_the_key(tmp_path: Path, text: str, needle: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=needle):
        load_config(path)


def test_config_missing_file_and_bad_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="cannot parse"):
        load_config(bad)


def test_config_is_frozen() -> None:
    cfg = ExperimentConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.model = "x"  # type: ignore[misc]
    assert cfg.replace(train={"epochs": 2}).train.epochs == 2


# ---------------------------------------------------------------- loaders
def test_loader_shapes_and_eval_is_deterministic(samples: list, pre: Preprocessor) -> None:
    loader = make_loader(samples, pre, train=False, batch_size=8)
    x1, y1 = next(iter(loader))
    x2, y2 = next(iter(loader))
    assert x1.shape == (8, 3, 64, 64) and x1.dtype == torch.float32
    assert y1.dtype == torch.int64
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    # Evaluation loaders keep file order.
    assert y1.tolist() == [s.label for s in samples[:8]]


def test_augmentation_only_when_training(samples: list, pre: Preprocessor) -> None:
    """Breaks if eval loaders augment, if training loaders do not, or if a training loader
    without ``augment`` changes pixels (then the difference below would not be augmentation).
    """
    plain = make_loader(samples[:4], pre, train=False, batch_size=4, augment=True)
    aug = make_loader(samples[:4], pre, train=True, batch_size=4, augment=True, seed=1)
    shuffled = make_loader(samples[:4], pre, train=True, batch_size=4, augment=False, seed=1)
    x_plain = next(iter(plain))[0]
    assert torch.equal(x_plain, next(iter(plain))[0])  # augment ignored when train=False
    torch.manual_seed(0)
    xa, ya = next(iter(aug))
    xs, _ = next(iter(shuffled))
    assert sorted(ya.tolist()) == sorted(s.label for s in samples[:4])
    # Sorting over the batch axis removes the shuffle: only augmentation can differ.
    assert torch.equal(xs.sort(0).values, x_plain.sort(0).values)
    assert not torch.allclose(xa.sort(0).values, x_plain.sort(0).values)


def test_augmentation_is_seeded(samples: list, pre: Preprocessor) -> None:
    def first_batch() -> torch.Tensor:
        set_seed(3)
        loader = make_loader(samples, pre, train=True, batch_size=8, augment=True, seed=3)
        return next(iter(loader))[0]

    assert torch.equal(first_batch(), first_batch())


def test_balanced_sampler_equalises_classes(easy_dir: Path, pre: Preprocessor) -> None:
    all_s = scan_dataset(easy_dir)
    # Imbalanced: 12 Cyst, 2 of each other class.
    imb = [s for s in all_s if s.label == 0] + [
        s for c in (1, 2, 3) for s in [x for x in all_s if x.label == c][:2]
    ]
    loader = make_loader(imb * 10, pre, train=True, batch_size=300, balanced=True, seed=0)
    _, y = next(iter(loader))
    frac = np.bincount(y.numpy(), minlength=4) / len(y)
    assert np.all(np.abs(frac - 0.25) < 0.08), frac


def test_loader_rejects_empty() -> None:
    with pytest.raises(DataError, match="empty"):
        make_loader([], Preprocessor(image_size=64), train=True, batch_size=4)


def test_task_stone_vs_normal(samples: list) -> None:
    out, classes = task_samples(samples, "stone-vs-normal")
    assert classes == ("Normal", "Stone")
    assert {s.class_name for s in out} == {"Normal", "Stone"}
    assert all(s.label == classes.index(s.class_name) for s in out)
    with pytest.raises(ValueError, match="unknown task"):
        task_samples(samples, "cyst-only")


# ---------------------------------------------------------------- loss / optimiser
def test_class_weights_inverse_frequency_and_absent_class() -> None:
    w = class_weights([30, 10, 0, 20])
    # n / (k_present * count): 60 / (3 * count)
    assert w.tolist() == pytest.approx([60 / 90, 60 / 30, 0.0, 60 / 60])
    loss = make_loss(TrainConfig(class_weighting="loss"), [30, 10, 0, 20])
    assert isinstance(loss, nn.CrossEntropyLoss) and loss.weight is not None
    assert make_loss(TrainConfig(class_weighting="none"), [1, 1]).weight is None
    with pytest.raises(ValueError):
        class_weights([0, 0])


def test_schedule_warmup_then_cosine_to_zero() -> None:
    model = TinyNet()
    cfg = TrainConfig(epochs=4, lr=0.1, warmup_epochs=1)
    opt, sched = make_optimizer(model, cfg, steps_per_epoch=5)
    lrs = []
    for _ in range(20):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] < lrs[4] <= 0.1 + 1e-9  # warm-up rises
    assert max(lrs) == pytest.approx(0.1, rel=0.05)
    assert all(a >= b for a, b in zip(lrs[5:], lrs[6:], strict=False))  # cosine decays
    assert lrs[-1] < 0.01
    # Biases and 1-d parameters are not decayed.
    decays = {g["weight_decay"] for g in opt.param_groups}
    assert decays == {cfg.weight_decay, 0.0}


def _rates(opt: torch.optim.Optimizer, sched: Any, steps: int) -> list[float]:
    lrs = []
    for _ in range(steps):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs


def test_schedule_started_mid_run_continues_the_one_schedule() -> None:
    """Breaks if ``start_step`` is ignored (every round would warm up again) or shifts the
    schedule by another amount than it says: three optimisers started at steps 0, 5 and 10 of
    a 15-step run (as three federated rounds are) must give the single run's rates."""
    cfg = TrainConfig(epochs=3, lr=0.1, warmup_epochs=1)
    whole = _rates(*make_optimizer(TinyNet(), cfg, steps_per_epoch=5), steps=15)
    parts = [
        lr
        for start in (0, 5, 10)
        for lr in _rates(*make_optimizer(TinyNet(), cfg, 5, start_step=start), steps=5)
    ]
    assert parts == pytest.approx(whole, abs=1e-12)
    assert parts[5] > parts[10] > parts[14]  # the later rounds decay, they do not restart
    with pytest.raises(ValueError, match="start_step must be >= 0"):
        make_optimizer(TinyNet(), cfg, 5, start_step=-1)


def test_optimizer_skips_frozen_parameters() -> None:
    model = TinyNet()
    for p in model.features.parameters():
        p.requires_grad = False
    opt, _ = make_optimizer(model, TrainConfig(), steps_per_epoch=1)
    n_opt = sum(p.numel() for g in opt.param_groups for p in g["params"])
    assert n_opt == sum(p.numel() for p in model.fc.parameters())


# ---------------------------------------------------------------- one epoch / FedProx
def test_train_one_epoch_returns_stats(samples: list, pre: Preprocessor) -> None:
    """Breaks if the epoch's loss / accuracy are not the sample-weighted means over every
    batch (e.g. the last batch's, or unweighted per batch), if accuracy counts another class
    than the arg-max, or if the weights are not updated.
    """
    set_seed(0)
    model = TinyNet()
    loader = make_loader(samples, pre, train=True, batch_size=16)
    opt, sched = make_optimizer(model, TrainConfig(epochs=1), len(loader))
    before = [p.detach().clone() for p in model.parameters()]
    stats = train_one_epoch(model, loader, opt, loss_fn=nn.CrossEntropyLoss(), scheduler=sched)
    assert stats["n"] == len(samples)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    # A head that always predicts the majority class of an imbalanced subset (12 + 3 + 3 + 3
    # images, batches of 8, 8, 5), and a zero learning rate so nothing moves: the epoch's
    # accuracy must be exactly 12/21 and its loss that of evaluate() on the same images.
    major = samples[0].label
    subset = [s for s in samples if s.label == major]
    for label in sorted({s.label for s in samples} - {major}):
        subset += [s for s in samples if s.label == label][:3]
    with torch.no_grad():
        model.fc.weight.zero_()
        model.fc.bias.copy_(torch.full((4,), -1.0).index_fill_(0, torch.tensor([major]), 2.0))
        model.fc.bias[(major + 1) % 4] = -3.0  # a unique minimum too, so argmin != argmax
    frozen_opt = torch.optim.SGD(model.parameters(), lr=0.0)
    uneven = make_loader(subset, pre, train=True, batch_size=8)
    got = train_one_epoch(model, uneven, frozen_opt, loss_fn=nn.CrossEntropyLoss())
    want = evaluate(model, make_loader(subset, pre, train=False, batch_size=len(subset)))
    assert got["n"] == want["n"] == len(subset) == 21
    assert got["accuracy"] == pytest.approx(12 / 21, abs=1e-9)
    assert got["loss"] == pytest.approx(want["loss"], rel=1e-5)


def _distance_after_training(mu: float, samples: list, pre: Preprocessor) -> float:
    set_seed(0)
    model = TinyNet()
    start = [p.detach().clone() for p in model.parameters()]
    loader = make_loader(samples, pre, train=True, batch_size=8, seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(2):
        train_one_epoch(
            model,
            loader,
            opt,
            loss_fn=nn.CrossEntropyLoss(),
            proximal_mu=mu,
            global_params=start,
        )
    return float(
        sum(((p.detach() - g) ** 2).sum() for p, g in zip(model.parameters(), start, strict=True))
    )


def test_proximal_term_keeps_weights_near_global(samples: list, pre: Preprocessor) -> None:
    free = _distance_after_training(0.0, samples, pre)
    prox = _distance_after_training(1.0, samples, pre)
    assert prox < 0.8 * free, (prox, free)


def test_proximal_term_validates_inputs(samples: list, pre: Preprocessor) -> None:
    model = TinyNet()
    loader = make_loader(samples[:4], pre, train=True, batch_size=4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="global_params"):
        train_one_epoch(model, loader, opt, loss_fn=nn.CrossEntropyLoss(), proximal_mu=0.1)
    with pytest.raises(ValueError, match="tensors"):
        train_one_epoch(
            model,
            loader,
            opt,
            loss_fn=nn.CrossEntropyLoss(),
            proximal_mu=0.1,
            global_params=[torch.zeros(1)],
        )


# ---------------------------------------------------------------- fit
@pytest.mark.slow
def test_fit_learns_easy_problem_convnext_atto(
    samples: list, pre: Preprocessor, tmp_path: Path
) -> None:
    # Prepare
    set_seed(0)
    model = create_classifier("convnext_atto", 4)
    cfg = TrainConfig(
        epochs=5, batch_size=8, lr=5e-4, warmup_epochs=0.5, augment=False, early_stopping_patience=0
    )
    train = make_loader(samples, pre, train=True, batch_size=8, seed=0)
    val = make_loader(samples, pre, train=False, batch_size=48)
    # Execute
    res = fit(model, train, val, cfg, classes=CLASS_NAMES, out_dir=tmp_path, progress=False)
    # Assert
    losses = [h["train_loss"] for h in res.history]
    assert len(res.history) == 5 and not res.stopped_early
    assert losses[-1] < losses[0]
    assert res.best_val_macro_f1 >= 0.6  # chance is 0.25
    assert (tmp_path / "history.json").is_file()
    # The model holds the best weights when fit returns.
    assert evaluate(model, val)["macro_f1"] == pytest.approx(res.best_val_macro_f1)


def test_fit_is_reproducible_and_stops_early(samples: list, pre: Preprocessor) -> None:
    def run() -> list[float]:
        set_seed(1)
        model = TinyNet()
        cfg = TrainConfig(epochs=30, batch_size=16, lr=1e-6, early_stopping_patience=2)
        train = make_loader(samples, pre, train=True, batch_size=16, augment=True, seed=1)
        val = make_loader(samples, pre, train=False, batch_size=48)
        res = fit(model, train, val, cfg, classes=CLASS_NAMES, progress=False)
        assert res.stopped_early and len(res.history) < 30
        return [h["train_loss"] for h in res.history]

    assert run() == run()


def test_predict_returns_logits_in_order(samples: list, pre: Preprocessor) -> None:
    model = TinyNet().eval()
    loader = make_loader(samples, pre, train=False, batch_size=7)
    logits, labels = predict(model, loader)
    assert logits.shape == (len(samples), 4) and logits.dtype == np.float32
    assert labels.tolist() == [s.label for s in samples]
    x0 = next(iter(loader))[0][:1]
    assert np.allclose(logits[0], model(x0).detach().numpy()[0], atol=1e-5)


def test_bf16_and_channels_last_run(samples: list, pre: Preprocessor) -> None:
    """Breaks if ``bf16=True`` does not run the convolutions in bfloat16 autocast, or if
    channels-last inputs are not fed (explicitly in training, by following the model's memory
    format in prediction); the plain run must show float32 and NCHW, so either path is seen."""
    set_seed(0)
    model = TinyNet().to(memory_format=torch.channels_last)
    loader = make_loader(samples[:8], pre, train=True, batch_size=8)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    seen: list[tuple[bool, torch.dtype]] = []
    layout: list[bool] = []
    model.register_forward_pre_hook(
        lambda _m, args: layout.append(args[0].is_contiguous(memory_format=torch.channels_last))
    )
    model.features[0].register_forward_hook(
        lambda _m, _i, out: seen.append((layout[-1], out.dtype))
    )
    stats = train_one_epoch(
        model, loader, opt, loss_fn=nn.CrossEntropyLoss(), bf16=True, channels_last=True
    )
    logits, _ = predict(model, loader, bf16=True)
    assert math.isfinite(stats["loss"]) and np.isfinite(logits).all()
    assert seen == [(True, torch.bfloat16), (True, torch.bfloat16)]  # train batch, predict batch
    seen.clear()
    train_one_epoch(model, loader, opt, loss_fn=nn.CrossEntropyLoss(), channels_last=False)
    assert seen == [(False, torch.float32)]


def test_smote_refit_balances_embeddings(easy_dir: Path, pre: Preprocessor) -> None:
    all_s = scan_dataset(easy_dir)
    imb = [s for s in all_s if s.label in (0, 1)] + [
        s for c in (2, 3) for s in [x for x in all_s if x.label == c][:4]
    ]
    set_seed(0)
    model = TinyNet()
    loader = make_loader(imb, pre, train=False, batch_size=16)
    info = smote_refit_head(model, loader, loader, TrainConfig(smote_epochs=5), num_classes=4)
    assert info["counts_before"] == [12, 12, 4, 4]
    assert info["counts_after"] == [12, 12, 12, 12]
    assert info["k_neighbors"] == 3
    assert info["kept"] == (info["val_macro_f1_after"] >= info["val_macro_f1_before"])
    # The reported macro-F1 is that of the model as it stands.
    assert evaluate(model, loader)["macro_f1"] == pytest.approx(
        info["val_macro_f1_after"] if info["kept"] else info["val_macro_f1_before"]
    )


def test_smote_skips_when_a_class_has_one_image(easy_dir: Path, pre: Preprocessor) -> None:
    all_s = scan_dataset(easy_dir)
    one = [s for s in all_s if s.label == 0] + [next(s for s in all_s if s.label == 1)]
    loader = make_loader(one, pre, train=False, batch_size=16)
    info = smote_refit_head(TinyNet(), loader, loader, TrainConfig(), num_classes=4)
    assert "skipped" in info


def test_fit_requires_smote_loader(samples: list, pre: Preprocessor) -> None:
    loader = make_loader(samples, pre, train=False, batch_size=16)
    with pytest.raises(ValueError, match="smote_loader"):
        fit(TinyNet(), loader, loader, TrainConfig(smote=True), classes=CLASS_NAMES, progress=False)


def test_cache_serves_later_epochs_from_memory(tmp_path: Path, pre: Preprocessor) -> None:
    root = write_easy_dataset(tmp_path / "d", per_class=2)
    s = scan_dataset(root)
    loader = make_loader(s, pre, train=False, batch_size=8, cache=True)
    first = next(iter(loader))[0]
    for sample in s:
        sample.path.unlink()  # a second pass can only succeed from the cache
    assert torch.equal(next(iter(loader))[0], first)
    uncached = make_loader(s, pre, train=False, batch_size=8)
    with pytest.raises(DataError, match="not found"):
        next(iter(uncached))
