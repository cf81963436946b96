"""Tests of the synthetic kidney-CT phantom (tiny 64-128 px renderings)."""

from __future__ import annotations

import csv
import hashlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from kidneyscan.data import phantom as ph
from kidneyscan.data.datasets import CLASSES, load_image, scan_dataset
from kidneyscan.data.phantom.canvas import Canvas
from kidneyscan.data.phantom.lesions import _draw_stone
from kidneyscan.data.phantom.writer import _balanced_counts, _plan


def _read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def _digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_classes_match_the_data_contract() -> None:
    assert ph.CLASSES == CLASSES


def test_same_seed_writes_same_bytes_and_other_seed_differs(tmp_path: Path) -> None:
    # Prepare / Execute
    a = ph.generate_dataset(tmp_path / "a", 12, seed=3, sites=2, image_size=64)
    b = ph.generate_dataset(tmp_path / "b", 12, seed=3, sites=2, image_size=64)
    c = ph.generate_dataset(tmp_path / "c", 12, seed=4, sites=2, image_size=64)
    # Assert
    da, db, dc = _digest(a), _digest(b), _digest(c)
    assert da == db
    assert len(da) == 12 * 5 + 3  # jpg + 3 masks + clean per image; three csv files
    assert da["Cyst/Cyst- (1).jpg"] != dc["Cyst/Cyst- (1).jpg"]


def test_layout_csv_columns_and_loading(phantom_dir: Path) -> None:
    # Execute
    rows = _read_csv(phantom_dir / "kidneyData.csv")
    meta = _read_csv(phantom_dir / "phantom_metadata.csv")
    samples = scan_dataset(phantom_dir)
    # Assert: the public CT-KIDNEY columns and target codes
    header = (phantom_dir / "kidneyData.csv").read_text().splitlines()[0]
    assert header == ",image_id,path,diag,target,Class"
    assert len(rows) == len(meta) == len(samples) == 48
    for r in rows:
        assert int(r["target"]) == CLASSES.index(r["Class"]) and r["diag"] == r["Class"]
        assert r["path"] == f"{r['Class']}/{r['image_id']}.jpg"
        assert (phantom_dir / r["path"]).is_file()
        for key in ("body", "kidney", "lesion"):
            assert (phantom_dir / "masks" / f"{r['image_id']}_{key}.png").is_file()
        assert (phantom_dir / "clean" / f"{r['image_id']}.png").is_file()
    assert list(meta[0]) == list(ph.METADATA_COLUMNS)
    # balanced classes, three sites
    counts = {c: sum(r["Class"] == c for r in rows) for c in CLASSES}
    assert counts == {c: 12 for c in CLASSES}
    assert {m["site"] for m in meta} == {"site0", "site1", "site2"}
    for r in rows:  # masks are binary PNGs that agree with the class
        masks = {
            k: np.asarray(Image.open(phantom_dir / "masks" / f"{r['image_id']}_{k}.png")) > 0
            for k in ("body", "kidney", "lesion")
        }
        assert masks["body"].shape == (64, 64) and masks["body"][masks["kidney"]].all()
        assert masks["lesion"].any() == (r["Class"] != "Normal"), r["image_id"]
    img = load_image(phantom_dir / rows[0]["path"])
    assert img.shape == (64, 64) and img.dtype == np.float32
    assert img.min() >= 0.0 and img.max() <= 1.0 and img.std() > 0.05


def test_patients_give_neighbouring_slices_with_consecutive_indices(phantom_dir: Path) -> None:
    meta = _read_csv(phantom_dir / "phantom_metadata.csv")
    by_patient: dict[str, list[dict[str, str]]] = {}
    for m in meta:
        by_patient.setdefault(m["patient_id"], []).append(m)
    sizes = [len(v) for v in by_patient.values()]
    assert max(sizes) <= 4 and max(sizes) > 1  # the leakage trap exists
    for slices in by_patient.values():
        idx = [int(m["image_id"].split("(")[1].rstrip(")")) for m in slices]
        assert idx == list(range(idx[0], idx[0] + len(idx)))
        levels = [float(m["slice_level"]) for m in slices]
        assert levels == sorted(levels) and levels[-1] - levels[0] < 0.2
        assert len({m["Class"] for m in slices} | {m["site"] for m in slices}) == 2


def test_file_numbers_jump_between_series_never_within_a_patient(tmp_path: Path) -> None:
    ph.generate_dataset(tmp_path, 200, seed=5, sites=2, image_size=32)
    meta = _read_csv(tmp_path / "phantom_metadata.csv")
    jumps = 0
    for c in CLASSES:
        rows = [m for m in meta if m["Class"] == c]
        idx = [int(m["image_id"].split("(")[1].rstrip(")")) for m in rows]
        assert idx[0] == 1 and idx == sorted(idx)
        for prev, cur, a, b in zip(idx, idx[1:], rows, rows[1:], strict=False):
            if a["patient_id"] == b["patient_id"]:
                assert cur == prev + 1
            elif cur > prev + 1:
                jumps += 1
                assert 20 < cur - prev <= 200
    assert jumps >= 2  # index blocks exist, as in the real sample


@pytest.mark.parametrize("class_name", CLASSES)
def test_masks_and_lesion_hu_are_consistent(class_name: str) -> None:
    site = ph.SiteProfile()
    for i in range(6):
        # Execute
        sl = ph.render_slice(np.random.default_rng(i), class_name.upper(), site, image_size=128)
        body, kidney, lesion = sl.masks["body"], sl.masks["kidney"], sl.masks["lesion"]
        # Assert
        assert sl.image.shape == sl.clean.shape == sl.hu.shape == (128, 128)
        assert sl.image.dtype == np.float32 and 0 <= sl.image.min() <= sl.image.max() <= 1
        assert kidney.any() and body[kidney].all()
        assert sl.meta["lesion_type"] == {"Normal": "none"}.get(class_name, class_name.lower())
        if class_name == "Normal":
            assert not lesion.any()
            continue
        assert lesion.any()
        near = ndimage.binary_dilation(kidney, iterations=3)
        assert (lesion & near).any(), "lesion must touch a kidney"
        values = sl.clean_hu[lesion]
        if class_name == "Stone":
            # material 200-1500 HU; pixels mix it with the background (partial volume)
            assert 200 <= sl.meta["lesion_hu"] <= 1500
            assert values.max() <= 1500 and values.min() >= -150
            assert 1.0 <= sl.meta["lesion_size_mm"] <= 20.0
            # at full resolution (0.74 mm pixels) a stone of >= 2 mm fills its centre pixel
            full = ph.render_slice(np.random.default_rng(i), class_name, site, image_size=512)
            if full.meta["lesion_size_mm"] >= 2.0:
                assert full.clean_hu[full.masks["lesion"]].max() >= 150.0
        elif class_name == "Cyst":  # homogeneous inside; edge pixels share partial volume
            inner = ndimage.binary_erosion(lesion)
            assert inner.any() or sl.meta["lesion_size_mm"] < 4 * sl.meta["pixel_mm"]
            if inner.any():
                cyst = sl.clean_hu[inner]
                assert cyst.min() >= 0 and cyst.max() <= 20 and cyst.std() < 1e-3
        else:  # tumor: solid, heterogeneous
            assert 10 <= values.mean() <= 200 and values.std() > 2


def test_kidneys_lie_in_a_rim_of_perirenal_fat() -> None:
    # Prepare: Normal slices at 256 px (1.4-1.6 mm pixels), so no lesion bulges into the rim
    site = ph.SiteProfile()
    for i in range(4):
        sl = ph.render_slice(np.random.default_rng(i), "Normal", site, image_size=256)
        kidney = sl.masks["kidney"]
        # Execute: the 1-pixel ring just outside each kidney outline, on the clean HU image
        ring = ndimage.binary_dilation(kidney, iterations=1) & ~kidney
        values = sl.clean_hu[ring]
        # Assert: mostly fat (-150..-60 HU; the renal vein and partial volume take the rest),
        # not the muscle (~50 HU) or organs the kidney was painted against before the rim
        fat = (values > -160) & (values < -50)
        assert fat.mean() > 0.8, (i, fat.mean())


def test_small_stone_gets_partial_volume_large_stone_full_hu() -> None:
    # Prepare: the same 3 mm stone rendered at 512 px (0.74 mm pixels) and 64 px (6 mm)
    canvas = {n: Canvas(n, 380.0) for n in (512, 64)}
    peaks = {}
    for n, cv in canvas.items():
        cv.hu[:] = 0.0
        mask = np.zeros((n, n), np.uint8)
        # Execute
        _draw_stone(cv, 10.0, -5.0, 1.5, 1000.0, mask)
        peaks[n] = float(cv.hu.max())
        # Assert: the stone's HU x area is conserved (to the sub-sampling error)
        area_mm2 = float(cv.hu.sum()) / 1000.0 * cv.px_mm**2
        assert area_mm2 == pytest.approx(np.pi * 1.5**2, rel=0.2)
        assert mask.any()
    assert peaks[512] == pytest.approx(1000.0)
    assert 100.0 < peaks[64] < 500.0


def test_sites_differ_and_noise_follows_the_site() -> None:
    sites = ph.make_sites(3, seed=0)
    assert ph.make_sites(3, seed=0) == sites
    assert len({s.noise_sigma_hu for s in sites}) == 3
    assert len({s.class_weights for s in sites}) == 3
    measured = []
    for s in sites:
        sl = ph.render_slice(np.random.default_rng(0), "Normal", s, image_size=96)
        air = sl.hu[:10, :]  # top rows: air, flat, so the spread there is the noise
        measured.append(float(air.std()))
    order_set = np.argsort([s.noise_sigma_hu for s in sites])
    assert list(np.argsort(measured)) == list(order_set)


def test_confounders_in_every_class_and_contrast_not_tied_to_class(tmp_path: Path) -> None:
    """Stones are mostly unenhanced (stone protocols); the other classes share the sites'
    contrast rates, so the phase is no shortcut between them."""
    from kidneyscan.data.phantom.lesions import STONE_UNENHANCED

    out = ph.generate_dataset(tmp_path, 160, seed=1, sites=3, image_size=64)
    meta = _read_csv(out / "phantom_metadata.csv")
    enhanced_rate = {}
    for c in CLASSES:
        rows = [m for m in meta if m["Class"] == c]
        assert len(rows) == 40
        assert any(int(m["n_phleboliths"]) > 0 for m in rows), c
        assert any(m["vessel_calcification"] == "True" for m in rows), c
        assert any(m["bowel_contrast"] == "True" for m in rows), c
        phases = {m["contrast_phase"] for m in rows}
        assert "none" in phases and phases & {"arterial", "portal"}, c
        if c != "Stone":
            assert phases == {"none", "arterial", "portal"}, c
        assert len({round(float(m["patient_width_mm"]) / 20) for m in rows}) >= 3, c
        enhanced_rate[c] = np.mean([m["contrast_phase"] != "none" for m in rows])
    stone = enhanced_rate.pop("Stone")
    assert max(enhanced_rate.values()) - min(enhanced_rate.values()) < 0.15, enhanced_rate
    assert stone <= 1.0 - STONE_UNENHANCED + 0.05 < min(enhanced_rate.values()), stone


def test_slice_level_and_width_are_stratified_per_site_and_class() -> None:
    # slice level (a strong grey-level driver) and patient width must not drift by class
    plan = _plan(400, seed=0, sites=ph.make_sites(3, seed=0))
    for jobs in plan.values():
        for site in range(3):
            cell = [j for j in jobs if j.site == site]
            for attr in ("level_u", "width_u"):
                u = np.array([getattr(j, attr) for j in cell])
                assert sorted(np.floor(u * len(cell)).astype(int)) == list(range(len(cell)))


def test_site_class_mix_differs_but_total_is_balanced() -> None:
    sites = ph.make_sites(3, seed=0)
    counts = _balanced_counts(400, sites)
    assert counts.sum() == 400 and list(counts.sum(axis=0)) == [100] * 4
    mix = counts / counts.sum(axis=1, keepdims=True)
    assert np.abs(mix - 0.25).max() > 0.05  # non-IID: some site is far from uniform


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"class_name": "Polyp"}, "unknown class"),
        ({"image_size": 16}, "image_size"),
        ({"slice_level": 1.5}, "slice_level"),
    ],
)
def test_render_slice_rejects_bad_arguments(kwargs: dict, message: str) -> None:
    args = {"class_name": "Cyst", "image_size": 64, **kwargs}
    with pytest.raises(ValueError, match=message):
        ph.render_slice(np.random.default_rng(0), site=ph.SiteProfile(), **args)


def test_rerun_into_same_folder_leaves_no_stale_images(tmp_path: Path) -> None:
    ph.generate_dataset(tmp_path, 12, seed=0, image_size=64)
    ph.generate_dataset(tmp_path, 8, seed=1, image_size=64)
    assert len(scan_dataset(tmp_path)) == 8
    assert len(list(tmp_path.glob("*/*.jpg"))) == 8
    assert len(list((tmp_path / "masks").glob("*.png"))) == 24
    assert len(list((tmp_path / "clean").glob("*.png"))) == 8
    # a tampered metadata csv cannot make a rerun delete files outside the folder
    outside = tmp_path.parent / f"{tmp_path.name}-keep.txt"
    outside.write_text("keep")
    with (tmp_path / "phantom_metadata.csv").open("a") as fh:
        fh.write(f"x,{outside},Cyst\n")
    ph.generate_dataset(tmp_path, 4, seed=2, image_size=64)
    assert outside.read_text() == "keep"


def test_refuses_to_mix_with_foreign_images(tmp_path: Path) -> None:
    (tmp_path / "Cyst").mkdir()
    (tmp_path / "Cyst" / "real.jpg").write_bytes(b"not ours")
    with pytest.raises(ValueError, match="not from a phantom run"):
        ph.generate_dataset(tmp_path, 4, image_size=64)
    assert (tmp_path / "Cyst" / "real.jpg").read_bytes() == b"not ours"


def test_generate_dataset_and_site_profile_reject_bad_input(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="n must be"):
        ph.generate_dataset(tmp_path, 0)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="not a directory"):
        ph.generate_dataset(tmp_path / "file", 4, image_size=64)
    with pytest.raises(ValueError, match="noise_sigma_hu"):
        ph.SiteProfile(noise_sigma_hu=-1)
    with pytest.raises(ValueError, match="class_weights"):
        ph.SiteProfile(class_weights=(1.0, 1.0, 1.0))  # type: ignore[arg-type]


def test_cli_phantom_writes_dataset(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from kidneyscan.cli import app

    result = CliRunner().invoke(
        app,
        ["phantom", "--out", str(tmp_path), "--n", "8", "--image-size", "64", "--no-progress"],
    )
    assert result.exit_code == 0, result.output
    assert len(scan_dataset(tmp_path)) == 8
    bad = CliRunner().invoke(app, ["phantom", "--out", str(tmp_path / "x"), "--n", "0"])
    assert bad.exit_code != 0
