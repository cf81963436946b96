"""Paired comparison of two trained rows of ``real_sample.py`` on the same out-of-fold slices.

Two rows' pooled confidence intervals overlap easily on 1,000 slices; the question "does B
beat A" is better answered on the difference itself. This reads both rows' per-fold
``predictions.csv`` (written by ``real_sample.py`` under ``--out``), checks they hold the same
slices, and reports the pooled macro-F1 difference with a paired bootstrap 95 % CI
(slices resampled together for both rows) and the per-fold differences. Slices of one patient
are not independent, so the bootstrap CI is optimistic; the per-fold column shows whether the
gain holds band by band. Writes ``results/real_sample_paired.{json,md}``.

Usage::

    python benchmarks/real_sample_paired.py --rows default,bilateral
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from sklearn.metrics import f1_score

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kidneyscan.data.datasets import CLASSES  # noqa: E402
from real_sample import read_predictions  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def fold_predictions(run: Path) -> list[tuple[list[str], np.ndarray, np.ndarray]]:
    """(paths, labels, predicted class) per fold of one row's output folder, in fold order."""
    folds = sorted(run.glob("fold*/predictions.csv"), key=lambda p: int(p.parent.name[4:]))
    if not folds:
        raise SystemExit(f"no fold*/predictions.csv under {run}: run real_sample.py first")
    out = []
    for path in folds:
        paths, labels, probs = read_predictions(path)
        out.append((paths, labels, probs.argmax(1)))
    return out


def macro_f1(y: np.ndarray, p: np.ndarray) -> float:
    """Macro-F1 over all four classes."""
    return float(f1_score(y, p, labels=range(len(CLASSES)), average="macro", zero_division=0))


def main() -> int:
    """Compare the two rows and write the table."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", required=True, help="A,B: B is compared against A")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks/out/real_sample")
    ap.add_argument("--bootstrap", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--results", type=Path, default=REPO / "benchmarks/results")
    args = ap.parse_args()
    a_name, b_name = args.rows.split(",")
    a, b = fold_predictions(args.out / a_name), fold_predictions(args.out / b_name)
    if len(a) != len(b) or any(fa[0] != fb[0] for fa, fb in zip(a, b, strict=False)):
        raise SystemExit(f"{a_name} and {b_name} were not run on the same folds and slices")
    per_fold = [
        macro_f1(fb[1], fb[2]) - macro_f1(fa[1], fa[2]) for fa, fb in zip(a, b, strict=True)
    ]
    y = np.concatenate([f[1] for f in a])
    pa, pb = np.concatenate([f[2] for f in a]), np.concatenate([f[2] for f in b])
    diff = macro_f1(y, pb) - macro_f1(y, pa)
    rng = np.random.default_rng(args.seed)
    boots = []
    for _ in range(args.bootstrap):
        i = rng.integers(0, len(y), len(y))
        boots.append(macro_f1(y[i], pb[i]) - macro_f1(y[i], pa[i]))
    lo, hi = (float(v) for v in np.percentile(boots, [2.5, 97.5]))
    result = {
        "a": a_name,
        "b": b_name,
        "n": int(len(y)),
        "macro_f1_a": macro_f1(y, pa),
        "macro_f1_b": macro_f1(y, pb),
        "difference": diff,
        "difference_ci95": [lo, hi],
        "per_fold_difference": per_fold,
        "folds_improved": int(sum(d > 0 for d in per_fold)),
        "bootstrap": args.bootstrap,
    }
    folds = ", ".join(f"{d:+.3f}" for d in per_fold)
    md = "\n".join([
        f"# Paired comparison on the real sample: {b_name} vs {a_name}",
        "",
        "| A | B | slices | macro-F1 A | macro-F1 B | B - A [paired bootstrap 95 % CI] "
        "| per-fold B - A | folds where B > A |",
        "|---|---|---|---|---|---|---|---|",
        f"| {a_name} | {b_name} | {len(y)} | {result['macro_f1_a']:.3f} | "
        f"{result['macro_f1_b']:.3f} | {diff:+.3f} [{lo:+.3f}, {hi:+.3f}] | {folds} | "
        f"{result['folds_improved']} of {len(per_fold)} |",
        "",
        f"`python benchmarks/real_sample_paired.py --rows {args.rows}` ({args.bootstrap} "
        "resamples of slices; slices of one patient are not independent, so read the per-fold "
        "column too).",
        "",
    ])  # fmt: skip
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "real_sample_paired.json").write_text(json.dumps(result, indent=2))
    (args.results / "real_sample_paired.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
