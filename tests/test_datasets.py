"""CT-KIDNEY / ImageFolder reading: csv checks, case-insensitive classes, clear errors, logs."""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kidneyscan.data.datasets import (
    CLASSES,
    DataError,
    load_image,
    parse_index,
    samples_summary,
    scan_dataset,
)


def _write_jpeg(path: Path, value: int, size: int = 16) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # Grayscale stored as three equal channels, like the public CT-KIDNEY JPEGs.
    rgb = np.full((size, size, 3), value, dtype=np.uint8)
    Image.fromarray(rgb).save(path, quality=95)


def _make_tree(root: Path, folders: dict[str, list[int]]) -> list[tuple[str, str, str]]:
    """Write ``<folder>/<Class>- (<k>).jpg`` files; return (image_id, rel path, class) rows."""
    rows = []
    for folder, indices in folders.items():
        for k in indices:
            image_id = f"{folder.capitalize()}- ({k})"
            rel = f"{folder}/{image_id}.jpg"
            _write_jpeg(root / rel, value=10 * k % 256)
            rows.append((image_id, rel, folder.capitalize()))
    return rows


def _write_csv(root: Path, rows: list[tuple[str, str, str]], *, extra: dict | None = None) -> None:
    extra = extra or {}
    with (root / "kidneyData.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["", "image_id", "path", "diag", "target", "Class", *extra])
        for i, (image_id, rel, cls) in enumerate(rows):
            target = CLASSES.index(cls) if cls in CLASSES else ""
            w.writerow([i, image_id, rel, cls, target, cls, *(v[i] for v in extra.values())])


def test_imagefolder_without_csv_is_case_insensitive_and_sorted(tmp_path: Path) -> None:
    # Prepare
    _make_tree(tmp_path, {"CYST": [12, 3], "normal": [7], "Stone": [1], "tUMOR": [2, 10]})
    # Execute
    samples = scan_dataset(tmp_path)
    # Assert
    assert [s.class_name for s in samples] == ["Cyst", "Cyst", "Normal", "Stone", "Tumor", "Tumor"]
    assert [s.label for s in samples] == [0, 0, 1, 2, 3, 3]
    assert [s.index for s in samples] == [3, 12, 7, 1, 2, 10]
    assert samples[0].image_id == "Cyst- (3)"
    assert all(s.site is None for s in samples)


def test_csv_is_the_list_and_unlisted_files_are_counted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Prepare: 3 listed images, 2 unlisted ones, a non-class folder, a site column
    rows = _make_tree(tmp_path, {"Cyst": [1, 2], "Tumor": [5]})
    _make_tree(tmp_path, {"Cyst": [99], "Tumor": [98]})
    _write_jpeg(tmp_path / "masks" / "Cyst- (1)_kidney.png", 255)
    _write_csv(tmp_path, rows, extra={"site": ["A", "B", "A"]})
    caplog.set_level(logging.INFO)
    # Execute
    samples = scan_dataset(tmp_path)
    # Assert
    assert [s.image_id for s in samples] == ["Cyst- (1)", "Cyst- (2)", "Tumor- (5)"]
    assert [s.site for s in samples] == ["A", "B", "A"]
    assert "2 image(s) in class folders are not listed in kidneyData.csv" in caplog.text
    assert "ignored 1 folder(s) that are not classes: masks" in caplog.text
    assert samples_summary(samples)["per_site"] == {"A": 2, "B": 1}


def test_csv_with_foreign_absolute_paths_falls_back_to_class_folder(tmp_path: Path) -> None:
    # Prepare: paths as written on another machine, with Windows separators
    rows = _make_tree(tmp_path, {"Stone": [4]})
    foreign = [(i, "C:\\kaggle\\input\\CT\\" + r.replace("/", "\\"), c) for i, r, c in rows]
    _write_csv(tmp_path, foreign)
    # Execute
    samples = scan_dataset(tmp_path)
    # Assert
    assert samples[0].path == tmp_path / "Stone" / "Stone- (4).jpg"


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda r: [(r[0][0], "Cyst/gone.jpg", "Cyst")], r"line 2: file 'Cyst/gone.jpg' not found"),
        (lambda r: [*r, r[0]], r"line 3: file 'Cyst/Cyst- \(1\).jpg' already listed on line 2"),
        (lambda r: [(r[0][0], r[0][1], "Kidney")], r"line 2: unknown class 'Kidney'"),
    ],
)
def test_csv_rows_with_problems_are_named(tmp_path: Path, edit, message: str) -> None:  # type: ignore[no-untyped-def]
    # Prepare
    rows = _make_tree(tmp_path, {"Cyst": [1]})
    _write_csv(tmp_path, edit(rows))
    # Execute / Assert
    with pytest.raises(DataError, match=message):
        scan_dataset(tmp_path)


def test_csv_target_code_must_agree_with_class_name(tmp_path: Path) -> None:
    # Prepare
    _make_tree(tmp_path, {"Cyst": [1]})
    (tmp_path / "kidneyData.csv").write_text(
        ",image_id,path,diag,target,Class\n0,Cyst- (1),Cyst/Cyst- (1).jpg,Cyst,2,Cyst\n"
    )
    # Execute / Assert
    with pytest.raises(
        DataError, match=r"line 2: target 2 does not match class 'Cyst' \(expected 0"
    ):
        scan_dataset(tmp_path)


def test_csv_missing_columns_is_an_error(tmp_path: Path) -> None:
    _make_tree(tmp_path, {"Cyst": [1]})
    (tmp_path / "kidneyData.csv").write_text("name,label\nx,y\n")
    with pytest.raises(DataError, match="expected columns"):
        scan_dataset(tmp_path)


def test_unknown_class_folder_without_csv_is_named(tmp_path: Path) -> None:
    _make_tree(tmp_path, {"Cyst": [1], "Kidney": [2]})
    with pytest.raises(DataError, match="unknown class folder.*'Kidney'"):
        scan_dataset(tmp_path)


def test_empty_class_folder_is_named_and_other_files_are_counted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _make_tree(tmp_path, {"Cyst": [1]})
    (tmp_path / "Normal").mkdir()
    (tmp_path / "Normal" / "Thumbs.db").write_bytes(b"x")
    with pytest.raises(DataError, match=r"Normal: class folder 'Normal' holds no images"):
        scan_dataset(tmp_path)
    (tmp_path / "Normal" / "Thumbs.db").unlink()
    (tmp_path / "Normal").rmdir()
    (tmp_path / "Cyst" / "notes.txt").write_text("x")
    scan_dataset(tmp_path)
    assert "skipped 1 non-image file(s)" in caplog.text


def test_unreadable_image_names_file_and_reason(tmp_path: Path) -> None:
    # Prepare
    _make_tree(tmp_path, {"Cyst": [1]})
    bad = tmp_path / "Cyst" / "Cyst- (2).jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    # Execute
    samples = scan_dataset(tmp_path)  # listing alone does not decode
    # Assert
    assert len(samples) == 2
    with pytest.raises(DataError, match=r"Cyst- \(2\)\.jpg: unreadable image"):
        load_image(bad)
    with pytest.raises(DataError, match=r"Cyst- \(2\)\.jpg: unreadable image"):
        scan_dataset(tmp_path, verify=True)


def test_missing_root_and_missing_file_are_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not a directory"):
        scan_dataset(tmp_path / "absent")
    with pytest.raises(DataError, match="file not found"):
        load_image(tmp_path / "absent.jpg")


def test_load_image_reads_rgb_gray_as_one_channel(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "x.png"
    rgb = np.zeros((4, 6, 3), dtype=np.uint8)
    rgb[..., :] = np.arange(24, dtype=np.uint8).reshape(4, 6, 1) * 10
    Image.fromarray(rgb).save(path)
    # Execute
    image = load_image(path)
    # Assert
    assert image.shape == (4, 6) and image.dtype == np.float32
    np.testing.assert_allclose(image, rgb[..., 0] / 255.0, atol=1e-7)


def test_load_image_scales_16_bit_by_bit_depth_not_by_image_max(tmp_path: Path) -> None:
    # Prepare: a dark 16-bit image must stay dark (no per-image stretching)
    path = tmp_path / "x16.png"
    Image.fromarray(np.full((4, 4), 6553, dtype=np.uint16)).save(path)
    # Execute
    image = load_image(path)
    # Assert
    np.testing.assert_allclose(image, 0.1, atol=1e-4)


def test_phantom_metadata_fills_site_and_patient(tmp_path: Path) -> None:
    # Prepare
    rows = _make_tree(tmp_path, {"Cyst": [1, 2]})
    _write_csv(tmp_path, rows)
    with (tmp_path / "phantom_metadata.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["image_id", "path", "Class", "target", "site", "patient_id"])
        w.writerow(["Cyst- (1)", "Cyst/Cyst- (1).jpg", "Cyst", 0, "site0", "p0"])
        w.writerow(["Cyst- (2)", "Cyst/Cyst- (2).jpg", "Cyst", 0, "site2", "p7"])
    # Execute
    samples = scan_dataset(tmp_path)
    # Assert
    assert [(s.site, s.patient_id) for s in samples] == [("site0", "p0"), ("site2", "p7")]


@pytest.mark.parametrize(
    ("name", "index"), [("Cyst- (1219).jpg", 1219), ("Tumor- (7)", 7), ("scan.png", None)]
)
def test_parse_index(name: str, index: int | None) -> None:
    assert parse_index(name) == index


@pytest.mark.realdata
def test_real_ct_kidney_sample_is_read_through_its_csv(real_data: Path) -> None:
    # Execute
    samples = scan_dataset(real_data)
    image = load_image(samples[0].path)
    # Assert
    assert samples_summary(samples)["per_class"] == dict.fromkeys(CLASSES, 250)
    assert all(s.index is not None for s in samples)
    assert image.shape == (512, 512) and image.dtype == np.float32
    assert 0.0 <= image.min() < image.max() <= 1.0


def test_csv_paths_match_class_folders_of_other_case_and_dicom_files_load(tmp_path: Path) -> None:
    # Prepare: folder written as CYST/ while the csv says Cyst/...; a DICOM slice in Normal/
    from kidneyscan.testing.dicom import make_ct_dataset

    _write_jpeg(tmp_path / "CYST" / "Cyst- (1).jpg", 100)
    ds = make_ct_dataset(np.full((16, 16), 40.0))  # 40 HU: mid-grey in the abdomen window
    (tmp_path / "Normal").mkdir()
    ds.save_as(tmp_path / "Normal" / "Normal- (2).dcm", enforce_file_format=True)
    _write_csv(
        tmp_path,
        [
            ("Cyst- (1)", "Cyst/Cyst- (1).jpg", "Cyst"),
            ("Normal- (2)", "Normal/Normal- (2).dcm", "Normal"),
        ],
    )
    # Execute
    samples = scan_dataset(tmp_path, verify=True)
    # Assert
    assert samples[0].path == tmp_path / "CYST" / "Cyst- (1).jpg"
    np.testing.assert_allclose(load_image(samples[1].path), 0.5, atol=1e-6)
