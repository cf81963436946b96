"""Data commands: ``audit`` (duplicates, groups, split leakage) and ``split`` (group splits)."""

from __future__ import annotations

import logging
import shlex
import sys
from pathlib import Path

import typer

from kidneyscan.cli._app import app

_GROUPING_HELP = (
    "How images are grouped so no group spans two splits: auto (patient ids when known, else"
    " bands), bands (K contiguous file-number bands per class; fold k = band k of every"
    " class; the strictest without patient ids), blocks, phash, blocks+phash, patient,"
    " none (image-level, leaky)."
)


def _setup_logging() -> None:
    from kidneyscan.cli._logging import setup_console_logging

    setup_console_logging(logging.INFO)


def _fail(exc: Exception) -> typer.Exit:
    typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
    return typer.Exit(code=2)


# Grouping options shared by `audit` and `split` (same names, defaults and help in both).
_MAX_GAP = typer.Option(
    10, "--max-gap", min=0, help="Largest file-index gap inside one index block."
)
_MAX_DISTANCE = typer.Option(
    4,
    "--max-distance",
    min=0,
    max=64,
    help="Largest pHash Hamming distance (of 64 bits) for near duplicates.",
)
_MAX_JUMP = typer.Option(
    12,
    "--max-jump",
    min=0,
    max=64,
    help="In blocks+phash, index neighbours differing by more pHash bits start a new group"
    " (64: never, the plain union).",
)


@app.command()
def audit(
    data: Path = typer.Argument(..., help="Dataset folder (CT-KIDNEY layout or ImageFolder tree)."),
    split: Path | None = typer.Option(
        None, "--split", help="Split CSV (from `kidneyscan split`) to check for groups across it."
    ),
    out: Path | None = typer.Option(
        None,
        "--out",
        help="Write the report as Markdown here (plus .json and _phash.png next to it).",
    ),
    max_gap: int = _MAX_GAP,
    max_distance: int = _MAX_DISTANCE,
    max_jump: int = _MAX_JUMP,
) -> None:
    """Audit a dataset: unreadable files, exact and near duplicates, groups, split leakage."""
    from rich.console import Console
    from rich.table import Table

    from kidneyscan.data.audit import audit_dataset, write_report
    from kidneyscan.data.datasets import DataError

    _setup_logging()
    try:
        report = audit_dataset(
            data,
            split_csv=split,
            max_gap=max_gap,
            max_distance=max_distance,
            max_jump=max_jump,
            progress=True,
        )
    except DataError as exc:
        raise _fail(exc) from None
    console = Console()
    ds, ed, nd = report["dataset"], report["exact_duplicates"], report["near_duplicates"]
    summary = Table(title=f"Audit of {data}", show_header=True)
    summary.add_column("finding")
    summary.add_column("value", justify="right")
    summary.add_row("images", str(ds["n_images"]))
    summary.add_row("unreadable files", str(len(report["unreadable"])))
    summary.add_row("identical-file clusters", str(len(ed["file_sha256_clusters"])))
    summary.add_row("identical-pixel clusters", str(len(ed["pixel_sha256_clusters"])))
    summary.add_row(f"near-duplicate pairs (<= {max_distance} bits)", str(nd["pairs"]))
    summary.add_row("near-duplicate clusters", str(nd["clusters"]))
    summary.add_row("near-duplicate pairs across classes", str(len(nd["cross_class_pairs"])))
    ag = report["agreement"]
    summary.add_row("ARI index blocks vs pHash", f"{ag['adjusted_rand_index']:.3f}")
    console.print(summary)
    groups = Table(title="Groups", show_header=True)
    for col in ("grouping", "groups", "per class", "largest", "mixed-class"):
        groups.add_column(col)
    for name, g in report["groupings"].items():
        per = ", ".join(f"{c} {k}" for c, k in g["groups_per_class"].items())
        groups.add_row(
            name, str(g["n_groups"]), per, str(g["largest"]), str(g["mixed_class_groups"])
        )
    console.print(groups)
    if "split" in report:
        sp = report["split"]
        leak = Table(title=f"Groups crossing the split {split}", show_header=True)
        for col in ("grouping", "crossing groups", "of groups", "images in them"):
            leak.add_column(col)
        for name, v in sp["crossing"].items():
            leak.add_row(
                name, str(v["groups"]), str(v["of_groups"]), str(v["images_in_crossing_groups"])
            )
        console.print(leak)
        console.print(
            f"exact-duplicate clusters across splits: {sp['exact_duplicates_across_splits']};"
            f" near-duplicate pairs across splits: {sp['near_pairs_across_splits']}"
        )
        for name, v in sp["held_out_with_near_duplicate_in_train"].items():
            console.print(
                f"{name} images with a near duplicate in train: {v['images']} of {v['of']}"
            )
    if out is not None:
        command = "kidneyscan " + " ".join(shlex.quote(a) for a in sys.argv[1:])
        for path in write_report(report, out, command=command):
            console.print(f"wrote {path}")


@app.command()
def split(
    data: Path = typer.Argument(..., help="Dataset folder (CT-KIDNEY layout or ImageFolder tree)."),
    out: Path = typer.Option(..., "--out", help="Split CSV to write (paths relative to DATA)."),
    kfold: int | None = typer.Option(
        None, "--kfold", min=2, help="Make K group folds (fold0..fold{K-1}) instead of train/val."
    ),
    val: float = typer.Option(0.15, "--val", min=0.0, max=0.95, help="Validation fraction."),
    test: float = typer.Option(
        0.15, "--test", min=0.0, max=0.95, help="Test fraction (held out before k-fold too)."
    ),
    seed: int = typer.Option(0, "--seed", help="Seed: the same data and seed give the same split."),
    grouping: str = typer.Option("auto", "--grouping", help=_GROUPING_HELP),
    max_gap: int = _MAX_GAP,
    max_distance: int = _MAX_DISTANCE,
    max_jump: int = _MAX_JUMP,
) -> None:
    """Make a leakage-aware stratified group split (or k-fold) of a dataset and save it as CSV."""
    from rich.console import Console
    from rich.table import Table

    from kidneyscan.data.datasets import CLASSES, DataError, scan_dataset
    from kidneyscan.data.splits import make_kfold, make_split, save_split

    _setup_logging()
    try:
        samples = scan_dataset(data)
        common = {
            "seed": seed,
            "grouping": grouping,
            "max_gap": max_gap,
            "max_distance": max_distance,
            "max_jump": max_jump,
            "progress": True,
        }
        if kfold is not None:
            parts = make_kfold(samples, kfold, test=test, **common)  # type: ignore[arg-type]
        else:
            parts = make_split(samples, val=val, test=test, **common)  # type: ignore[arg-type]
        save_split(parts, out, root=data)
    except DataError as exc:
        raise _fail(exc) from None
    table = Table(
        title=f"{out}: grouping {parts.info['grouping']}, {parts.info['n_groups']} groups",
        show_header=True,
    )
    table.add_column("split")
    for c in CLASSES:
        table.add_column(c, justify="right")
    table.add_column("total", justify="right")
    table.add_column("share", justify="right")
    for name, members in parts.items():
        counts = parts.info["per_split"][name]
        table.add_row(
            name,
            *(str(counts.get(c, 0)) for c in CLASSES),
            str(len(members)),
            f"{parts.info['fractions'][name]:.1%}",
        )
    Console().print(table)
