"""Flower ServerApp: the coordinator. It never reads training images.

Each round: the strategy samples hospitals and aggregates their trainable tensors; the server
then scores the global model on the held-out TEST images (``test-file``), records per-client
metrics and bytes, saves the global state (for ``resume``) and redraws the curves. The best
round is chosen by the clients' federated validation macro-F1 (their local hold-out,
``local-val-fraction``), not by the test set, so the reported test numbers stay unbiased; with
no local hold-out the last round is kept. That round's model is written with
:func:`kidneyscan.models.checkpoint.save_checkpoint`, in the same format as centralized
training, so ``kidneyscan evaluate`` and ``kidneyscan serve`` use it unchanged.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from safetensors.numpy import load_file, save_file

from kidneyscan.data.datasets import CLASSES, Sample, scan_dataset
from kidneyscan.data.partition import load_partition
from kidneyscan.evaluation.metrics import bootstrap_ci, classification_metrics, macro_f1
from kidneyscan.evaluation.report import write_report
from kidneyscan.federated import privacy, task
from kidneyscan.federated.grid import NodeDeadlineGrid
from kidneyscan.federated.strategies import RecordingStrategy, build_strategy
from kidneyscan.models.checkpoint import load_checkpoint, save_checkpoint

log = logging.getLogger(__name__)

app = ServerApp()

STATE_DIR = "state"
STATE_FILE = "state.json"
GLOBAL_FILE = "global.safetensors"


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the federation described by the run config (see :data:`task.DEFAULTS`)."""
    cfg = task.run_config(context.run_config)
    run_federation(_guard_nodes(grid, cfg), cfg)


def _guard_nodes(grid: Grid, cfg: Mapping[str, Any]) -> Grid:
    """Fail after ``node-timeout`` s with too few nodes instead of waiting forever (fedpriv)."""
    return NodeDeadlineGrid(grid, int(cfg["min-clients"]), float(cfg.get("node-timeout", 300.0)))


def _wrap_privacy(strategy: Any, cfg: Mapping[str, Any]) -> Any:
    """DP wrapper + accountant from :func:`kidneyscan.federated.privacy.wrap_strategy`."""
    return privacy.wrap_strategy(strategy, cfg)


def _load_test(cfg: Mapping[str, Any]) -> list[Sample]:
    """Server-side held-out test images: ``test-file`` (simulation) or ``test-dir`` (deployment)."""
    if cfg.get("test-file"):
        return load_partition(str(cfg["test-file"]))[0]
    if cfg.get("test-dir"):
        return scan_dataset(str(cfg["test-dir"]))
    log.warning("no test-file / test-dir in the run config: no server-side evaluation")
    return []


def _save_state(state_dir: Path, named: Mapping[str, np.ndarray], state: Mapping[str, Any]) -> None:
    state_dir.mkdir(parents=True, exist_ok=True)
    # Write-then-rename so a run killed mid-write never leaves a half file to resume from.
    tmp = state_dir / (GLOBAL_FILE + ".tmp")
    save_file({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in named.items()}, str(tmp))
    tmp.replace(state_dir / GLOBAL_FILE)
    tmp_json = state_dir / (STATE_FILE + ".tmp")
    tmp_json.write_text(json.dumps(state, indent=2, default=float))
    tmp_json.replace(state_dir / STATE_FILE)


def load_state(out_dir: str | Path) -> tuple[dict[str, np.ndarray], dict[str, Any]] | None:
    """The last global trainable tensors and run state of ``out_dir``, or ``None`` if absent."""
    state_dir = Path(out_dir) / STATE_DIR
    if not (state_dir / STATE_FILE).is_file() or not (state_dir / GLOBAL_FILE).is_file():
        return None
    return dict(load_file(str(state_dir / GLOBAL_FILE))), json.loads(
        (state_dir / STATE_FILE).read_text()
    )


def _is_better(row: Mapping[str, Any], best: Mapping[str, Any] | None) -> bool:
    if best is None:
        return True
    f1, best_f1 = row.get("val-macro-f1"), best.get("val-macro-f1")
    if f1 is None or best_f1 is None:  # no federated validation: keep the latest round
        return True
    if f1 != best_f1:
        return f1 > best_f1
    return float(row.get("val-loss", np.inf)) < float(best.get("val-loss", np.inf))


def run_federation(grid: Grid, cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Run (or resume) the rounds; write checkpoint, curves, metrics and report to ``out-dir``.

    Returns
    -------
    dict
        The run state: ``completed_round``, ``history`` (one row per round), ``best``.
    """
    out = Path(str(cfg["out-dir"]))
    out.mkdir(parents=True, exist_ok=True)
    state_dir = out / STATE_DIR
    num_rounds = int(cfg["num-server-rounds"])
    model = task.build_model(cfg)
    test = _load_test(cfg)

    state: dict[str, Any] = {"completed_round": 0, "history": [], "best": None, "clients": {}}
    if cfg["resume"]:
        loaded = load_state(out)
        if loaded is None:
            log.warning("resume requested but %s has no saved state: starting fresh", state_dir)
        else:
            named, state = loaded
            task.from_named(model, named)
            log.info("resuming from round %d of %s", state["completed_round"], out)
    start = int(state["completed_round"]) + 1

    inner = _wrap_privacy(build_strategy(cfg), cfg)
    strategy = RecordingStrategy(inner, fp16=bool(cfg["transport-fp16"]))
    accountant = getattr(inner, "accountant", None)
    if accountant is not None:
        # A resumed DP run has already spent privacy: replay the released rounds so the
        # budget check and the reported epsilon continue from there, not from zero.
        for _ in (r for r in state["history"] if "dp-epsilon" in r):
            accountant.step()
    arrays = ArrayRecord({k: Array(v) for k, v in task.to_named(model).items()})
    t0 = time.perf_counter()
    stopped_reason = ""
    for rnd in range(start, num_rounds + 1):
        if accountant is not None and accountant.would_exceed(1):
            stopped_reason = (
                f"privacy budget: round {rnd} would take epsilon past {accountant.epsilon_budget}"
            )
            log.warning("stopping: %s", stopped_reason)
            break
        t_round = time.perf_counter()
        train_cfg = ConfigRecord({"local-epochs": int(cfg["local-epochs"])})
        replies = grid.send_and_receive(
            strategy.configure_train(rnd, arrays, train_cfg, grid),
            timeout=float(cfg["round-timeout"]),
        )
        agg_arrays, agg_train = strategy.aggregate_train(rnd, replies)
        if agg_arrays is not None:
            arrays = agg_arrays
        eval_replies = grid.send_and_receive(
            strategy.configure_evaluate(rnd, arrays, ConfigRecord(), grid),
            timeout=float(cfg["round-timeout"]),
        )
        agg_eval = strategy.aggregate_evaluate(rnd, eval_replies)

        task.from_named(model, {k: v.numpy() for k, v in arrays.items()})
        row = _round_row(rnd, strategy.rounds.get(rnd, {}), agg_train, agg_eval)
        row["round-seconds"] = time.perf_counter() - t_round
        if test:
            scalars, _, _ = task.evaluate_model(model, test, cfg)
            row.update({f"test-{k}": v for k, v in scalars.items() if k != "num-examples"})
        state["history"].append(row)
        state["completed_round"] = rnd
        if _is_better(row, state["best"]):
            state["best"] = {k: row[k] for k in row if not isinstance(row[k], dict | list)}
            _save_checkpoint(out / "checkpoint", model, cfg, row, test)
        _save_state(state_dir, task.to_named(model), state)
        _write_curves(out, state["history"])
        _log_round(row, num_rounds)

    state["wall-seconds"] = time.perf_counter() - t0
    state["stopped-reason"] = stopped_reason
    _finish(out, cfg, state, test)
    return state


def _round_row(
    rnd: int,
    rec: Mapping[str, Any],
    agg_train: MetricRecord | None,
    agg_eval: MetricRecord | None,
) -> dict[str, Any]:
    row: dict[str, Any] = {"round": rnd}
    train_m: dict[str, Any] = dict(agg_train or {})
    eval_m: dict[str, Any] = dict(agg_eval or {})
    if agg_train is not None:
        row["train-loss"] = float(train_m.get("train-loss", np.nan))
        if "dp-epsilon" in agg_train:
            row["dp-epsilon"] = float(train_m["dp-epsilon"])
    if agg_eval is not None:
        row["val-loss"] = float(eval_m.get("eval-loss", np.nan))
        row["val-accuracy"] = float(eval_m.get("eval-accuracy", np.nan))
        row["val-macro-f1"] = float(eval_m.get("eval-macro-f1", np.nan))
        curve = eval_m.get("eval-nll-by-temperature")
        if isinstance(curve, list) and curve:
            # Pooled over the sites' hold-outs (weighted as the strategy weighs sites): the model's
            # temperature, as central training fits it on its validation split.
            temperature = task.pick_temperature(curve)
            row["val-temperature"] = temperature
            row["val-nll-calibrated"] = float(np.nanmin(curve))
    row["clients"] = [
        {
            k: v
            for k, v in c.items()
            if k
            in (
                "node-id",
                "partition-id",
                "train-loss",
                "train-accuracy",
                "num-examples",
                "optimizer-steps",
                "bytes-up",
            )
        }
        for c in rec.get("train", [])
    ]
    row["client-eval"] = [
        {
            k: v
            for k, v in c.items()
            if k
            in (
                "node-id",
                "partition-id",
                "eval-loss",
                "eval-accuracy",
                "eval-macro-f1",
                "num-examples",
            )
        }
        for c in rec.get("evaluate", [])
    ]
    row["bytes-up"] = int(sum(c.get("bytes-up", 0) for c in rec.get("train", [])))
    row["bytes-down"] = int(sum(rec.get("bytes-down-train", {}).values())) + int(
        sum(rec.get("bytes-down-evaluate", {}).values())
    )
    row["failures"] = list(rec.get("failures", []))
    return row


def _log_round(row: Mapping[str, Any], num_rounds: int) -> None:
    parts = [f"round {row['round']}/{num_rounds}"]
    for key in ("train-loss", "val-macro-f1", "test-accuracy", "test-macro-f1", "dp-epsilon"):
        if key in row:
            parts.append(f"{key} {row[key]:.4f}")
    parts.append(f"up {row['bytes-up'] / 1e6:.2f} MB")
    if row["failures"]:
        parts.append(f"{len(row['failures'])} failure(s)")
    msg = " | ".join(parts)
    log.info(msg)
    print(msg, flush=True)  # progress on the console: Flower's own log is very chatty


def _metadata(
    cfg: Mapping[str, Any], row: Mapping[str, Any], metrics: Mapping[str, Any]
) -> dict[str, Any]:
    pre = task.build_preprocessor(cfg)
    safe_cfg = {k: v for k, v in cfg.items() if k not in ("partition-file", "data-dir")}
    return {
        "model": task.model_spec(cfg),
        "classes": list(CLASSES),
        "preprocessing": pre.to_dict(),
        # Fitted on the sites' hold-outs from their NLL curves; 1.0 without federated validation.
        "temperature": float(row.get("val-temperature", 1.0)),
        "metrics": dict(metrics),
        "split_file": str(cfg.get("split-file") or cfg.get("test-file", "")),
        "task": "multiclass",
        "input_size": int(cfg["image-size"]),
        "normalisation": {"mean": list(pre.mean), "std": list(pre.std)},
        "training": {
            "mode": "federated",
            "round": int(row["round"]),
            "selected_by": "federated validation macro-F1"
            if "val-macro-f1" in row
            else "last round",
            "config": safe_cfg,
        },
    }


def _full_test_metrics(
    model: Any, cfg: Mapping[str, Any], test: list[Sample], temperature: float = 1.0
) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
    logits, labels = task.evaluate_logits(model, test, cfg)
    _, probs = task.scores(np.asarray(logits) / temperature, labels)
    labels = np.asarray(labels)
    metrics = dict(classification_metrics(labels, probs, list(CLASSES)))
    metrics["temperature"] = float(temperature)
    lo, hi = bootstrap_ci(labels, probs, macro_f1, n=1000, seed=0)
    metrics["ci95"] = {"macro_f1": [float(lo), float(hi)]}
    return metrics, probs, labels


def _notes(out: Path, state: Mapping[str, Any]) -> list[str]:
    """Markdown section of the federated report: curves and one row per round."""
    lines = [
        "## Federated rounds",
        "",
        "![curves](curves.png)",
        "",
        "| round | mean local train loss | client-val macro-F1 | test accuracy | test macro-F1 "
        "| MB up | failures |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in state["history"]:
        lines.append(
            f"| {r['round']} | {r.get('train-loss', float('nan')):.4f} "
            f"| {r.get('val-macro-f1', float('nan')):.3f} "
            f"| {r.get('test-accuracy', float('nan')):.3f} "
            f"| {r.get('test-macro-f1', float('nan')):.3f} | {r['bytes-up'] / 1e6:.2f} "
            f"| {len(r['failures'])} |"
        )
    best = state.get("best") or {}
    lines += [
        "",
        f"Selected round: {best.get('round')} (by the sites' validation macro-F1; the test set "
        "is never used for selection). Per-client numbers are in `curves.json`.",
    ]
    return ["\n".join(lines)]


def _save_checkpoint(
    ckpt: Path, model: Any, cfg: Mapping[str, Any], row: Mapping[str, Any], test: list[Sample]
) -> None:
    metrics = {k: row[k] for k in row if str(k).startswith("test-")}
    save_checkpoint(ckpt, model, _metadata(cfg, row, metrics))


def _write_curves(out: Path, history: list[dict[str, Any]]) -> None:
    # Imported here: the Agg backend is selected when curves are drawn, not on import.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    (out / "curves.json").write_text(json.dumps(history, indent=2, default=float))
    rounds = [r["round"] for r in history]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    ax = axes[0]
    for key, label in (
        ("test-accuracy", "test accuracy"),
        ("test-macro-f1", "test macro-F1"),
        ("val-macro-f1", "client-val macro-F1"),
    ):
        ys = [r.get(key) for r in history]
        if any(y is not None for y in ys):
            ax.plot(rounds, [np.nan if y is None else y for y in ys], marker="o", label=label)
    ax.set_xlabel("round")
    ax.set_ylim(0, 1)
    ax.set_title("global model")
    ax.legend(loc="lower right", fontsize=8)
    ax = axes[1]
    clients = sorted({c.get("partition-id", c["node-id"]) for r in history for c in r["clients"]})
    for cid in clients:
        ys = []
        for r in history:
            match = [c for c in r["clients"] if c.get("partition-id", c["node-id"]) == cid]
            ys.append(match[0]["train-loss"] if match else np.nan)
        ax.plot(rounds, ys, marker=".", label=f"client {cid}")
    ax.set_xlabel("round")
    ax.set_title("local training loss per client")
    if clients:
        ax.legend(fontsize=8)
    for a in axes:
        a.grid(alpha=0.3)
        a.xaxis.get_major_locator().set_params(integer=True)
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=110)
    plt.close(fig)


def _finish(out: Path, cfg: Mapping[str, Any], state: dict[str, Any], test: list[Sample]) -> None:
    """Final metrics of the selected checkpoint, federation summary and report."""
    ckpt = out / "checkpoint"
    summary: dict[str, Any] = {
        "completed_round": state["completed_round"],
        "best": state["best"],
        "stopped_reason": state.get("stopped-reason", ""),
        "wall_seconds": state.get("wall-seconds"),
        "bytes_up_per_round": [r["bytes-up"] for r in state["history"]],
        "bytes_down_per_round": [r["bytes-down"] for r in state["history"]],
        "strategy": cfg["strategy"],
        "partitioning": cfg["partitioning"],
    }
    (out / "federation.json").write_text(json.dumps(summary, indent=2, default=float))
    if not test or not (ckpt / "metadata.json").is_file():
        return
    model, meta = load_checkpoint(ckpt)
    metrics, probs, labels = _full_test_metrics(model, cfg, test, float(meta["temperature"]))
    metrics["federated"] = json.loads(json.dumps(summary, default=float))
    write_report(
        out,
        metrics,
        labels=labels,
        probs=probs,
        title="KidneyScan federated run",
        summary={
            "model": json.dumps(meta["model"]),
            "strategy": cfg["strategy"],
            "partitioning": cfg["partitioning"],
            "clients": cfg.get("num-clients"),
            "rounds completed": state["completed_round"],
            "selected round": (state.get("best") or {}).get("round"),
            "test images": len(test),
            "wall time (rounds) s": round(float(state.get("wall-seconds") or 0.0), 1),
        },
        notes=_notes(out, state),
    )
