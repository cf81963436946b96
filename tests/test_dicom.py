"""DICOM reading: HU, windows, compressed pixels, series order, safety checks, no PHI leaks."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import JPEG2000Lossless

from kidneyscan.data import dicom
from kidneyscan.data.datasets import DataError, load_image
from kidneyscan.testing.dicom import dataset_to_bytes, make_ct_dataset

PHI = {
    "PatientName": "Doe^Jane",
    "PatientID": "SECRET-4711",
    "PatientBirthDate": "19610203",
    "AccessionNumber": "ACC-99812",
    "InstitutionName": "St Example Hospital",
    "ReferringPhysicianName": "House^Gregory",
}


def _hu_ramp(size: int = 64) -> np.ndarray:
    """A left-to-right HU ramp from -1000 (air) to 1500 (dense stone)."""
    return np.tile(np.linspace(-1000, 1500, size), (size, 1)).astype(np.float32)


def _ct_bytes(hu: np.ndarray | None = None, *, compress: bool = False, **extra: object) -> bytes:
    ds = make_ct_dataset(_hu_ramp() if hu is None else hu, extra={**PHI, **extra})
    if compress:
        ds.compress(JPEG2000Lossless, encoding_plugin="pylibjpeg")
    return dataset_to_bytes(ds)


def test_ct_small_to_hu_applies_rescale_slope_and_intercept() -> None:
    # Prepare
    path = get_testdata_file("CT_small.dcm")
    raw = pydicom.dcmread(path)
    expected = raw.pixel_array.astype(np.float32) * float(raw.RescaleSlope) + float(
        raw.RescaleIntercept
    )
    # Execute
    hu = dicom.to_hu(dicom.read_dicom(path))
    # Assert
    assert hu.dtype == np.float32
    np.testing.assert_array_equal(hu, expected)
    assert float(raw.RescaleIntercept) == -1024.0  # the test is meaningful only with an offset


def test_ct_small_loads_like_a_jpeg_through_load_image() -> None:
    # Execute
    image = load_image(get_testdata_file("CT_small.dcm"))
    # Assert
    assert image.shape == (128, 128)
    assert image.dtype == np.float32
    assert 0.0 <= image.min() < image.max() <= 1.0


@pytest.mark.parametrize(
    ("window", "hu", "expected"),
    [
        ("abdomen", [-160.0, 40.0, 240.0, -1000.0, 1000.0], [0.0, 0.5, 1.0, 0.0, 1.0]),
        ("bone", [-500.0, 400.0, 1300.0], [0.0, 0.5, 1.0]),
        ((100.0, 0.0), [-50.0, 0.0, 25.0], [0.0, 0.5, 0.75]),
    ],
)
def test_apply_window_maps_window_edges_to_0_and_1(
    window: str | tuple[float, float], hu: list[float], expected: list[float]
) -> None:
    # Execute
    out = dicom.apply_window(np.array(hu), window)
    # Assert
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, expected, atol=1e-6)


def test_stone_window_separates_stone_from_enhancing_kidney() -> None:
    # Prepare: kidney cortex 180 HU (nephrographic), uric-acid and oxalate stones 450 / 900 HU
    hu = np.array([180.0, 450.0, 900.0])
    # Execute
    abdomen = dicom.apply_window(hu, "abdomen")
    stone = dicom.apply_window(hu, "stone")
    # Assert: the soft-tissue window saturates both stones, the stone window keeps all apart
    assert abdomen[1] == abdomen[2] == 1.0
    assert 0.0 < stone[0] < stone[1] < stone[2] <= 1.0


def test_unknown_window_and_bad_width_are_clear_errors() -> None:
    with pytest.raises(DataError, match="unknown window 'lung'"):
        dicom.apply_window(np.zeros(3), "lung")
    with pytest.raises(DataError, match="positive"):
        dicom.apply_window(np.zeros(3), (0.0, 40.0))


def test_file_window_uses_the_stored_window() -> None:
    # Prepare
    data = _ct_bytes(WindowWidth=1000, WindowCenter=500)
    # Execute
    image, meta = dicom.load_dicom_bytes(data, window="file")
    # Assert: ramp column 0 is -1000 HU (below 0), last column 1500 HU (above 1000)
    assert meta["window"] == {"name": "file", "width": 1000.0, "level": 500.0}
    assert image[0, 0] == 0.0 and image[0, -1] == 1.0


def test_jpeg2000_compressed_pixels_decode_like_uncompressed() -> None:
    # Prepare
    plain = _ct_bytes()
    compressed = _ct_bytes(compress=True)
    # Execute
    ds = dicom.read_dicom(compressed)
    img_plain, _ = dicom.load_dicom_bytes(plain)
    img_j2k, _ = dicom.load_dicom_bytes(compressed)
    # Assert
    assert ds.file_meta.TransferSyntaxUID == JPEG2000Lossless
    assert len(compressed) < len(plain)
    np.testing.assert_array_equal(img_j2k, img_plain)
    np.testing.assert_allclose(dicom.to_hu(ds), np.rint(_hu_ramp()))


def test_load_dicom_bytes_meta_never_contains_patient_data(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Prepare
    caplog.set_level(logging.DEBUG)
    data = _ct_bytes()
    # Execute
    image, meta = dicom.load_dicom_bytes(data)
    # Assert
    assert image.shape == (64, 64)
    assert set(meta) == {
        "modality",
        "rows",
        "cols",
        "pixel_spacing_mm",
        "slice_thickness_mm",
        "window",
    }
    dumped = json.dumps(meta) + caplog.text
    for value in PHI.values():
        assert value not in dumped
        assert value.split("^")[0] not in dumped
    assert meta["pixel_spacing_mm"] == [0.7, 0.7]
    assert meta["slice_thickness_mm"] == 5.0


def _mr_bytes() -> bytes:
    ds = make_ct_dataset(_hu_ramp(), extra=PHI)
    ds.Modality = "MR"
    return dataset_to_bytes(ds)


def _rgb_bytes() -> bytes:
    ds = make_ct_dataset(_hu_ramp(), extra=PHI)
    ds.PhotometricInterpretation = "RGB"
    return dataset_to_bytes(ds)


def _no_pixels_bytes() -> bytes:
    ds = make_ct_dataset(_hu_ramp(), extra=PHI)
    del ds.PixelData
    return dataset_to_bytes(ds)


def _nested_bytes(depth: int) -> bytes:
    ds = make_ct_dataset(_hu_ramp(), extra=PHI)
    current: Dataset = ds
    for _ in range(depth):
        item = Dataset()
        current.ReferencedImageSequence = Sequence([item])
        current = item
    return dataset_to_bytes(ds)


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda: b"not a dicom at all" * 20, "not a DICOM file"),
        (lambda: _ct_bytes()[:1000], "no pixel data"),  # cut inside the header
        (lambda: _ct_bytes()[:-3000], "truncated"),  # cut inside the pixel data
        (_no_pixels_bytes, "no pixel data"),
        (_mr_bytes, "modality 'MR' is not CT"),
        (_rgb_bytes, "unsupported photometric interpretation 'RGB'"),
        (lambda: _nested_bytes(dicom.MAX_SEQUENCE_DEPTH + 2), "nested deeper"),
    ],
)
def test_bad_dicom_gives_clear_error_without_patient_data(make, reason: str) -> None:  # type: ignore[no-untyped-def]
    # Prepare
    data = make()
    # Execute
    with pytest.raises(DataError, match=reason) as err:
        dicom.load_dicom_bytes(data)
    # Assert
    message = str(err.value)
    assert message.startswith("DICOM upload:")
    for value in PHI.values():
        assert value not in message


def test_nesting_within_the_limit_is_accepted() -> None:
    image, _ = dicom.load_dicom_bytes(_nested_bytes(dicom.MAX_SEQUENCE_DEPTH))
    assert image.shape == (64, 64)


def test_size_limits_are_checked_before_decoding() -> None:
    data = _ct_bytes()
    with pytest.raises(DataError, match="exceeds the limit of 100"):
        dicom.load_dicom_bytes(data, max_bytes=100)
    with pytest.raises(DataError, match="64x64x1 pixels exceeds the limit of 1000"):
        dicom.read_dicom(data, max_pixels=1000)


def test_read_dicom_names_the_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"nope\.dcm: file not found"):
        dicom.load_dicom_image(tmp_path / "nope.dcm")


def _write_series(folder: Path, zs: list[float], *, positions: bool = True) -> None:
    series = pydicom.uid.generate_uid()
    for i, z in enumerate(zs):
        # Slice value encodes its z so the order is checkable after windowing.
        ds = make_ct_dataset(
            np.full((16, 16), z * 10.0),
            position_z=z,
            instance_number=int(z),
            series_uid=series,
        )
        if not positions:
            del ds.ImagePositionPatient
        ds.save_as(folder / f"file{i}.dcm", enforce_file_format=True)


@pytest.mark.parametrize("positions", [True, False])
def test_series_is_sorted_along_the_patient_axis(tmp_path: Path, positions: bool) -> None:
    # Prepare: files written in scrambled order, plus a stray non-DICOM file
    zs = [3.0, 1.0, 4.0, 2.0]
    _write_series(tmp_path, zs, positions=positions)
    (tmp_path / "notes.txt").write_text("not a slice")
    # Execute
    volume, paths = dicom.load_dicom_series(tmp_path, window=(1000.0, 0.0))
    # Assert
    assert volume.shape == (4, 16, 16)
    means = volume.mean(axis=(1, 2))
    assert np.all(np.diff(means) > 0)
    assert [p.name for p in paths] == ["file1.dcm", "file3.dcm", "file0.dcm", "file2.dcm"]


def test_series_of_mixed_series_is_rejected(tmp_path: Path) -> None:
    _write_series(tmp_path, [1.0, 2.0])
    other = make_ct_dataset(np.zeros((16, 16)))
    other.save_as(tmp_path / "other.dcm", enforce_file_format=True)
    with pytest.raises(DataError, match="2 different series"):
        dicom.load_dicom_series(tmp_path)


def test_empty_series_folder_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "readme.txt").write_text("x")
    with pytest.raises(DataError, match="no DICOM files"):
        dicom.load_dicom_series(tmp_path)


def test_deidentify_removes_phi_everywhere_and_keeps_series_together() -> None:
    # Prepare: PHI at top level, inside a sequence, and in a private tag
    series = pydicom.uid.generate_uid()
    slices = [
        make_ct_dataset(_hu_ramp(16), series_uid=series, extra=PHI, position_z=z)
        for z in (0.0, 1.0)
    ]
    for ds in slices:
        item = Dataset()
        item.PatientName = PHI["PatientName"]
        item.InstitutionName = PHI["InstitutionName"]
        ds.RequestAttributesSequence = Sequence([item])
        ds.ReferencedImageSequence = Sequence([Dataset()])
        ds.ReferencedImageSequence[0].PatientID = PHI["PatientID"]
        block = ds.private_block(0x0099, "ACME", create=True)
        block.add_new(0x01, "LO", PHI["PatientID"])
    original_sop = slices[0].SOPInstanceUID
    # Execute
    cleaned = [dicom.deidentify(ds) for ds in slices]
    raw = [dataset_to_bytes(ds) for ds in cleaned]
    # Assert
    for data in raw:
        for value in PHI.values():
            assert value.encode() not in data
    assert cleaned[0].PatientIdentityRemoved == "YES"
    assert cleaned[0].SOPInstanceUID != original_sop
    assert cleaned[0].file_meta.MediaStorageSOPInstanceUID == cleaned[0].SOPInstanceUID
    assert cleaned[0].SeriesInstanceUID == cleaned[1].SeriesInstanceUID != series
    image, _ = dicom.load_dicom_bytes(raw[0])  # still a valid, readable CT slice
    assert image.shape == (16, 16)


def test_invalid_patient_values_are_not_echoed_to_warnings_logs_or_errors(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: patient attributes whose values break their VR rules. pydicom quotes such values
    # in conversion errors (DS) and validation warnings; a valid placeholder is swapped for the
    # bad bytes after writing, because pydicom refuses to create the bad value itself.
    import warnings

    ds = make_ct_dataset(_hu_ramp())
    ds.PatientWeight = "12345678"
    ds.PatientName = "A" * 70 + "SECRETNAME"  # longer than PN allows
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        data = dataset_to_bytes(ds).replace(b"12345678", b"SECRET-W")
    caplog.clear()
    caplog.set_level(logging.DEBUG)
    # Strict reading (as another part of a process may set) turns a bad DS into a ValueError
    # quoting the value: the reader must not convert patient attributes at all.
    monkeypatch.setattr(pydicom.config.settings, "reading_validation_mode", pydicom.config.RAISE)
    # Execute
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        image, meta = dicom.load_dicom_bytes(data)
        cleaned = dataset_to_bytes(dicom.deidentify(dicom.read_dicom(data)))
    # Assert
    echoed = caplog.text + " ".join(str(w.message) for w in caught) + json.dumps(meta)
    assert "SECRET" not in echoed
    assert b"SECRET" not in cleaned
    assert image.shape == (64, 64)
