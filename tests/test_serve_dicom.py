"""DICOM through the service: round trip, patient data never leaked, unusable files refused."""

from __future__ import annotations

import base64
import io
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from _serve_support import KIDNEY_BAND, ct_like, encode, make_checkpoint, multipart, phantom_hu
from kidneyscan.serve import ServeConfig, create_app

PHI = {
    "PatientName": "DOE^JANE^QUINCY",
    "PatientID": "PID-8675309",
    "PatientBirthDate": "19700412",
    "AccessionNumber": "ACC-4242-XYZ",
    "InstitutionName": "St Example General Hospital",
    "ReferringPhysicianName": "HOUSE^GREGORY",
}
PHI_STRINGS = ["DOE", "JANE", "QUINCY", "8675309", "19700412", "4242-XYZ", "St Example", "HOUSE"]


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory):
    ckpt = make_checkpoint(tmp_path_factory.mktemp("ckpt"))
    return create_app(ServeConfig(checkpoint=ckpt, rate_limit=0)).test_client()


def _dicom(hu: np.ndarray | None = None, **extra: object):
    from kidneyscan.testing.dicom import make_ct_dataset

    if hu is None:
        hu = ct_like(80).astype(np.float32) * 2 - 200
    return make_ct_dataset(hu, extra=extra)


def _bytes(ds) -> bytes:
    from kidneyscan.testing.dicom import dataset_to_bytes

    return dataset_to_bytes(ds)


def test_dicom_round_trip_never_leaks_patient_data(client, caplog):
    # Prepare: a CT slice carrying patient data, in a multipart upload named after the patient.
    data = _bytes(_dicom(**PHI))
    assert b"DOE^JANE" in data
    caplog.set_level(logging.DEBUG)
    # Execute
    predict = client.post("/api/v1/predict", data=multipart(data, names=["DOE_JANE.dcm"]))
    explain = client.post("/api/v1/explain", data=multipart(data, names=["DOE_JANE.dcm"]))
    as_json = client.post("/api/v1/predict", json={"image": base64.b64encode(data).decode()})
    # Assert: it was analysed as CT...
    for resp in (predict, explain, as_json):
        assert resp.status_code == 200, resp.get_data(as_text=True)
    res = explain.get_json()["results"][0]
    assert res["input"]["type"] == "dicom"
    assert res["input"]["dicom"]["modality"] == "CT"
    assert res["input"]["dicom"]["window"]["name"] == "abdomen"
    # ...and no identifying value appears in any response, log line or heatmap PNG.
    texts = [r.get_data(as_text=True) for r in (predict, explain, as_json)] + [caplog.text]
    pngs = [base64.b64decode(res["explanation"][k]) for k in ("heatmap_png", "overlay_png")]
    pngs.append(base64.b64decode(res["explanation"]["image_png"]))
    for secret in PHI_STRINGS:
        for text in texts:
            assert secret not in text
        for png in pngs:
            assert secret.encode() not in png
    for png in pngs:
        assert not Image.open(io.BytesIO(png)).info  # no text chunks or other metadata
    assert "POST /api/v1/explain -> 200" in caplog.text  # the log did record the request


def test_dicom_hu_window_matches_training_loader(client, tmp_path: Path):
    # Prepare: the same slice as a file, loaded the way training does.
    from kidneyscan.data.datasets import load_image
    from kidneyscan.serve.inputs import decode_upload

    data = _bytes(_dicom())
    path = tmp_path / "slice.dcm"
    path.write_bytes(data)
    # Execute / Assert
    np.testing.assert_array_equal(decode_upload(data).image, load_image(path))


def _no_pixels() -> bytes:
    ds = _dicom()
    del ds.PixelData
    return _bytes(ds)


def _modality(mod: str) -> bytes:
    ds = _dicom()
    ds.Modality = mod
    return _bytes(ds)


def _huge_header() -> bytes:
    ds = _dicom()
    ds.Rows, ds.Columns = 20_000, 20_000
    return _bytes(ds)


def _nested(depth: int) -> bytes:
    """A valid DICOM with sequences nested ``depth`` levels deep (undefined lengths)."""
    import struct

    base = _bytes(_dicom())
    # (0008,1115) ReferencedSeriesSequence in explicit VR little endian, undefined lengths.
    seq = struct.pack("<HH", 0x0008, 0x1115) + b"SQ\0\0" + b"\xff\xff\xff\xff"
    item = struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF)
    item_end = struct.pack("<HHI", 0xFFFE, 0xE00D, 0)
    seq_end = struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
    body = (seq + item) * depth + (item_end + seq_end) * depth
    # Insert after the file meta group, i.e. at the first dataset element (0008,xxxx).
    pos = base.index(struct.pack("<HH", 0x0008, 0x0016))
    return base[:pos] + body + base[pos:]


def _truncated() -> bytes:
    data = _bytes(_dicom())
    return data[: len(data) - 3000]


@pytest.mark.parametrize(
    "make,status",
    [
        (_no_pixels, 422),
        (lambda: _modality("MR"), 422),
        (_huge_header, 413),
        (lambda: _nested(20), 400),
        (lambda: _nested(2000), 400),
        (_truncated, 400),
        (lambda: b"\0" * 128 + b"DICM" + b"\xff" * 300, None),
    ],
    ids=[
        "no-pixels",
        "not-ct",
        "huge-header",
        "nested-20",
        "nested-2000",
        "truncated",
        "garbage-after-magic",
    ],
)
def test_unusable_dicom_gets_4xx_json_without_patient_data(client, make, status):
    # Prepare
    data = make()
    # Execute
    resp = client.post("/api/v1/predict", data=multipart(data))
    # Assert
    if status is None:
        assert 400 <= resp.status_code < 500
    else:
        assert resp.status_code == status, resp.get_data(as_text=True)
    assert resp.is_json and resp.get_json()["error"]["message"]
    assert client.get("/health/live").status_code == 200


def test_phi_in_unusable_dicom_is_not_echoed(client):
    # Prepare: a DICOM with patient data but no pixel data.
    ds = _dicom(**PHI)
    del ds.PixelData
    # Execute
    resp = client.post("/api/v1/predict", data=multipart(_bytes(ds)))
    # Assert
    assert resp.status_code == 422
    assert "pixel" in resp.get_json()["error"]["message"]
    for secret in PHI_STRINGS:
        assert secret not in resp.get_data(as_text=True)


# -- DICOM as trained: the CT-KIDNEY JPEGs' soft-tissue window, W 400 / L 40 --------------------
@pytest.fixture(scope="module")
def band_client(tmp_path_factory: pytest.TempPathFactory):
    """A service whose preprocessing is the default recipe's (kidney band, 3:2) in miniature."""
    ckpt = make_checkpoint(
        tmp_path_factory.mktemp("band"), steps=KIDNEY_BAND, image_size=64, image_width=96
    )
    return create_app(ServeConfig(checkpoint=ckpt, rate_limit=0)).test_client()


def _levels(hu: np.ndarray, width: float = 400.0, level: float = 40.0) -> np.ndarray:
    """8-bit grey levels of ``hu`` in a linear window: how a windowed PNG/JPEG export is made."""
    lo = level - width / 2
    return np.rint(np.clip((hu - lo) / width, 0.0, 1.0) * 255).astype(np.uint8)


def _probabilities(client, data: bytes) -> tuple[np.ndarray, dict]:
    resp = client.post("/api/v1/predict", data=multipart(data))
    assert resp.status_code == 200, resp.get_data(as_text=True)
    res = resp.get_json()["results"][0]
    return np.array([res["probabilities"][c] for c in sorted(res["probabilities"])]), res


@pytest.mark.parametrize("seed", [0, 1])
def test_dicom_and_its_windowed_png_give_the_same_probabilities(band_client, seed):
    # Prepare: a phantom slice in HU. The PNG is its W400/L40 window in 8 bits; the DICOM
    # stores exactly those grey levels as HU (slope 400/255, intercept -160, so each level is
    # the HU at the centre of its window step), which takes 8-bit rounding out of the
    # comparison: any difference left comes from the window the service applies.
    hu = np.rint(phantom_hu(192, seed))
    k = _levels(hu)
    ds = _dicom(hu)
    ds.RescaleSlope = "1.56862745098039"  # 400 / 255 within the 16 characters a DS allows
    ds.RescaleIntercept = -160
    ds.PixelData = k.astype(np.uint16).tobytes()
    # Execute
    p_dicom, r_dicom = _probabilities(band_client, _bytes(ds))
    p_png, r_png = _probabilities(band_client, encode(k))
    p_shifted, _ = _probabilities(band_client, encode(_levels(hu, level=60.0)))
    # Assert: same crop, same probabilities...
    assert r_dicom["input"]["dicom"]["window"] == {"name": "abdomen", "width": 400.0, "level": 40.0}
    assert r_dicom["roi"] == r_png["roi"] and r_png["roi"]["source"] == "spine"
    np.testing.assert_allclose(p_dicom, p_png, rtol=0, atol=1e-4)
    # ...and the comparison would see a window off by 20 HU.
    assert np.abs(p_shifted - p_png).max() > 1e-3


def test_integer_hu_dicom_matches_its_png_to_half_a_grey_level():
    # Prepare: ordinary scanner storage (integer HU, slope 1, intercept -1024).
    from kidneyscan.serve.inputs import decode_upload

    hu = np.rint(phantom_hu(128, 2))
    # Execute
    from_dicom = decode_upload(_bytes(_dicom(hu))).image
    from_png = decode_upload(encode(_levels(hu))).image
    # Assert: the service keeps the DICOM's finer levels (as the training loader does), so the
    # two differ only by the PNG's rounding to 256 levels; a 10 HU window error is 6 levels.
    diff = np.abs(from_dicom - from_png)
    assert diff.max() <= 0.5 / 255 + 1e-6
    assert diff.max() > 0.25 / 255  # the DICOM really is finer than 8 bits


def test_model_card_states_the_dicom_window(band_client):
    card = band_client.get("/api/v1/model").get_json()
    assert card["input"]["dicom_window"] == {"name": "abdomen", "width": 400, "level": 40}
