"""Dataset audit and the ``audit`` / ``split`` commands on tiny datasets written by the tests."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from kidneyscan.cli import app
from kidneyscan.data.audit import audit_dataset, to_markdown, write_report
from kidneyscan.data.datasets import CLASSES, scan_dataset
from kidneyscan.data.splits import make_split, save_split


def _pattern(seed: int, size: int = 32) -> np.ndarray:
    rng = np.random.default_rng(seed)
    coarse = rng.random((5, 5)).astype(np.float32)
    return np.asarray(Image.fromarray(coarse).resize((size, size), Image.BICUBIC)).clip(0, 1)


def _u8(image: np.ndarray) -> np.ndarray:
    return (image * 255).round().astype(np.uint8)


@pytest.fixture()
def messy(tmp_path: Path) -> Path:
    """4 classes x 4 images (indices 10 apart in pairs) plus planted problems."""
    root = tmp_path / "messy"
    for label, name in enumerate(CLASSES):
        for k, idx in enumerate((1, 3, 100, 102)):
            path = root / name / f"{name}- ({idx}).png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(_u8(_pattern(10 * label + k))).save(path)
    # exact file copy inside Cyst (index far away: not in the same block)
    shutil.copy(root / "Cyst" / "Cyst- (1).png", root / "Cyst" / "Cyst- (500).png")
    # same pixels, different encoding (BMP), in Stone: a cross-class pixel duplicate
    Image.open(root / "Normal" / "Normal- (3).png").save(root / "Stone" / "Stone- (700).bmp")
    # a noisy near copy of a Tumor image in Normal
    noisy = _pattern(31) + np.random.default_rng(0).normal(0, 0.004, (32, 32))
    Image.fromarray(_u8(noisy.clip(0, 1))).save(root / "Normal" / "Normal- (900).png")
    # an unreadable file
    (root / "Tumor" / "Tumor- (800).png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    return root


def test_audit_finds_planted_duplicates_and_unreadable_files(messy: Path) -> None:
    # Execute
    report = audit_dataset(messy, max_gap=5, max_distance=4, max_jump=None)
    cut = audit_dataset(messy, max_gap=5, max_distance=4, max_jump=12)
    # Assert
    assert report["dataset"]["n_images"] == 20
    assert [u["path"] for u in report["unreadable"]] == ["Tumor/Tumor- (800).png"]
    assert "unreadable image" in report["unreadable"][0]["reason"]
    ed = report["exact_duplicates"]
    assert [c["paths"] for c in ed["file_sha256_clusters"]] == [
        ["Cyst/Cyst- (1).png", "Cyst/Cyst- (500).png"]
    ]
    assert sorted(map(sorted, (c["paths"] for c in ed["pixel_sha256_clusters"]))) == [
        ["Cyst/Cyst- (1).png", "Cyst/Cyst- (500).png"],
        ["Normal/Normal- (3).png", "Stone/Stone- (700).bmp"],
    ]
    assert ed["cross_class_pixel_clusters"] == 1
    cross = {(p["a"], p["b"]) for p in report["near_duplicates"]["cross_class_pairs"]}
    assert ("Normal/Normal- (900).png", "Tumor/Tumor- (3).png") in cross
    assert ("Normal/Normal- (3).png", "Stone/Stone- (700).bmp") in cross
    # blocks: per class {1,3} and {100,102}, plus singletons 500, 700, 900
    assert report["groupings"]["blocks"]["n_groups"] == 4 * 2 + 3
    union = report["groupings"]["blocks+phash"]
    assert union["n_groups"] < report["groupings"]["blocks"]["n_groups"]
    assert union["mixed_class_groups"] == 2
    # the fixture's index neighbours are unrelated images: the jump cut separates them
    assert cut["groupings"]["blocks+phash"]["n_groups"] > report["groupings"]["blocks"]["n_groups"]


def test_audit_reports_groups_crossing_a_leaky_split(messy: Path, tmp_path: Path) -> None:
    # Prepare: an image-level split of the readable images
    (messy / "Tumor" / "Tumor- (800).png").unlink()
    samples = scan_dataset(messy)
    leaky = make_split(samples, grouping="none", val=0.25, test=0.25, seed=0)
    csv_path = save_split(leaky, tmp_path / "leaky.csv", root=messy)
    safe = make_split(
        samples, grouping="blocks+phash", max_gap=5, max_jump=None, val=0.25, test=0.25, seed=0
    )
    safe_path = save_split(safe, tmp_path / "safe.csv", root=messy)
    # Execute
    leaky_report = audit_dataset(messy, split_csv=csv_path, max_gap=5, max_jump=None)
    safe_report = audit_dataset(messy, split_csv=safe_path, max_gap=5, max_jump=None)
    # Assert
    crossing = leaky_report["split"]["crossing"]
    assert crossing["blocks+phash"]["groups"] > 0
    assert crossing["csv group column"]["groups"] == 0  # none-grouping: every image alone
    assert all(v["groups"] == 0 for v in safe_report["split"]["crossing"].values())
    assert safe_report["split"]["near_pairs_across_splits"] == 0
    assert safe_report["split"]["exact_duplicates_across_splits"] == 0
    held = leaky_report["split"]["held_out_with_near_duplicate_in_train"]
    assert set(held) == {"val", "test"}


def test_report_files_are_written(messy: Path, tmp_path: Path) -> None:
    # Execute
    report = audit_dataset(messy, max_gap=5)
    paths = write_report(report, tmp_path / "out" / "audit.md", command="kidneyscan audit X")
    # Assert
    md, js, png, pairs = paths
    assert md.read_text() == to_markdown(report, command="kidneyscan audit X")
    assert "Produced by `kidneyscan audit X`" in md.read_text()
    data = json.loads(js.read_text())
    assert data["dataset"]["n_images"] == 20
    assert "_hist" not in data["phash_distances"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert pairs.name == "audit_pairs.png" and pairs.read_bytes()[:4] == b"\x89PNG"


def test_vs_patients_section_when_patient_ids_are_known(tmp_path: Path) -> None:
    # Prepare: two patients per class, two slices each, adjacent indices across patients
    root = tmp_path / "ph"
    rows = []
    for label, name in enumerate(CLASSES):
        for k in range(4):
            rel = f"{name}/{name}- ({k + 1}).png"
            (root / name).mkdir(parents=True, exist_ok=True)
            Image.fromarray(_u8(_pattern(100 * label + k))).save(root / rel)
            rows.append([f"{name}- ({k + 1})", rel, name, label, "site0", f"p{k // 2}"])
    with (root / "phantom_metadata.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["image_id", "path", "Class", "target", "site", "patient_id"])
        w.writerows(rows)
    # Execute
    report = audit_dataset(root, max_gap=1)
    # Assert: blocks merge neighbouring patients -> keeps all same-patient pairs, coarser groups
    vp = report["vs_patients"]["blocks"]
    assert vp["n_patients"] == 8 and vp["n_groups"] == 4
    assert vp["same_patient_pairs_kept_together"] == 1.0
    assert "Groupings vs true patients" in to_markdown(report)


def test_cli_split_and_audit(messy: Path, tmp_path: Path) -> None:
    # Prepare
    (messy / "Tumor" / "Tumor- (800).png").unlink()
    runner = CliRunner()
    out_csv = tmp_path / "split.csv"
    # Execute
    res_split = runner.invoke(
        app,
        [
            "split",
            str(messy),
            "--out",
            str(out_csv),
            "--val",
            "0.25",
            "--test",
            "0.25",
            "--max-gap",
            "5",
        ],
    )
    res_kfold = runner.invoke(
        app,
        [
            "split",
            str(messy),
            "--out",
            str(tmp_path / "kf.csv"),
            "--kfold",
            "2",
            "--test",
            "0",
            "--grouping",
            "blocks",
        ],
    )
    res_audit = runner.invoke(
        app,
        [
            "audit",
            str(messy),
            "--split",
            str(out_csv),
            "--out",
            str(tmp_path / "a.md"),
            "--max-gap",
            "5",
        ],
    )
    # Assert
    assert res_split.exit_code == 0, res_split.output
    assert "grouping bands" in res_split.output  # auto without patient ids
    assert res_kfold.exit_code == 0, res_kfold.output
    with (tmp_path / "kf.csv").open() as fh:
        assert {r["split"] for r in csv.DictReader(fh)} == {"fold0", "fold1"}
    assert res_audit.exit_code == 0, res_audit.output
    assert "Groups crossing the split" in res_audit.output
    assert (tmp_path / "a.json").is_file() and (tmp_path / "a_phash.png").is_file()


def test_cli_reports_bad_data_as_an_error_not_a_traceback(tmp_path: Path) -> None:
    (tmp_path / "Kidney").mkdir()
    result = CliRunner().invoke(app, ["audit", str(tmp_path)])
    assert result.exit_code == 2
    assert "unknown class folder" in result.output
    assert "Traceback" not in result.output


@pytest.mark.realdata
@pytest.mark.slow
def test_real_sample_has_no_exact_duplicates_and_blocks_agree_with_phash(real_data: Path) -> None:
    report = audit_dataset(real_data)
    assert report["unreadable"] == []
    assert report["exact_duplicates"]["file_sha256_clusters"] == []
    # nearly every near-duplicate pair lies inside one index block
    assert report["agreement"]["near_pairs_within_one_block"] > 0.9
