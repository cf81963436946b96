"""Federated core: run config, trainable-tensor transport, strategies, simulation, resume."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch

from flower_helpers import train_round
from kidneyscan.federated import task
from kidneyscan.federated.strategies import (
    RecordingStrategy,
    StrategyError,
    build_strategy,
    check_robustness,
)

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- run config


def test_defaults_mirror_pyproject_flower_table() -> None:
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    flwr_app = pyproject["tool"]["flwr"]["app"]

    assert flwr_app["components"]["serverapp"] == "kidneyscan.federated.server_app:app"
    assert flwr_app["components"]["clientapp"] == "kidneyscan.federated.client_app:app"
    assert flwr_app["config"] == task.DEFAULTS


def test_run_config_precedence_and_coercion(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(task.CONFIG_ENV, json.dumps({"strategy": "fedprox", "lr": 0.5}))

    cfg = task.run_config({"lr": "0.25", "transport-fp16": "true", "dp": "none"})

    assert cfg["strategy"] == "fedprox"  # from the environment layer
    assert cfg["lr"] == 0.25  # Flower's run config wins, coerced to float
    assert cfg["transport-fp16"] is True
    assert cfg["dp"] == "none"  # keys of other areas pass through
    assert cfg["num-server-rounds"] == task.DEFAULTS["num-server-rounds"]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"num-server-rounds": "many"}, "num-server-rounds='many' is not a valid int"),
        ({"num-server-rounds": 0}, "num-server-rounds must be >= 1"),
        ({"fraction-train": 1.5}, "fraction-train must be in"),
        ({"model-kwargs": "{oops"}, "model-kwargs must be JSON"),
        ({"augment": "maybe"}, "augment='maybe' is not a valid bool"),
        ({"server-momentum": 1.0}, r"server-momentum must be in \[0, 1\)"),
        ({"fedavgm-server-lr": 0.0}, "fedavgm-server-lr must be > 0"),
        ({"lr-schedule": "step"}, "lr-schedule must be one of constant, cosine, got 'step'"),
        ({"warmup-epochs": -1.0}, "warmup-epochs must be >= 0"),
        ({"optimizer-state": "share"}, "optimizer-state must be one of fresh, keep, got 'share'"),
    ],
)
def test_bad_run_config_is_named(override: dict, message: str) -> None:
    with pytest.raises(task.FederatedConfigError, match=message):
        task.run_config(override)


# --------------------------------------------------------------------------- transport


def _tiny_model() -> torch.nn.Module:
    cfg = task.run_config({"model": "convnext_atto", "image-size": 32})
    model = task.build_model(cfg)
    # Freeze everything but the last stage and the head, as the hybrid freezes its backbone.
    for name, p in model.named_parameters():
        p.requires_grad = name.startswith(("stages.3", "head"))
    return model


def test_same_seed_builds_identical_models() -> None:
    a, b = _tiny_model(), _tiny_model()

    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb
        assert torch.equal(va, vb)


def test_demo_trains_the_default_hybrids_head_on_one_cached_view(tmp_path: Path) -> None:
    """Breaks if the demo leaves the CT-pretrained default (random or unfrozen backbone), its
    head cannot run on cached features, or each hospital would extract two views."""
    # Prepare: the demo's run config
    from kidneyscan.federated.simulation import demo_config
    from kidneyscan.models.frozen import FrozenSplit

    prepared = {"num-clients": 3, "partition-file": "p.csv", "test-file": "t.csv",
                "split-file": "s.csv"}  # fmt: skip
    cfg = task.run_config(demo_config(tmp_path, prepared, rounds=1, local_epochs=1, seed=0))

    # Execute
    model = task.build_model(cfg)
    split = FrozenSplit(model)
    store = task.feature_store(split, cfg, task.build_preprocessor(cfg))

    # Assert
    trainable = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert "backbone" not in trainable and trainable
    from kidneyscan.models.factory import weights_provenance

    provenance = weights_provenance(model) or {}
    # The offline CT encoder (deflated I3D kernels), not random or ImageNet weights.
    assert provenance.get("source", "").startswith("astra")
    assert provenance.get("deflated", 0) > 100
    from kidneyscan.models.ct_resnet import ASTRA_SHA256

    assert provenance.get("sha256") == ASTRA_SHA256
    assert store.views == ("orig",)
    assert task.build_preprocessor(cfg).input_size == (224, 336)
    # The phantom's band is mostly bowel and fat: the demo masks all but the kidneys.
    assert [s["name"] for s in task.build_preprocessor(cfg).steps] == ["crop_kidney_band_masked"]
    # Options given to the demo go over its own, which stay unless overridden.
    other = demo_config(tmp_path, prepared, rounds=1, local_epochs=1, seed=0,
                        model_kwargs={"token_pool": 1, "token_drop": 0.75})  # fmt: skip
    assert json.loads(other["model-kwargs"]) == {"flip_tta": False, "token_pool": 1,
                                                 "token_drop": 0.75}  # fmt: skip


def test_demo_trains_every_hospital_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Breaks if the demo lets Ray see fewer CPUs than hospitals: on a 2-core laptop two
    hospitals would train, then the third alone with one core idle."""
    from kidneyscan.federated import simulation

    seen: dict = {}

    def fake_simulate(config: dict, **kwargs: object) -> dict:
        seen.update(kwargs)
        return {}

    monkeypatch.setattr(simulation, "cache_site_features", lambda cfg: None)
    monkeypatch.setattr(simulation, "simulate", fake_simulate)
    monkeypatch.setattr(simulation.os, "cpu_count", lambda: 2)
    simulation.demo_federated(tmp_path, n=80, sites=3)
    assert seen == {"num_clients": 3, "total_cpus": 3}
    assert simulation.demo_ray_cpus(3, cores=16) == 16  # more cores: all of them, as before


def test_only_trainable_tensors_travel_and_round_trip() -> None:
    model = _tiny_model()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters()}

    named = task.to_named(model)
    sent = {k: v + 1.0 for k, v in named.items()}
    task.from_named(model, sent)

    assert set(named) == trainable
    assert 0 < len(named) < len(frozen_before)
    for name, p in model.named_parameters():
        expected = frozen_before[name] + (1.0 if name in trainable else 0.0)
        assert torch.allclose(p.detach(), expected), name


def test_fp16_transport_halves_bytes_and_round_trips_within_precision() -> None:
    model = _tiny_model()
    full, half = task.to_named(model), task.to_named(model, fp16=True)

    task.from_named(model, half)

    assert task.payload_bytes(half) * 2 == task.payload_bytes(full)
    for key, arr in task.to_named(model).items():
        np.testing.assert_allclose(arr, full[key], rtol=1e-3, atol=1e-4)


def test_mismatched_arrays_are_rejected_with_names() -> None:
    model = _tiny_model()
    named = task.to_named(model)
    key = next(iter(named))

    with pytest.raises(ValueError, match="missing"):
        task.from_named(model, {k: v for k, v in named.items() if k != key})
    with pytest.raises(ValueError, match="has shape"):
        task.from_named(model, {**named, key: np.zeros((1, 2), np.float32)})


# --------------------------------------------------------------------------- strategies


@pytest.mark.parametrize(
    ("name", "cls_name"),
    [
        ("fedavg", "FedAvg"),
        ("fedavgm", "FedAvgM"),
        ("fedprox", "FedProx"),
        ("fedadam", "FedAdam"),
        ("fedyogi", "FedYogi"),
        ("fedmedian", "FedMedian"),
        ("fedtrimmedavg", "FedTrimmedAvg"),
        ("krum", "Krum"),
    ],
)
def test_strategy_selection(name: str, cls_name: str) -> None:
    cfg = task.run_config({"strategy": name, "min-clients": 3, "proximal-mu": 0.1})

    strategy = build_strategy(cfg)

    assert type(strategy).__name__ == cls_name
    assert strategy.min_train_nodes == 3
    if name == "fedprox":
        assert strategy.proximal_mu == pytest.approx(0.1)
    if name == "fedavgm":  # the run config's server momentum and rate, not Flower's defaults
        assert strategy.server_momentum == pytest.approx(task.DEFAULTS["server-momentum"])
        assert strategy.server_learning_rate == pytest.approx(task.DEFAULTS["fedavgm-server-lr"])


def test_unknown_strategy_is_named() -> None:
    with pytest.raises(StrategyError, match="unknown strategy 'fedfoo'"):
        build_strategy(task.run_config({"strategy": "fedfoo"}))


@pytest.mark.parametrize(
    ("strategy", "clients", "attackers", "ok"),
    [
        ("krum", 4, 1, False),  # needs n > 2f + 2 = 4
        ("krum", 5, 1, True),
        ("krum", 7, 2, True),
        ("fedmedian", 2, 1, False),
        ("fedmedian", 3, 1, True),
        ("fedtrimmedavg", 4, 1, False),  # floor(0.2 * 4) = 0 trimmed < 1
        ("fedtrimmedavg", 5, 1, True),
        ("fedavg", 10, 1, False),  # averaging is not robust at all
        ("fedavg", 2, 0, True),
    ],
)
def test_robust_aggregation_start_up_check(
    strategy: str, clients: int, attackers: int, ok: bool
) -> None:
    if ok:
        check_robustness(strategy, clients, attackers, beta=0.2)
    else:
        with pytest.raises(StrategyError, match=f"{attackers} assumed attacker"):
            check_robustness(strategy, clients, attackers, beta=0.2)


def test_build_strategy_runs_the_robustness_check() -> None:
    cfg = task.run_config({"strategy": "krum", "min-clients": 3, "assumed-attackers": 1})

    with pytest.raises(StrategyError, match="Krum"):
        build_strategy(cfg)


@pytest.mark.usefixtures("task_identity")
def test_fedavgm_applies_server_momentum_through_the_recorder() -> None:
    """Breaks if FedAvgM is not what ``fedavgm`` builds, loses its round-1 reference weights
    behind the recorder, or ignores the run config's momentum / rate: with every site moving
    the model by -1 each round, round 2 must move it by lr * (1 + momentum), plain FedAvg by 1."""
    cfg = task.run_config(
        {"strategy": "fedavgm", "min-clients": 3, "server-momentum": 0.5, "fedavgm-server-lr": 2.0}
    )
    strategy = RecordingStrategy(build_strategy(cfg))
    w0 = np.full(4, 10.0, np.float32)

    w1 = train_round(strategy, 1, w0, [w0 - 1] * 3, [5, 5, 5])
    w2 = train_round(strategy, 2, w1, [w1 - 1] * 3, [5, 5, 5])

    np.testing.assert_allclose(w1, w0 - 2.0 * 1.0, rtol=1e-6)
    np.testing.assert_allclose(w2, w1 - 2.0 * (0.5 * 1.0 + 1.0), rtol=1e-6)


def test_recorder_delegates_to_inner_strategy() -> None:
    inner = build_strategy(task.run_config({"strategy": "fedavg"}))

    wrapped = RecordingStrategy(inner, fp16=True)

    assert wrapped.inner is inner
    assert wrapped.rounds == {}


# --------------------------------------------------------------------------- simulation


# freeze_fraction is explicit: without weights the app trains the whole backbone (tested below),
# and these tests exercise the frozen part staying at each site.
HYBRID = {
    "model": "hybrid",
    "model-kwargs": json.dumps(
        {
            "backbone": "convnext_atto",
            "embed_dim": 64,
            "depth": 1,
            "num_heads": 4,
            "freeze_fraction": 0.8,
        }
    ),
    "image-size": 64,
}


@pytest.fixture(scope="module")
def federated_run(phantom_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """2 rounds, 3 phantom hospitals (one per site), tiny hybrid, sites keeping their AdamW
    state, via the CLI; shared below."""
    from typer.testing import CliRunner

    from kidneyscan.cli import app

    out = tmp_path_factory.mktemp("fed") / "run"
    result = CliRunner().invoke(
        app,
        [
            "federate",
            "--data", str(phantom_dir),
            "--clients", "3",
            "--rounds", "2",
            "--partitioning", "site",
            "--strategy", "fedprox",
            "--model", "hybrid",
            "--model-kwargs", HYBRID["model-kwargs"],
            "--image-size", "64",
            "--batch-size", "8",
            "--fp16",
            "--optimizer-state", "keep",
            "--out", str(out),
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    return phantom_dir, out


@pytest.mark.slow
def test_two_round_simulation_writes_a_servable_checkpoint(federated_run: tuple) -> None:
    """Breaks if the per-round test macro-F1 / accuracy are computed wrongly (another average,
    another split), or if the checkpoint saved is not the selected round's model: the selected
    round's numbers must equal those that metrics.json gets from the reloaded checkpoint
    through :func:`kidneyscan.evaluation.metrics.classification_metrics`."""
    from kidneyscan.models.checkpoint import load_checkpoint

    _, out = federated_run
    summary = json.loads((out / "federation.json").read_text())
    history = json.loads((out / "curves.json").read_text())
    metrics = json.loads((out / "metrics.json").read_text())
    model, meta = load_checkpoint(out / "checkpoint")

    assert summary["completed_round"] == 2
    assert [r["round"] for r in history] == [1, 2]
    for row in history:
        assert sorted(c["partition-id"] for c in row["clients"]) == [0, 1, 2]
        assert all(np.isfinite(c["train-loss"]) for c in row["clients"])
        assert row["failures"] == []
    selected = history[int(summary["best"]["round"]) - 1]
    assert selected["test-macro-f1"] == pytest.approx(metrics["macro"]["f1"], abs=1e-6)
    assert selected["test-accuracy"] == pytest.approx(metrics["accuracy"], abs=1e-6)
    assert meta["classes"] == ["Cyst", "Normal", "Stone", "Tumor"]
    assert meta["preprocessing"]["image_size"] == 64
    assert meta["training"]["mode"] == "federated"
    # Calibrated like a central checkpoint: the sites' pooled NLL curve picks the temperature.
    assert meta["temperature"] == selected["val-temperature"] in task.TEMPERATURES
    assert metrics["temperature"] == meta["temperature"]
    assert model(torch.zeros(1, 3, 64, 64)).shape == (1, 4)
    assert (out / "curves.png").stat().st_size > 0
    assert (out / "metrics.json").is_file()


@pytest.mark.slow
def test_bytes_per_round_match_fp16_trainable_payload(federated_run: tuple) -> None:
    _, out = federated_run
    history = json.loads((out / "curves.json").read_text())
    model = task.build_model(task.run_config(HYBRID))
    expected_per_client = task.payload_bytes(task.to_named(model, fp16=True))
    all_tensors = sum(v.numel() * 2 for v in model.state_dict().values())

    assert expected_per_client < 0.8 * all_tensors  # the frozen backbone stays home
    for row in history:
        assert [c["bytes-up"] for c in row["clients"]] == [expected_per_client] * 3
        assert row["bytes-up"] == 3 * expected_per_client


@pytest.mark.slow
def test_each_client_trained_only_on_its_own_site(federated_run: tuple) -> None:
    from kidneyscan.data.partition import load_partition
    from kidneyscan.data.splits import load_split

    _, out = federated_run
    parts = load_partition(out / "partitions.csv")
    test = load_partition(out / "test.csv")[0]
    history = json.loads((out / "curves.json").read_text())
    local_val = task.DEFAULTS["local-val-fraction"]

    train_paths = {str(s.path) for p in parts for s in p}
    assert train_paths.isdisjoint(str(s.path) for s in test)
    split = load_split(out / "split.csv")  # the standard split file, for `kidneyscan evaluate`
    assert {str(s.path) for s in split["test"]} == {str(s.path) for s in test}
    assert {str(s.path) for s in split["train"] + split["val"]} == train_paths
    assert [{s.site for s in p} for p in parts] == [{"site0"}, {"site1"}, {"site2"}]
    for c in history[0]["clients"]:
        part = parts[c["partition-id"]]
        expected, held_out = task.split_local(part, float(local_val), 0)
        assert c["num-examples"] == len(expected)
        assert {str(s.path) for s in held_out} <= {str(s.path) for s in split["val"]}


@pytest.mark.slow
def test_sites_keep_their_optimizer_state_between_rounds(federated_run: tuple) -> None:
    """Breaks if the simulation hands a site a new Context each round (the kept AdamW state
    would be lost and the step count restart)."""
    _, out = federated_run
    history = json.loads((out / "curves.json").read_text())
    steps = [{c["partition-id"]: c["optimizer-steps"] for c in r["clients"]} for r in history]
    assert set(steps[0]) == {0, 1, 2} and all(n > 0 for n in steps[0].values())
    assert steps[1] == {pid: 2 * n for pid, n in steps[0].items()}


@pytest.mark.slow
def test_resume_continues_from_the_last_global_state(federated_run: tuple) -> None:
    from kidneyscan.federated.server_app import load_state
    from kidneyscan.federated.simulation import simulate

    _, out = federated_run
    before = json.loads((out / "curves.json").read_text())
    run_cfg = json.loads((out / "run_config.json").read_text())
    named_before, _ = load_state(out)

    summary = simulate({**run_cfg, "num-server-rounds": 3, "resume": True}, num_clients=3)

    after = json.loads((out / "curves.json").read_text())
    named_after, state = load_state(out)
    assert summary["completed_round"] == 3
    assert [r["round"] for r in after] == [1, 2, 3]
    assert after[:2] == before  # earlier rounds kept, not re-run
    assert state["completed_round"] == 3
    assert any(not np.array_equal(named_before[k], named_after[k]) for k in named_before)


@pytest.mark.slow
def test_dp_run_stops_before_the_epsilon_budget(phantom_dir: Path, tmp_path: Path) -> None:
    from kidneyscan.data.datasets import scan_dataset
    from kidneyscan.federated.privacy import PrivacyAccountant
    from kidneyscan.federated.simulation import prepare_run, simulate

    sigma, delta = 1.0, 1e-5
    acc = PrivacyAccountant(sigma, 1.0, delta)
    budget = (acc.epsilon_after(2) + acc.epsilon_after(3)) / 2  # affords 2 of 4 rounds
    out = tmp_path / "dp"
    prepared = prepare_run(scan_dataset(phantom_dir), out, num_clients=2, partitioning="iid")
    cfg = {
        "model": "small_cnn",
        "image-size": 32,
        "batch-size": 8,
        "num-server-rounds": 4,
        "out-dir": str(out),
        "partition-file": prepared["partition-file"],
        "test-file": prepared["test-file"],
        "num-clients": 2,
        "dp": "server-fixed",
        "dp-noise-multiplier": sigma,
        "dp-clipping-norm": 1.0,
        "dp-delta": delta,
        "dp-epsilon-budget": budget,
    }

    summary = simulate(cfg, num_clients=2)

    history = json.loads((out / "curves.json").read_text())
    eps = [r["dp-epsilon"] for r in history]
    assert summary["completed_round"] == 2
    assert "privacy budget" in summary["stopped_reason"]
    assert eps == sorted(eps) and eps[-1] <= budget
    assert eps[-1] == pytest.approx(acc.epsilon_after(2), rel=1e-6)


def test_hybrid_without_weights_trains_its_whole_backbone() -> None:
    cfg = task.run_config(
        {"model": "hybrid", "model-kwargs": json.dumps({"backbone": "convnext_atto"})}
    )
    assert task.model_spec(cfg)["kwargs"]["freeze_fraction"] == 0.0
    with_weights = task.run_config(
        {
            "model": "hybrid",
            "model-kwargs": json.dumps({"backbone": "convnext_atto", "weights": "w.pt"}),
        }
    )
    assert "freeze_fraction" not in task.model_spec(with_weights)["kwargs"]


def test_pooled_site_nll_curves_give_the_central_temperature() -> None:
    """Breaks if the sites' NLL curves are pooled without their sizes, or the pick is not the
    pooled minimum: the temperature must be the one central temperature scaling fits on all
    hold-out logits together (within one step of the grid)."""
    # Prepare: a big overconfident site and a small underconfident one
    from flwr.app import MetricRecord, RecordDict

    from kidneyscan.evaluation.calibration import fit_temperature
    from kidneyscan.federated.strategies import _metrics_aggr

    rng = np.random.default_rng(0)
    sites = []
    for n, scale in ((400, 4.0), (40, 0.3)):
        labels = rng.integers(0, 4, n)
        logits = rng.normal(0, 1, (n, 4))
        logits[np.arange(n), labels] += 1.0
        sites.append((logits * scale, labels))
    replies = [
        RecordDict({"metrics": MetricRecord({
            "eval-nll-by-temperature": task.nll_by_temperature(z, y), "num-examples": len(y)})})
        for z, y in sites
    ]  # fmt: skip

    # Execute: the strategies' metric aggregation, then the server's pick
    pooled = _metrics_aggr(replies, "num-examples")["eval-nll-by-temperature"]
    picked = task.pick_temperature(pooled)

    # Assert
    central = fit_temperature(
        np.concatenate([z for z, _ in sites]), np.concatenate([y for _, y in sites])
    )
    step = np.log(task.TEMPERATURES[1] / task.TEMPERATURES[0])
    assert abs(np.log(picked / central)) <= step
    unweighted = np.mean([task.nll_by_temperature(z, y) for z, y in sites], axis=0)
    assert abs(np.log(task.pick_temperature(list(unweighted)) / central)) > step  # sensitive
    with pytest.raises(ValueError, match="expected 49"):
        task.pick_temperature([1.0, 2.0])


def test_federate_cli_passes_the_server_optimiser_settings(
    phantom_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Breaks if ``kidneyscan federate`` drops a server-side setting (FedAdam / FedYogi rate and
    tau, FedAvgM momentum and rate) or the local optimiser choice on its way to the run config;
    a bad value is refused before Ray starts, naming the key."""
    from typer.testing import CliRunner

    from kidneyscan.cli import app
    from kidneyscan.federated import simulation

    seen: dict = {}

    def fake_simulate(config: dict, **_: object) -> dict:
        seen.update(task.run_config(config))
        return {"completed_round": 0, "best": {}}

    base = ["federate", "--data", str(phantom_dir), "--clients", "3", "--partitioning", "site"]
    settings = ["--strategy", "fedavgm", "--server-momentum", "0.5", "--fedavgm-server-lr",
                "0.7", "--server-lr", "0.02", "--server-tau", "0.003",
                "--optimizer-state", "keep"]  # fmt: skip
    with monkeypatch.context() as m:
        m.setattr(simulation, "simulate", fake_simulate)
        result = CliRunner().invoke(app, [*base, *settings, "--out", str(tmp_path / "a")])
    assert result.exit_code == 0, result.output
    assert (seen["strategy"], seen["server-momentum"], seen["fedavgm-server-lr"]) == (
        "fedavgm",
        0.5,
        0.7,
    )
    assert (seen["server-lr"], seen["server-tau"], seen["optimizer-state"]) == (0.02, 0.003, "keep")
    bad = CliRunner().invoke(app, [*base, "--server-momentum", "1.0", "--out", str(tmp_path / "b")])
    assert bad.exit_code == 2
    assert "server-momentum must be in [0, 1)" in bad.output
