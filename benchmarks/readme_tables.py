"""Copy the benchmark result tables into README.md between ``<!-- NAME:start/end -->`` markers.

Every table in the README's results sections comes from a file under ``benchmarks/results/``
written by a benchmark script (the file names its command), so they are never
copied by hand. Run after any benchmark::

    python benchmarks/readme_tables.py
"""

from __future__ import annotations

import re
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
README = HERE.parent / "README.md"


def tables(path: Path, *, first: int | None = None, keep_text: bool = False) -> str:
    """The Markdown tables of a result file (and their one-line captions when ``keep_text``)."""
    lines = path.read_text().splitlines()
    out: list[str] = []
    count = 0
    in_table = False
    for line in lines:
        is_row = line.startswith("|")
        if is_row and not in_table:
            count += 1
            if first is not None and count > first:
                break
            if out:
                out.append("")
        if is_row or (keep_text and line and not line.startswith("#")):
            out.append(line)
        in_table = is_row
    return "\n".join(out).strip()


def section(path: Path) -> str:
    """A whole result page without its top-level title."""
    text = path.read_text()
    return re.sub(r"\A#+ [^\n]*\n+", "", text).strip()


SOURCES = {
    "real_sample": lambda: tables(RESULTS / "real_sample.md"),
    "federated": lambda: tables(RESULTS / "federated_ct.md"),
    "epsilon": lambda: tables(RESULTS / "federated_deploy.md", first=1),
    "deploy": lambda: tables(RESULTS / "federated_deploy.md").split("\n\n", 1)[-1],
    "phantom_speed": lambda: tables(RESULTS / "phantom_speed.md"),
    "phantom_shortcuts": lambda: tables(RESULTS / "phantom_shortcuts.md"),
    "dip_summary": lambda: tables(RESULTS / "preprocess" / "summary.md"),
    "dip": lambda: "\n\n".join(
        tables(RESULTS / "preprocess" / f"{part}.md")
        for part in ("enhancement", "restoration", "segmentation")
    ),
    "performance": lambda: section(RESULTS / "performance.md"),
}


def main() -> None:
    """Replace every known marker block of README.md with the current result tables."""
    text = README.read_text()
    for name, make in SOURCES.items():
        pattern = re.compile(rf"(<!-- {name}:start -->\n)(?:.*?\n)?(<!-- {name}:end -->)", re.S)
        if not pattern.search(text):
            continue
        try:
            body = make()
        except FileNotFoundError as exc:
            print(f"skip {name}: {exc.filename} missing")
            continue
        text = pattern.sub(lambda m, b=body: m.group(1) + b + "\n" + m.group(2), text)
    README.write_text(text)
    print(f"updated {README}")


if __name__ == "__main__":
    main()
