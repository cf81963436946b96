"""A split (:class:`Split`) and its CSV file: ``path,image_id,Class,label,group,split``.

Saved so that a run can be repeated exactly; :func:`load_split` checks the file against the
data folder.
"""

from __future__ import annotations

import csv
import logging
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

from kidneyscan.data.datasets import (
    CLASSES,
    DataError,
    Sample,
    class_index,
    parse_index,
    scan_dataset,
)

log = logging.getLogger(__name__)


SPLIT_COLUMNS: tuple[str, ...] = ("path", "image_id", "Class", "label", "group", "split")


_SPLIT_NAME = re.compile(r"^(train|val|test|fold\d+)$")


class Split(dict[str, list[Sample]]):
    """A mapping from split name to samples, plus each sample's group and how it was made.

    Attributes
    ----------
    groups : dict
        Sample path -> group id.
    info : dict
        Parameters and counts (grouping, seed, fractions, per-split class counts).
    """

    def __init__(
        self,
        parts: dict[str, list[Sample]] | None = None,
        groups: dict[Path, int] | None = None,
        info: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(parts or {})
        self.groups: dict[Path, int] = dict(groups or {})
        self.info: dict[str, Any] = dict(info or {})


def crossing_groups(split: Split) -> dict[int, list[str]]:
    """Groups whose images sit in more than one split (leakage), with those split names."""
    where: dict[int, set[str]] = defaultdict(set)
    for name, members in split.items():
        for s in members:
            g = split.groups.get(s.path)
            if g is not None:
                where[g].add(name)
    return {g: sorted(names) for g, names in sorted(where.items()) if len(names) > 1}


def save_split(
    split: dict[str, list[Sample]],
    path: str | Path,
    *,
    root: str | Path | None = None,
    groups: dict[Path, int] | None = None,
) -> Path:
    """Write a split as CSV (``path,image_id,Class,label,group,split``).

    Parameters
    ----------
    split
        A :class:`Split` (its groups are written) or any mapping of split name -> samples.
    path
        The CSV file to write.
    root
        Data folder: paths are written relative to it, so the file works on another machine.
        Without it, absolute paths are written.
    groups
        Group per sample path; defaults to ``split.groups`` (-1 where unknown).
    """
    out = Path(path)
    base = Path(root).resolve() if root is not None else None
    gmap = groups if groups is not None else getattr(split, "groups", {})
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(SPLIT_COLUMNS)
        for name, members in split.items():
            if not _SPLIT_NAME.match(name):
                raise DataError(f"split name {name!r} is not train, val, test or foldN")
            for s in members:
                p = s.path.resolve()
                if base is not None:
                    try:
                        shown = p.relative_to(base).as_posix()
                    except ValueError:
                        raise DataError(f"{s.path}: not inside the data folder {base}") from None
                else:
                    shown = p.as_posix()
                w.writerow([shown, s.image_id, s.class_name, s.label, gmap.get(s.path, -1), name])
    return out


def load_split(
    path: str | Path, root: str | Path | None = None, classes: tuple[str, ...] = CLASSES
) -> Split:
    """Read a split CSV back into samples, checking it against the data.

    Parameters
    ----------
    path
        CSV written by :func:`save_split` (or by ``kidneyscan split``).
    root
        Data folder. When given, the folder is scanned and every row must be one of its images
        with the same class (the samples returned are the scanned ones, with sites); images of
        the folder that the split leaves out are counted in the log. Needed when the CSV has
        relative paths.
    classes
        Class names in label order.

    Returns
    -------
    Split
        Split name -> samples, with ``.groups`` from the CSV.

    Raises
    ------
    DataError
        Missing file or columns, unknown split name, label not matching the class, duplicate
        row, relative path without ``root``, or a row that is not an image of ``root``.
    """
    csv_path = Path(path)
    if not csv_path.is_file():
        raise DataError(f"{csv_path}: split file not found")
    with csv_path.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in SPLIT_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise DataError(f"{csv_path}: missing column(s) {missing}; expected {SPLIT_COLUMNS}")
        rows = list(reader)
    base = Path(root) if root is not None else None
    known: dict[Path, Sample] = {}
    if base is not None:
        known = {s.path.resolve(): s for s in scan_dataset(base, classes)}
    parts: dict[str, list[Sample]] = {}
    groups: dict[Path, int] = {}
    seen: dict[Path, int] = {}
    for i, row in enumerate(rows):
        where = f"{csv_path.name} line {i + 2}"
        name = row["split"].strip()
        if not _SPLIT_NAME.match(name):
            raise DataError(f"{where}: split {name!r} is not train, val, test or foldN")
        try:
            label = int(row["label"])
            group = int(row["group"])
        except ValueError:
            raise DataError(f"{where}: label and group must be integers") from None
        try:
            named = class_index(row["Class"], classes)
        except DataError as exc:
            raise DataError(f"{where}: {exc}") from None
        if named != label:
            raise DataError(f"{where}: label {label} does not match class {row['Class']!r}")
        rel = Path(row["path"])
        if not rel.is_absolute() and base is None:
            raise DataError(f"{where}: relative path {row['path']!r}; pass the data folder (root)")
        full = (rel if rel.is_absolute() or base is None else base / rel).resolve()
        if full in seen:
            raise DataError(f"{where}: {row['path']!r} already listed on line {seen[full]}")
        seen[full] = i + 2
        if base is not None:
            if full not in known:
                reason = "file not found" if not full.is_file() else "not an image of the dataset"
                raise DataError(f"{where}: {row['path']!r}: {reason} under {base}")
            sample = known[full]
            if sample.label != label:
                raise DataError(
                    f"{where}: {row['path']!r} is {row['Class']!r} in the split but"
                    f" {sample.class_name!r} in the data"
                )
        else:
            if not full.is_file():
                raise DataError(f"{where}: {row['path']!r}: file not found")
            sample = Sample(
                full, label, classes[label], row["image_id"], parse_index(row["image_id"])
            )
        parts.setdefault(name, []).append(sample)
        groups[sample.path] = group
    if not rows:
        raise DataError(f"{csv_path}: no rows")
    if known:
        left_out = len(known) - len(seen)
        if left_out:
            log.warning("%s: %d image(s) of %s are in no split", csv_path, left_out, base)
    split = Split(parts, groups, {"source": str(csv_path)})
    crossing = crossing_groups(split)
    if crossing:
        log.warning("%s: %d group(s) span more than one split (leakage)", csv_path, len(crossing))
    return split
