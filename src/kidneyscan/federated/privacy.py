"""Differential privacy for the federated run: config, Flower DP wrappers, accountant, budget stop.

Privacy unit (user-level = hospital-level DP)
---------------------------------------------
The unit protected here is one *hospital* (one SuperNode), not one image: two federations are
neighbours when one hospital's whole contribution is added or removed. Each round releases one
noisy aggregate. With fixed clipping every client update is clipped to L2 norm ``C`` (on the
server or, with client-side DP, by ``fixedclipping_mod`` on the client) and Gaussian noise with
standard deviation ``noise_multiplier * C`` is added to the *sum* (Flower adds
``noise_multiplier * C / m`` to the mean of ``m`` updates), so each round is a sampled Gaussian
mechanism with noise multiplier ``sigma`` and sampling rate ``q = sampled clients / total
clients``. The :class:`PrivacyAccountant` composes rounds with Opacus's Renyi-DP accountant and
converts to (epsilon, delta).

Caveats a reader must know: Opacus's RDP analysis assumes Poisson sampling, while Flower samples
a fixed number of nodes without replacement; with ``q = 1`` (every hospital every round, the
usual cross-silo case) there is no amplification and the bound is exact for the Gaussian
mechanism. The guarantee covers what leaves the server after aggregation; it says nothing about
a hospital's own copy of its data. With adaptive clipping Flower splits the noise budget between
the update and the clipped-count query so that the total stays at ``noise_multiplier``; the
accountant therefore uses ``noise_multiplier`` unchanged.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

LOGGER = logging.getLogger(__name__)

#: Accepted values of the ``dp`` run-config key.
DP_MODES = ("none", "server-fixed", "server-adaptive", "client-fixed", "client-adaptive")

# Run-config keys that may hold the number of hospitals, in order of preference. fed-core's app
# decides which one it uses; the DP keys win when both are given.
_TOTAL_KEYS = ("dp-total-clients", "num-clients", "clients", "num-supernodes", "num-partitions")
_SAMPLED_KEYS = ("dp-sampled-clients", "min-train-nodes")


class PrivacyConfigError(ValueError):
    """A differential-privacy setting in the run config is missing or invalid."""


class PrivacyBudgetError(RuntimeError):
    """The configured epsilon budget does not allow even one round."""


def _number(run_config: Mapping[str, Any], key: str, default: float | None) -> float | None:
    if key not in run_config:
        return default
    value = run_config[key]
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise PrivacyConfigError(f"run config '{key}' must be a number, got {value!r}")
    try:
        number = float(value)
    except ValueError:
        raise PrivacyConfigError(f"run config '{key}' must be a number, got {value!r}") from None
    if not math.isfinite(number):
        raise PrivacyConfigError(f"run config '{key}' must be finite, got {value!r}")
    return number


def _first_int(run_config: Mapping[str, Any], keys: Iterable[str]) -> int | None:
    for key in keys:
        value = _number(run_config, key, None)
        if value is not None:
            if value != int(value) or value < 1:
                raise PrivacyConfigError(
                    f"run config '{key}' must be a positive integer, got {run_config[key]!r}"
                )
            return int(value)
    return None


@dataclass(frozen=True)
class DPConfig:
    """Differential-privacy settings read from a Flower run config.

    Parameters
    ----------
    mode : str
        One of :data:`DP_MODES`; ``"none"`` disables DP.
    noise_multiplier : float
        Gaussian noise std divided by the clipping norm (``sigma``).
    clipping_norm : float
        L2 bound ``C`` on each client's update (initial bound for adaptive clipping).
    delta : float
        Target delta of the reported (epsilon, delta).
    epsilon_budget : float | None
        Stop the run before epsilon would exceed this; ``None`` means report only.
    num_sampled_clients : int
        Hospitals sampled per round (Flower's DP wrappers need the exact number).
    total_clients : int
        Hospitals in the federation; ``q = num_sampled_clients / total_clients``.
    """

    mode: str = "none"
    noise_multiplier: float = 1.0
    clipping_norm: float = 1.0
    delta: float = 1e-5
    epsilon_budget: float | None = None
    num_sampled_clients: int = 1
    total_clients: int = 1

    def __post_init__(self) -> None:
        """Check every value and name the one that is wrong."""
        if self.mode not in DP_MODES:
            raise PrivacyConfigError(f"dp must be one of {', '.join(DP_MODES)}; got {self.mode!r}")
        if self.mode == "none":
            return
        if not self.noise_multiplier > 0:
            raise PrivacyConfigError(
                f"dp-noise-multiplier must be > 0 when dp={self.mode}, got {self.noise_multiplier}"
            )
        if not self.clipping_norm > 0:
            raise PrivacyConfigError(f"dp-clipping-norm must be > 0, got {self.clipping_norm}")
        if not 0 < self.delta < 1:
            raise PrivacyConfigError(f"dp-delta must be in (0, 1), got {self.delta}")
        if self.epsilon_budget is not None and not self.epsilon_budget > 0:
            raise PrivacyConfigError(
                f"dp-epsilon-budget must be > 0 (or 0 for no budget), got {self.epsilon_budget}"
            )
        if self.num_sampled_clients > self.total_clients:
            raise PrivacyConfigError(
                f"dp-sampled-clients ({self.num_sampled_clients}) exceeds the number of "
                f"clients ({self.total_clients})"
            )

    @property
    def enabled(self) -> bool:
        """Whether any DP mechanism is active."""
        return self.mode != "none"

    @property
    def sampling_rate(self) -> float:
        """Fraction of hospitals taking part in one round (``q``)."""
        return self.num_sampled_clients / self.total_clients

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> DPConfig:
        """Build the config from kebab-case run-config keys.

        Keys: ``dp``, ``dp-noise-multiplier``, ``dp-clipping-norm``, ``dp-delta``,
        ``dp-epsilon-budget`` (``0`` = no budget), ``dp-sampled-clients`` (default: all),
        ``dp-total-clients`` (default: ``num-clients`` / ``clients`` / ``num-supernodes`` /
        ``num-partitions``, whichever is present); adaptive modes also read
        ``dp-clipped-count-stddev`` (default ``max(sampled / 20, noise multiplier)``).

        Raises
        ------
        PrivacyConfigError
            When a value is of the wrong type or out of range, or DP is on and the number of
            clients cannot be found.
        """
        mode = str(run_config.get("dp", "none")).strip().lower()
        if mode == "none":
            return cls()
        total = _first_int(run_config, _TOTAL_KEYS)
        sampled = _first_int(run_config, _SAMPLED_KEYS)
        if total is None and sampled is None:
            raise PrivacyConfigError(
                f"dp={mode} needs the number of clients: set one of {', '.join(_TOTAL_KEYS)}"
            )
        total = total if total is not None else sampled
        sampled = sampled if sampled is not None else total
        assert total is not None and sampled is not None  # for mypy: one of them was found
        budget = _number(run_config, "dp-epsilon-budget", None)
        return cls(
            mode=mode,
            noise_multiplier=float(_number(run_config, "dp-noise-multiplier", 1.0) or 0.0),
            clipping_norm=float(_number(run_config, "dp-clipping-norm", 1.0) or 0.0),
            delta=float(_number(run_config, "dp-delta", 1e-5) or 0.0),
            epsilon_budget=budget if budget else None,
            num_sampled_clients=sampled,
            total_clients=total,
        )


class PrivacyAccountant:
    """(epsilon, delta) of a run of sampled Gaussian rounds, via Opacus's RDP accountant.

    Parameters
    ----------
    noise_multiplier : float
        ``sigma`` of each round's Gaussian mechanism (noise std / clipping norm).
    sampling_rate : float
        ``q``: sampled clients per round divided by total clients, in (0, 1].
    delta : float
        Target delta for the reported epsilon.
    epsilon_budget : float | None
        Budget checked by :meth:`would_exceed`; ``None`` never exceeds.
    """

    def __init__(
        self,
        noise_multiplier: float,
        sampling_rate: float,
        delta: float,
        epsilon_budget: float | None = None,
    ) -> None:
        if not noise_multiplier > 0:
            raise PrivacyConfigError(f"noise_multiplier must be > 0, got {noise_multiplier}")
        if not 0 < sampling_rate <= 1:
            raise PrivacyConfigError(f"sampling_rate must be in (0, 1], got {sampling_rate}")
        if not 0 < delta < 1:
            raise PrivacyConfigError(f"delta must be in (0, 1), got {delta}")
        if epsilon_budget is not None and not epsilon_budget > 0:
            raise PrivacyConfigError(f"epsilon_budget must be > 0, got {epsilon_budget}")
        self.noise_multiplier = float(noise_multiplier)
        self.sampling_rate = float(sampling_rate)
        self.delta = float(delta)
        self.epsilon_budget = epsilon_budget
        self.rounds = 0
        #: ``(round, epsilon)`` after every composed round.
        self.history: list[tuple[int, float]] = []

    @classmethod
    def from_config(cls, config: DPConfig) -> PrivacyAccountant:
        """Accountant for an enabled :class:`DPConfig`."""
        return cls(
            config.noise_multiplier, config.sampling_rate, config.delta, config.epsilon_budget
        )

    def epsilon_after(self, rounds: int) -> float:
        """Epsilon at :attr:`delta` after ``rounds`` identical rounds (0 rounds -> 0)."""
        from opacus.accountants import RDPAccountant

        if rounds <= 0:
            return 0.0
        accountant = RDPAccountant()
        # All rounds are identical, so one history entry with a step count is exact and avoids
        # replaying the accountant round by round.
        accountant.history = [(self.noise_multiplier, self.sampling_rate, rounds)]
        return float(accountant.get_epsilon(delta=self.delta))

    @property
    def epsilon(self) -> float:
        """Epsilon spent so far."""
        return self.epsilon_after(self.rounds)

    def step(self) -> tuple[float, float]:
        """Compose one more round and return the cumulative ``(epsilon, delta)``."""
        self.rounds += 1
        eps = self.epsilon
        self.history.append((self.rounds, eps))
        return eps, self.delta

    def would_exceed(self, next_rounds: int = 1) -> bool:
        """Whether ``next_rounds`` more rounds would take epsilon above the budget."""
        if self.epsilon_budget is None:
            return False
        return self.epsilon_after(self.rounds + next_rounds) > self.epsilon_budget

    def rounds_within_budget(self, max_rounds: int) -> int:
        """How many of the next ``max_rounds`` rounds fit in the budget (all without one)."""
        if self.epsilon_budget is None:
            return max_rounds
        # epsilon grows monotonically with the number of rounds: bisect for the last that fits.
        lo, hi = 0, max_rounds
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self.would_exceed(mid):
                hi = mid - 1
            else:
                lo = mid
        return lo

    def report(self) -> dict[str, Any]:
        """JSON-ready summary: settings and epsilon after every round."""
        return {
            "accountant": "opacus.accountants.RDPAccountant",
            "unit": "hospital (user-level DP: one client's whole contribution)",
            "noise_multiplier": self.noise_multiplier,
            "sampling_rate": self.sampling_rate,
            "delta": self.delta,
            "epsilon_budget": self.epsilon_budget,
            "rounds": self.rounds,
            "epsilon": self.epsilon,
            "per_round": [{"round": r, "epsilon": e} for r, e in self.history],
        }


def noise_for_epsilon(
    epsilon: float, *, rounds: int, sampling_rate: float = 1.0, delta: float = 1e-5
) -> float:
    """The smallest noise multiplier whose run of ``rounds`` rounds spends at most ``epsilon``.

    Bisection on :meth:`PrivacyAccountant.epsilon_after` (epsilon falls as the noise grows), to
    a relative precision of 1e-4.

    Raises
    ------
    PrivacyConfigError
        ``epsilon`` or ``rounds`` not positive, or a bad ``sampling_rate`` / ``delta``.
    """
    if not epsilon > 0:
        raise PrivacyConfigError(f"epsilon must be > 0, got {epsilon}")
    if rounds < 1:
        raise PrivacyConfigError(f"rounds must be >= 1, got {rounds}")

    def spent(z: float) -> float:
        return PrivacyAccountant(z, sampling_rate, delta).epsilon_after(rounds)

    lo, hi = 1e-3, 1.0
    while spent(hi) > epsilon:
        lo, hi = hi, hi * 2.0
        if hi > 1e6:
            raise PrivacyConfigError(f"no noise multiplier up to 1e6 reaches epsilon {epsilon}")
    while hi - lo > 1e-4 * hi:
        mid = (lo + hi) / 2.0
        if spent(mid) > epsilon:
            lo = mid
        else:
            hi = mid
    return hi


def _make_budgeted_class() -> type:
    """Create the budget-enforcing wrapper lazily so importing this module stays flwr-free."""
    from flwr.app import MetricRecord
    from flwr.serverapp.strategy import Strategy

    class BudgetedStrategy(Strategy):
        """Wrap a (DP) strategy: account every released round and stop before the budget.

        The number of rounds is cut in :meth:`start` to the number that fits the budget, so the
        run ends normally (checkpoints, curves) after the last affordable round. A round whose
        aggregation was skipped (Flower's DP wrappers skip on any error reply) released nothing
        and costs nothing.
        """

        def __init__(
            self,
            strategy: Strategy,
            accountant: PrivacyAccountant,
            on_round: Callable[[int, float, float], None] | None = None,
        ) -> None:
            super().__init__()
            self.strategy = strategy
            self.accountant = accountant
            self.on_round = on_round
            self.stopped_early_after: int | None = None

        def __repr__(self) -> str:
            return (
                f"BudgetedStrategy({self.strategy!r}, eps_budget={self.accountant.epsilon_budget})"
            )

        def summary(self) -> None:
            LOGGER.info(
                "DP accounting: sigma=%s q=%.3f delta=%g budget=%s",
                self.accountant.noise_multiplier,
                self.accountant.sampling_rate,
                self.accountant.delta,
                self.accountant.epsilon_budget,
            )
            self.strategy.summary()

        def start(self, grid, initial_arrays, num_rounds=3, *args, **kwargs):  # type: ignore[no-untyped-def]
            affordable = self.accountant.rounds_within_budget(num_rounds)
            if affordable == 0:
                raise PrivacyBudgetError(
                    f"the DP budget epsilon={self.accountant.epsilon_budget} is smaller than the "
                    f"cost of one round (epsilon={self.accountant.epsilon_after(1):.3f} at "
                    f"delta={self.accountant.delta:g}); raise dp-noise-multiplier or "
                    "dp-epsilon-budget"
                )
            if affordable < num_rounds:
                self.stopped_early_after = affordable
                LOGGER.warning(
                    "DP budget: stopping after round %d of %d; round %d would take epsilon to "
                    "%.3f > budget %.3f",
                    affordable,
                    num_rounds,
                    affordable + 1,
                    self.accountant.epsilon_after(affordable + 1),
                    self.accountant.epsilon_budget,
                )
            return super().start(grid, initial_arrays, affordable, *args, **kwargs)

        def configure_train(self, server_round, arrays, config, grid):  # type: ignore[no-untyped-def]
            # Second line of defence if start() was bypassed: never release past the budget.
            if self.accountant.would_exceed(1):
                LOGGER.warning("DP budget exhausted: round %d not started", server_round)
                return []
            return self.strategy.configure_train(server_round, arrays, config, grid)

        def aggregate_train(self, server_round, replies):  # type: ignore[no-untyped-def]
            replies = list(replies)
            if not replies:
                return None, None
            arrays, metrics = self.strategy.aggregate_train(server_round, replies)
            if arrays is None:
                LOGGER.warning("round %d: no aggregate released, no privacy spent", server_round)
                return arrays, metrics
            eps, delta = self.accountant.step()
            LOGGER.info("round %d: DP spent epsilon=%.4f delta=%g", server_round, eps, delta)
            metrics = MetricRecord(dict(metrics or {}))
            metrics["dp-epsilon"] = eps
            metrics["dp-delta"] = delta
            if self.on_round is not None:
                self.on_round(server_round, eps, delta)
            return arrays, metrics

        def configure_evaluate(self, server_round, arrays, config, grid):  # type: ignore[no-untyped-def]
            return self.strategy.configure_evaluate(server_round, arrays, config, grid)

        def aggregate_evaluate(self, server_round, replies):  # type: ignore[no-untyped-def]
            return self.strategy.aggregate_evaluate(server_round, replies)

    return BudgetedStrategy


_BUDGETED: type | None = None


def budgeted_strategy_class() -> type:
    """The :class:`BudgetedStrategy` class (built on first use, needs flwr)."""
    global _BUDGETED
    if _BUDGETED is None:
        _BUDGETED = _make_budgeted_class()
    return _BUDGETED


def wrap_strategy(
    strategy: Any,
    run_config: Mapping[str, Any],
    on_round: Callable[[int, float, float], None] | None = None,
) -> Any:
    """Wrap a Message-API strategy with Flower's DP wrapper and the budget accountant.

    Parameters
    ----------
    strategy : flwr.serverapp.strategy.Strategy
        The aggregation strategy (FedAvg, FedProx, ...).
    run_config : Mapping
        Flower run config; see :meth:`DPConfig.from_run_config` for the keys.
    on_round : callable, optional
        Called as ``on_round(server_round, epsilon, delta)`` after every released round.

    Returns
    -------
    Strategy
        ``strategy`` unchanged when ``dp = "none"``; otherwise a ``BudgetedStrategy`` around
        ``DifferentialPrivacy{Server,Client}Side{Fixed,Adaptive}Clipping(strategy)``. Its
        ``accountant`` attribute holds the :class:`PrivacyAccountant`.
    """
    from flwr.serverapp.strategy import (
        DifferentialPrivacyClientSideAdaptiveClipping,
        DifferentialPrivacyClientSideFixedClipping,
        DifferentialPrivacyServerSideAdaptiveClipping,
        DifferentialPrivacyServerSideFixedClipping,
    )

    config = DPConfig.from_run_config(run_config)
    if not config.enabled:
        return strategy
    _reject_robust(strategy, config)
    sigma, m, clip = config.noise_multiplier, config.num_sampled_clients, config.clipping_norm
    dp_strategy: Any
    if config.mode == "server-fixed":
        dp_strategy = DifferentialPrivacyServerSideFixedClipping(strategy, sigma, clip, m)
    elif config.mode == "client-fixed":
        dp_strategy = DifferentialPrivacyClientSideFixedClipping(strategy, sigma, clip, m)
    else:
        # Flower's default clipped-count noise (m / 20) is meant for thousands of clients; with
        # a few hospitals it cannot reach the target noise at all (Flower raises). sigma_b = sigma
        # keeps the update's effective noise at sigma / sqrt(3/4); the two Gaussian queries
        # together cost exactly one Gaussian release with noise multiplier sigma.
        count_std = _number(run_config, "dp-clipped-count-stddev", None) or max(m / 20, sigma)
        adaptive = (
            DifferentialPrivacyServerSideAdaptiveClipping
            if config.mode == "server-adaptive"
            else DifferentialPrivacyClientSideAdaptiveClipping
        )
        dp_strategy = adaptive(
            strategy, sigma, m, initial_clipping_norm=clip, clipped_count_stddev=count_std
        )
    accountant = PrivacyAccountant.from_config(config)
    LOGGER.info("DP enabled: %s", asdict(config))
    return budgeted_strategy_class()(dp_strategy, accountant, on_round)


def _reject_robust(strategy: Any, config: DPConfig) -> None:
    # Robust aggregators (median, Krum, trimmed mean) do not compute a sum of clipped updates, so
    # the Gaussian-mechanism sensitivity argument above does not hold for them.
    name = type(strategy).__name__
    if name in {"FedMedian", "FedTrimmedAvg", "Krum", "MultiKrum", "Bulyan"}:
        raise PrivacyConfigError(
            f"dp={config.mode} needs an averaging strategy (FedAvg, FedProx, FedAdam, FedYogi...);"
            f" {name} does not compute a clipped mean"
        )


def client_mods(run_config: Mapping[str, Any]) -> list[Any]:
    """Client mods required by the DP mode: clipping runs on the hospital for client-side DP.

    Returns
    -------
    list
        ``[fixedclipping_mod]`` for ``client-fixed``, ``[adaptiveclipping_mod]`` for
        ``client-adaptive``, otherwise ``[]``. Pass them to ``@app.train(mods=...)``.
    """
    from flwr.clientapp.mod import adaptiveclipping_mod, fixedclipping_mod

    config = DPConfig.from_run_config(run_config)
    if config.mode == "client-fixed":
        return [fixedclipping_mod]
    if config.mode == "client-adaptive":
        return [adaptiveclipping_mod]
    return []


def dp_mod(msg: Any, context: Any, call_next: Any) -> Any:
    """Client mod that applies the clipping mod the *run's* config asks for.

    A deployed ClientApp object is built at import time, before any run config exists, so
    ``@app.train(mods=client_mods(...))`` cannot know the DP mode. This mod reads
    ``context.run_config`` on every message and delegates to ``fixedclipping_mod`` /
    ``adaptiveclipping_mod`` (or straight to the handler when the mode needs no client step).
    """
    mods = client_mods(context.run_config)
    if not mods:
        return call_next(msg, context)
    return mods[0](msg, context, call_next)


__all__ = [
    "DP_MODES",
    "DPConfig",
    "PrivacyAccountant",
    "PrivacyBudgetError",
    "PrivacyConfigError",
    "budgeted_strategy_class",
    "client_mods",
    "dp_mod",
    "wrap_strategy",
]
