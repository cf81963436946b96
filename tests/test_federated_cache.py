"""Opt-in cached frozen features in the federated client's local training (cache-features)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn as nn

from kidneyscan.federated import task

HYBRID = {"backbone": "convnext_atto", "embed_dim": 32, "depth": 1, "num_heads": 4,
          "freeze_fraction": 0.5, "dropout": 0.0}  # fmt: skip


def _cfg(monkeypatch: pytest.MonkeyPatch, **over: Any) -> dict[str, Any]:
    monkeypatch.delenv(task.CONFIG_ENV, raising=False)
    base = {"model": "hybrid", "model-kwargs": json.dumps(HYBRID), "cache-features": True,
            "local-epochs": 2, "batch-size": 4, "lr": 0.01}  # fmt: skip
    return task.run_config({**base, **over})


def _samples(phantom_dir: Path) -> list:
    from kidneyscan.data.datasets import scan_dataset

    return scan_dataset(phantom_dir)[:12]


def _count_features(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list[int]:
    """Count frozen-prefix forward passes, through PyTorch or ONNX Runtime (the extraction
    engine depends on the CPU); the on-disk cache lives under ``tmp_path``."""
    from kidneyscan.features import CACHE_ENV, OnnxPrefix
    from kidneyscan.models.frozen import FrozenSplit

    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "features"))
    calls = [0]
    for cls, name in ((FrozenSplit, "features"), (OnnxPrefix, "__call__")):
        original = getattr(cls, name)

        def counting(self: Any, x: torch.Tensor, original: Any = original) -> torch.Tensor:
            calls[0] += 1
            out: torch.Tensor = original(self, x)
            return out

        monkeypatch.setattr(cls, name, counting)
    return calls


def _frozen(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}


def _trainable(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_cached_local_training_computes_features_once_across_epochs_rounds_and_runs(
    phantom_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    tmp_path: Path,
) -> None:
    # Prepare
    cfg = _cfg(monkeypatch)
    samples = _samples(phantom_dir)
    calls = _count_features(monkeypatch, tmp_path)
    model = task.build_model(cfg)
    frozen_before, trainable_before = _frozen(model), _trainable(model)
    # Execute: round 1 (2 local epochs, FedProx on), then round 2 on a fresh model that got
    # only the trainable tensors, as the ClientApp does.
    with caplog.at_level(logging.INFO, logger="kidneyscan"):
        stats = task.train_local(model, samples, cfg, proximal_mu=0.01, server_round=1)
        calls_round1 = calls[0]
        model2 = task.build_model(cfg)
        task.from_named(model2, task.to_named(model))
        task.train_local(model2, samples, cfg, proximal_mu=0.01, server_round=2)
    # Assert
    assert stats["num-examples"] == 12  # accuracy / loss: a test below
    assert calls_round1 == 4  # 12 images in batches of 8, original + flipped view, once
    assert calls[0] == calls_round1  # round 2 read the cache
    assert "pixels are not augmented" in caplog.text
    assert "computing 12 of 12 images" in caplog.text
    assert list((tmp_path / "features").rglob("*.safetensors"))  # on disk: later runs reuse it
    assert all(torch.equal(p, frozen_before[n]) for n, p in _frozen(model).items())
    changed = [n for n, p in _trainable(model).items() if not torch.equal(p, trainable_before[n])]
    assert "head.weight" in changed


def test_cache_is_rebuilt_when_frozen_weights_differ(
    phantom_dir: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # Prepare
    cfg = _cfg(monkeypatch, **{"local-epochs": 1})
    samples = _samples(phantom_dir)
    calls = _count_features(monkeypatch, tmp_path)
    task.train_local(task.build_model(cfg), samples, cfg, proximal_mu=0.0)
    other = task.build_model(cfg)
    with torch.no_grad():
        next(p for p in other.parameters() if not p.requires_grad).add_(0.5)
    # Execute
    task.train_local(other, samples, cfg, proximal_mu=0.0)
    task.train_local(task.build_model(cfg), samples, cfg, proximal_mu=0.0)
    # Assert: the changed prefix has its own cache; the original one is still there
    assert calls[0] == 8
    assert len({p.parent.parent for p in (tmp_path / "features").rglob("*.safetensors")}) == 2


@pytest.mark.parametrize(
    ("model", "kwargs"),
    [("convnext_atto", {}), ("hybrid", {**HYBRID, "freeze_fraction": 0.0})],
    ids=["not-hybrid", "nothing-frozen"],
)
def test_cache_features_warns_and_trains_normally_when_not_applicable(
    phantom_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    tmp_path: Path,
    model: str,
    kwargs: dict,
) -> None:
    # Prepare
    cfg = _cfg(monkeypatch, model=model, **{"model-kwargs": json.dumps(kwargs), "local-epochs": 1})
    calls = _count_features(monkeypatch, tmp_path)
    net = task.build_model(cfg)
    before = _trainable(net)
    # Execute
    with caplog.at_level(logging.WARNING, logger="kidneyscan.federated.task"):
        stats = task.train_local(net, _samples(phantom_dir), cfg)
    # Assert
    assert "cache-features does not apply" in caplog.text
    assert calls[0] == 0 and not (tmp_path / "features").exists()
    assert stats["num-examples"] == 12
    assert any(not torch.equal(p, before[n]) for n, p in _trainable(net).items())


def test_cached_local_training_reports_the_epochs_accuracy_and_loss(
    phantom_dir: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Breaks if the cached path reports another accuracy or loss than its epoch had (e.g. a
    batch's, or unweighted per batch): with a vanishing learning rate nothing moves, so they must
    equal :func:`task.evaluate_model` on the same images through the full model (pixels)."""
    # Prepare: no augmentation, no label smoothing, lr 1e-12 (0 is refused; AdamW steps are
    # about lr in size and its decay is lr-scaled, so nothing moves measurably)
    cfg = _cfg(monkeypatch, **{"lr": 1e-12, "augment": False, "label-smoothing": 0.0,
                               "local-epochs": 1, "batch-size": 5})  # fmt: skip
    from kidneyscan.data.datasets import scan_dataset

    # 12 images, 6 / 3 / 2 / 1 per class (an arg-min would not score like the arg-max),
    # in batches of 5, 5, 2 (an unweighted mean over batches would differ)
    every = scan_dataset(phantom_dir)
    by_label = sorted({s.label for s in every})
    samples = [s for n, lab in zip((6, 3, 2, 1), by_label, strict=True)
               for s in [x for x in every if x.label == lab][:n]]  # fmt: skip
    _count_features(monkeypatch, tmp_path)
    model = task.build_model(cfg)
    # Lean the random head towards the most common class, so accuracy is not a trivial 0.
    labels = [s.label for s in samples]
    with torch.no_grad():
        model.get_classifier().bias[max(set(labels), key=labels.count)] += 5.0
    # Execute
    stats = task.train_local(model, samples, cfg, proximal_mu=0.0, server_round=1)
    want, _, _ = task.evaluate_model(model, samples, {**cfg, "cache-features": False})
    # Assert (features are cached in bfloat16 where the CPU has it: the loss to 1 %)
    assert stats["num-examples"] == want["num-examples"] == 12
    assert 0.0 < want["accuracy"] < 1.0
    assert stats["accuracy"] == pytest.approx(want["accuracy"], abs=1e-9)
    assert stats["loss"] == pytest.approx(want["loss"], rel=1e-2)


def test_cached_evaluation_matches_the_full_model_and_reads_the_cache(
    phantom_dir: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Breaks if evaluation on cached features drifts from the model on pixels (wrong view,
    a flip where the model has none, stale features) or recomputes what is cached."""
    # Prepare
    cfg = _cfg(monkeypatch, **{"augment": False})
    samples = _samples(phantom_dir)
    calls = _count_features(monkeypatch, tmp_path)
    model = task.build_model(cfg)
    # Execute
    cached, p_cached, y_cached = task.evaluate_model(model, samples, cfg)
    after_first = calls[0]
    again, _, _ = task.evaluate_model(model, samples, cfg)
    pixels, p_pixels, y_pixels = task.evaluate_model(
        model, samples, {**cfg, "cache-features": False}
    )
    # Assert
    assert after_first == 2 and calls[0] == after_first  # 12 images / 8, one view, once
    assert again == cached
    assert list(y_cached) == list(y_pixels)
    assert abs(p_cached - p_pixels).max() < 0.02  # bfloat16 features where the CPU has them
    assert cached["loss"] == pytest.approx(pixels["loss"], rel=1e-2)


def test_cached_epoch_applies_the_fedprox_term() -> None:
    # Prepare
    from kidneyscan.export.fasttrain import FeatureCache, FrozenSplit, train_epoch_cached
    from kidneyscan.models.factory import create_classifier

    def drift(mu: float) -> float:
        torch.manual_seed(0)
        model = create_classifier("hybrid", 4, image_size=64, **HYBRID)
        split = FrozenSplit(model)
        gen = torch.Generator().manual_seed(1)
        data = [(torch.randn(4, 3, 64, 64, generator=gen), torch.tensor([0, 1, 2, 3]))] * 2
        cache = FeatureCache(split, data)
        start = [p.detach().clone() for p in model.parameters()]
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
        for s in range(3):
            train_epoch_cached(split, cache, opt, nn.CrossEntropyLoss(), batch_size=4, seed=s,
                               proximal_mu=mu, global_params=start)  # fmt: skip
        pairs = zip(model.parameters(), start, strict=True)
        return float(sum(((p.detach() - g) ** 2).sum() for p, g in pairs))

    # Execute
    free, held = drift(0.0), drift(5.0)
    # Assert: the proximal term pulls the weights towards the global ones
    assert 0 < held < free
    torch.manual_seed(0)
    model = create_classifier("hybrid", 4, image_size=64, **HYBRID)
    split = FrozenSplit(model)
    cache = FeatureCache(split, [(torch.randn(2, 3, 64, 64), torch.tensor([0, 1]))])
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    with pytest.raises(ValueError, match="needs global_params"):
        train_epoch_cached(split, cache, opt, nn.CrossEntropyLoss(), proximal_mu=0.1)


def test_cosine_schedule_spans_the_rounds_and_reaches_the_local_epochs(
    phantom_dir: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Breaks if ``lr-schedule = "cosine"`` restarts each round, if ``train_local`` does not
    hand its scheduler to the epoch loop, or if ``"constant"`` stops being a flat rate: the
    rates the cached local epochs see over 3 rounds must be the central recipe's one warm-up +
    cosine schedule for 3 rounds x 2 local epochs."""
    from kidneyscan import engine
    from kidneyscan.config import TrainConfig
    from kidneyscan.optim import make_optimizer

    cfg = _cfg(monkeypatch, **{"lr-schedule": "cosine", "num-server-rounds": 3, "lr": 0.1,
                               "warmup-epochs": 1.0})  # fmt: skip
    samples = _samples(phantom_dir)  # 12 images, batch 4: 3 steps per local epoch
    _count_features(monkeypatch, tmp_path)
    seen: list[float] = []
    original = engine.train_one_epoch

    def recording(model: nn.Module, loader: Any, optimizer: Any, **kw: Any) -> dict[str, float]:
        assert kw["scheduler"] is not None

        def batches() -> Any:
            for batch in loader:  # the rate when a batch is drawn is the rate of its step
                seen.append(optimizer.param_groups[0]["lr"])
                yield batch

        return original(model, batches(), optimizer, **kw)

    monkeypatch.setattr(engine, "train_one_epoch", recording)
    model = task.build_model(cfg)
    for r in (1, 2, 3):
        task.train_local(model, samples, cfg, server_round=r)
    central, sched = make_optimizer(model, TrainConfig(epochs=6, lr=0.1, warmup_epochs=1.0), 3)
    want = []
    for _ in range(18):
        want.append(central.param_groups[0]["lr"])
        central.step()
        sched.step()
    assert seen == pytest.approx(want, abs=1e-12)
    assert seen[0] < seen[3] and seen[-1] < 0.01  # warm-up in round 1, decayed by round 3
    # Constant: a flat rate and no scheduler.
    opt, none = task.local_optimizer(model, {**cfg, "lr-schedule": "constant"},
                                     server_round=3, steps_per_epoch=3)  # fmt: skip
    assert none is None and {g["lr"] for g in opt.param_groups} == {0.1}


def test_kept_optimizer_state_continues_adam_and_keeps_this_rounds_rates(
    phantom_dir: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Breaks if ``optimizer-state = "keep"`` does not hand round r the moments of round r-1
    (the step count would restart, the update would equal a fresh optimiser's), if it rewinds
    the cosine schedule to the rates the state was saved at, or if "fresh" keeps anything."""
    samples = _samples(phantom_dir)  # 12 images, batch 4, 2 local epochs: 6 steps per round
    _count_features(monkeypatch, tmp_path)
    keep = _cfg(monkeypatch, **{"optimizer-state": "keep", "lr-schedule": "cosine",
                                "num-server-rounds": 3})  # fmt: skip
    fresh = {**keep, "optimizer-state": "fresh"}
    model = task.build_model(keep)
    first = task.train_local(model, samples, keep, server_round=1)
    start = task.to_named(model)
    assert first["optimizer-steps"] == 6 and "optimizer-state" in first
    # The state travels through bytes, as it does in the site's Flower Context.
    kept = task.unpack_optimizer_state(task.pack_optimizer_state(first["optimizer-state"]))
    # Round 2 from the same averaged weights, with and without the kept moments.
    runs = {}
    for name, cfg, state in (("keep", keep, kept), ("fresh", fresh, None)):
        net = task.build_model(cfg)
        task.from_named(net, start)
        stats = task.train_local(net, samples, cfg, server_round=2, optimizer_state=state)
        runs[name] = (stats, task.to_named(net))
    assert runs["keep"][0]["optimizer-steps"] == 12
    assert runs["fresh"][0]["optimizer-steps"] == 6 and "optimizer-state" not in runs["fresh"][0]
    head = "head.weight"
    assert not np.allclose(runs["keep"][1][head], runs["fresh"][1][head])
    # The rates are round 3's part of the schedule, not the ones the state was saved with.
    opt, _ = task.local_optimizer(model, keep, server_round=3, steps_per_epoch=3, state=kept)
    ref, _ = task.local_optimizer(model, fresh, server_round=3, steps_per_epoch=3)
    assert [g["lr"] for g in opt.param_groups] == [g["lr"] for g in ref.param_groups]
    assert [g["lr"] for g in opt.param_groups] != [
        g["lr"] for g in first["optimizer-state"]["param_groups"]
    ]
    assert int(next(iter(opt.state.values()))["step"]) == 6
    # A state of another model is refused, naming the setting.
    other = task.build_model({**keep, "model-kwargs": json.dumps({**HYBRID, "embed_dim": 16})})
    with pytest.raises(task.FederatedConfigError, match="optimizer-state=keep"):
        task.local_optimizer(other, keep, server_round=2, steps_per_epoch=3, state=kept)


def test_client_app_keeps_the_optimizer_state_in_its_context_only(
    phantom_dir: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, task_identity: None
) -> None:
    """Breaks if the ClientApp does not store the state in its node's Context between rounds,
    or if the state leaks into the reply (only trainable tensors and metrics may leave)."""
    from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict

    from kidneyscan.data.partition import save_partitions
    from kidneyscan.federated import client_app

    _count_features(monkeypatch, tmp_path)
    part = save_partitions([_samples(phantom_dir)], tmp_path / "partitions.csv")
    run_cfg = {"model": "hybrid", "model-kwargs": json.dumps(HYBRID), "cache-features": True,
               "batch-size": 4, "local-val-fraction": 0.25, "optimizer-state": "keep",
               "partition-file": str(part)}  # fmt: skip
    monkeypatch.delenv(task.CONFIG_ENV, raising=False)
    arrays = task.to_named(task.build_model(task.run_config(run_cfg)))
    context = Context(1, 1, {"partition-id": 0}, RecordDict(), run_cfg)
    steps, sent_keys = [], []
    for server_round in (1, 2):
        msg = Message(
            RecordDict({
                "arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
                "config": ConfigRecord({"server-round": server_round}),
            }),
            dst_node_id=1,
            message_type="train",
        )  # fmt: skip
        reply = client_app._train(msg, context)
        steps.append(reply.content["metrics"]["optimizer-steps"])
        sent_keys.append(set(reply.content.keys()))
        arrays = {k: v.numpy() for k, v in reply.content["arrays"].items()}
    assert steps == [3, 6]  # 9 training images at batch 4: 3 steps per round, continued
    assert client_app.OPTIMIZER_STATE_KEY in context.state
    assert sent_keys == [{"arrays", "metrics"}] * 2
    assert set(arrays) == set(task.trainable_keys(task.build_model(task.run_config(run_cfg))))
