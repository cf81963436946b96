"""DP settings, the Opacus accountant, Flower's DP wrappers and the budget stop."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from flower_helpers import train_round
from kidneyscan.federated import privacy
from kidneyscan.federated.privacy import DPConfig, PrivacyAccountant, PrivacyConfigError


@pytest.mark.parametrize(
    ("run_config", "message"),
    [
        ({"dp": "local-magic", "num-clients": 3}, "dp must be one of"),
        ({"dp": "server-fixed"}, "needs the number of clients"),
        ({"dp": "server-fixed", "num-clients": 3, "dp-noise-multiplier": 0}, "noise-multiplier"),
        ({"dp": "server-fixed", "num-clients": 3, "dp-delta": 1.5}, "dp-delta"),
        ({"dp": "server-fixed", "num-clients": 3, "dp-clipping-norm": "big"}, "must be a number"),
        ({"dp": "client-fixed", "num-clients": 3, "dp-sampled-clients": 4}, "exceeds"),
        ({"dp": "client-fixed", "num-clients": 2.5}, "positive integer"),
        ({"dp": "client-fixed", "num-clients": 3, "dp-epsilon-budget": -1}, "epsilon-budget"),
    ],
)
def test_dp_config_names_the_bad_setting(run_config: dict, message: str) -> None:
    with pytest.raises(PrivacyConfigError, match=message):
        DPConfig.from_run_config(run_config)


def test_dp_config_reads_keys_and_sampling_rate() -> None:
    config = DPConfig.from_run_config(
        {
            "dp": "Server-Fixed",
            "num-clients": 10,
            "dp-sampled-clients": 4,
            "dp-noise-multiplier": 1.2,
            "dp-clipping-norm": 0.5,
            "dp-delta": 1e-4,
            "dp-epsilon-budget": 0,
        }
    )
    assert config.mode == "server-fixed" and config.enabled
    assert config.sampling_rate == pytest.approx(0.4)
    assert (config.noise_multiplier, config.clipping_norm, config.delta) == (1.2, 0.5, 1e-4)
    assert config.epsilon_budget is None  # 0 means "report only"
    assert not DPConfig.from_run_config({}).enabled


def test_accountant_matches_opacus_stepwise_and_grows() -> None:
    # Prepare
    from opacus.accountants import RDPAccountant

    ours = PrivacyAccountant(noise_multiplier=1.1, sampling_rate=0.5, delta=1e-5)
    reference = RDPAccountant()

    # Execute
    reported = []
    for _ in range(6):
        reported.append(ours.step())
        reference.step(noise_multiplier=1.1, sample_rate=0.5)

    # Assert: same epsilon as stepping Opacus round by round; strictly increasing; delta fixed.
    assert reported[-1][0] == pytest.approx(reference.get_epsilon(delta=1e-5), rel=1e-9)
    epsilons = [eps for eps, _ in reported]
    assert all(b > a for a, b in zip(epsilons, epsilons[1:], strict=False))
    assert {d for _, d in reported} == {1e-5}
    assert [r for r, _ in ours.history] == [1, 2, 3, 4, 5, 6]


def test_accountant_is_below_the_classic_gaussian_rdp_bound() -> None:
    # Without sampling (q = 1) a round is the Gaussian mechanism: RDP alpha / (2 sigma^2);
    # the classic conversion eps = min_a T a / (2 sigma^2) + log(1/delta) / (a - 1) is an upper
    # bound of Opacus's (tighter) conversion over the same orders.
    sigma, rounds, delta = 2.0, 5, 1e-5
    accountant = PrivacyAccountant(sigma, 1.0, delta)
    from opacus.accountants import RDPAccountant

    classic = min(
        rounds * a / (2 * sigma**2) + math.log(1 / delta) / (a - 1)
        for a in RDPAccountant.DEFAULT_ALPHAS
        if a > 1
    )
    eps = accountant.epsilon_after(rounds)
    assert 0.5 * classic < eps <= classic + 1e-9


def test_budget_bisection_is_consistent() -> None:
    accountant = PrivacyAccountant(1.0, 1.0, 1e-5, epsilon_budget=None)
    budget = (accountant.epsilon_after(3) + accountant.epsilon_after(4)) / 2
    capped = PrivacyAccountant(1.0, 1.0, 1e-5, epsilon_budget=budget)
    assert capped.rounds_within_budget(10) == 3
    assert capped.rounds_within_budget(2) == 2
    assert not capped.would_exceed(3) and capped.would_exceed(4)
    capped.step()
    assert capped.rounds_within_budget(10) == 2
    assert not PrivacyAccountant(1.0, 1.0, 1e-5).would_exceed(1000)


def test_noise_for_epsilon_hits_the_target_and_is_the_smallest() -> None:
    from kidneyscan.federated.privacy import noise_for_epsilon

    for eps, rounds in ((1.0, 3), (10.0, 5)):
        z = noise_for_epsilon(eps, rounds=rounds, delta=1e-5)
        assert PrivacyAccountant(z, 1.0, 1e-5).epsilon_after(rounds) <= eps
        assert PrivacyAccountant(z * 0.99, 1.0, 1e-5).epsilon_after(rounds) > eps
    with pytest.raises(PrivacyConfigError, match="epsilon"):
        noise_for_epsilon(0.0, rounds=3)


@pytest.mark.parametrize(
    ("mode", "wrapper"),
    [
        ("server-fixed", "DifferentialPrivacyServerSideFixedClipping"),
        ("client-fixed", "DifferentialPrivacyClientSideFixedClipping"),
        ("server-adaptive", "DifferentialPrivacyServerSideAdaptiveClipping"),
        ("client-adaptive", "DifferentialPrivacyClientSideAdaptiveClipping"),
    ],
)
def test_wrap_strategy_picks_flower_wrapper(mode: str, wrapper: str) -> None:
    from flwr.serverapp.strategy import FedAvg

    inner = FedAvg()
    wrapped = privacy.wrap_strategy(inner, {"dp": mode, "num-clients": 3, "dp-epsilon-budget": 5})
    assert type(wrapped.strategy).__name__ == wrapper
    assert wrapped.strategy.strategy is inner
    assert wrapped.accountant.epsilon_budget == 5
    mods = privacy.client_mods({"dp": mode, "num-clients": 3})
    expected = {"client-fixed": ["fixedclipping_mod"], "client-adaptive": ["adaptiveclipping_mod"]}
    assert [m.__name__ for m in mods] == expected.get(mode, [])


def test_wrap_strategy_off_and_robust_rejected() -> None:
    from flwr.serverapp.strategy import FedAvg, FedMedian

    plain = FedAvg()
    assert privacy.wrap_strategy(plain, {"dp": "none"}) is plain
    with pytest.raises(PrivacyConfigError, match="FedMedian"):
        privacy.wrap_strategy(FedMedian(), {"dp": "server-fixed", "num-clients": 3})


def _simulate(tmp_path: Path, overrides: dict) -> dict:
    from flwr.simulation import run_simulation

    from kidneyscan.testing import smoke

    overrides = {"out-dir": str(tmp_path), **overrides}
    run_simulation(
        server_app=smoke.make_server_app(overrides),
        client_app=smoke.make_client_app(overrides),
        num_supernodes=3,
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}},
    )
    return json.loads((tmp_path / "smoke_result.json").read_text())


@pytest.mark.slow
def test_dp_run_stops_before_the_budget(tmp_path: Path) -> None:
    # Prepare: client-side clipping (fixedclipping_mod on the hospitals) + server noise; a budget
    # between the cost of 2 and of 3 rounds, 5 rounds asked for.
    reference = PrivacyAccountant(noise_multiplier=1.5, sampling_rate=1.0, delta=1e-5)
    budget = (reference.epsilon_after(2) + reference.epsilon_after(3)) / 2
    overrides = {
        "num-server-rounds": 5,
        "min-clients": 3,
        "num-clients": 3,
        "dp": "client-fixed",
        "dp-noise-multiplier": 1.5,
        "dp-clipping-norm": 0.5,
        "dp-delta": 1e-5,
        "dp-epsilon-budget": budget,
    }

    # Execute
    result = _simulate(tmp_path, overrides)

    # Assert: exactly the 2 affordable rounds ran, epsilon reported each round, increasing,
    # within budget; the next round would have exceeded it.
    per_round = result["privacy"]["per_round"]
    assert [r["round"] for r in per_round] == [1, 2]
    assert [r["round"] for r in result["rounds"]] == [1, 2]
    eps = [r["epsilon"] for r in per_round]
    assert eps[0] < eps[1] <= budget < reference.epsilon_after(3)
    assert result["train_metrics"]["2"]["dp-epsilon"] == pytest.approx(eps[1])
    assert all(r["replies"] == 3 and not r["failed"] for r in result["rounds"])


class _FakeDP:
    """Stands in for a Flower DP wrapper: releases an aggregate or skips the round."""

    def __init__(self, release: list[bool]) -> None:
        self.release = release
        self.configured: list[int] = []

    def configure_train(self, server_round, arrays, config, grid):  # type: ignore[no-untyped-def]
        self.configured.append(server_round)
        return ["message"]

    def aggregate_train(self, server_round, replies):  # type: ignore[no-untyped-def]
        from flwr.app import ArrayRecord, MetricRecord

        if self.release.pop(0):
            return ArrayRecord(), MetricRecord({"train-loss": 1.0})
        return None, None  # e.g. one error reply: Flower's DP wrappers skip aggregation


def test_skipped_round_costs_nothing_and_exhausted_budget_sends_nothing() -> None:
    # Prepare: budget fits exactly 2 released rounds.
    reference = PrivacyAccountant(1.0, 1.0, 1e-5)
    budget = (reference.epsilon_after(2) + reference.epsilon_after(3)) / 2
    accountant = PrivacyAccountant(1.0, 1.0, 1e-5, epsilon_budget=budget)
    inner = _FakeDP([True, False, True])
    seen: list[tuple[int, float]] = []
    strategy = privacy.budgeted_strategy_class()(
        inner, accountant, lambda r, e, d: seen.append((r, e))
    )

    # Execute: round 2 releases nothing; round 4 would exceed the budget.
    out = []
    for rnd in (1, 2, 3):
        assert strategy.configure_train(rnd, None, None, None) == ["message"]
        out.append(strategy.aggregate_train(rnd, ["reply"]))
    fourth = strategy.configure_train(4, None, None, None)

    # Assert
    assert accountant.rounds == 2
    assert [r for r, _ in seen] == [1, 3]
    assert out[0][1]["dp-epsilon"] == pytest.approx(reference.epsilon_after(1))
    assert out[1] == (None, None)
    assert out[2][1]["dp-epsilon"] == pytest.approx(reference.epsilon_after(2))
    assert fourth == [] and inner.configured == [1, 2, 3]


def test_federate_cli_passes_the_dp_settings_to_the_run_config(
    phantom_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    import kidneyscan.federated.simulation as simulation
    from kidneyscan.cli import app

    seen: dict = {}

    def fake_simulate(config: dict, **kwargs: object) -> dict:
        seen.update(config)
        return {"completed_round": 0, "best": {}}

    monkeypatch.setattr(simulation, "simulate", fake_simulate)
    result = CliRunner().invoke(
        app,
        [
            "federate", "--data", str(phantom_dir), "--clients", "2", "--partitioning", "iid",
            "--dp", "server-fixed", "--dp-noise-multiplier", "2.5", "--dp-clipping-norm", "3",
            "--dp-delta", "1e-6", "--dp-epsilon-budget", "7", "--out", str(tmp_path / "run"),
        ],
    )  # fmt: skip

    assert result.exit_code == 0, result.output
    assert seen["dp"] == "server-fixed"
    assert (seen["dp-noise-multiplier"], seen["dp-clipping-norm"]) == (2.5, 3.0)
    assert (seen["dp-delta"], seen["dp-epsilon-budget"]) == (1e-6, 7.0)


def _dp_round(noise: float, clip: float, updates: list, sizes: list[int]):  # type: ignore[no-untyped-def]
    """One DP FedAvg round of the product's strategy on hand-made client updates (from zero)."""
    import numpy as np

    from kidneyscan.federated import task
    from kidneyscan.federated.strategies import build_strategy

    dp = {"dp": "server-fixed", "dp-noise-multiplier": noise, "dp-clipping-norm": clip}
    cfg = task.run_config({**dp, "min-clients": 3, "num-clients": 3})
    strategy = privacy.wrap_strategy(build_strategy(cfg), cfg)
    return train_round(strategy, 1, np.zeros_like(updates[0]), updates, sizes)


@pytest.mark.usefixtures("task_identity")
def test_dp_updates_are_clipped_to_the_bound_and_averaged_uniformly() -> None:
    """Breaks if a site's update is not clipped to the bound, or the DP average weighs sites by
    their sizes (a big site would then move the model by more than the noise is calibrated to).
    Measured on the aggregated update itself, with the noise switched off."""
    import numpy as np

    rng = np.random.default_rng(0)
    updates = [rng.normal(0, 1, 5000).astype(np.float32) * s for s in (50.0, 0.01, 20.0)]
    clip = 2.0

    agg = _dp_round(1e-9, clip, updates, sizes=[1000, 10, 100])

    def clipped(u: np.ndarray) -> np.ndarray:
        return u * min(1.0, clip / float(np.linalg.norm(u)))

    np.testing.assert_allclose(agg, np.mean([clipped(u) for u in updates], axis=0), atol=1e-4)
    assert np.linalg.norm(agg) <= clip + 1e-4


@pytest.mark.usefixtures("task_identity")
def test_dp_noise_on_the_update_has_the_configured_standard_deviation() -> None:
    """Breaks if the noise added to the global update is not Gaussian with standard deviation
    noise_multiplier x clipping_norm / sites (measured on 200,000 coordinates of a ~zero update)."""
    import numpy as np

    # Near-zero updates: Flower's clipping divides by the update's norm, so not exactly zero.
    rng = np.random.default_rng(1)
    tiny = [rng.normal(0, 1e-7, 200_000).astype(np.float32) for _ in range(3)]

    agg = _dp_round(1.5, 0.8, tiny, sizes=[5, 50, 500])

    assert float(np.std(agg)) == pytest.approx(1.5 * 0.8 / 3, rel=0.01)
    assert abs(float(np.mean(agg))) < 0.01
