"""DICOM through the service: round trip, patient data never leaked, unusable files refused."""

from __future__ import annotations

import base64
import io
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from _serve_support import ct_like, make_checkpoint, multipart
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
    from kidneyscan.data.dicom import make_ct_dataset

    if hu is None:
        hu = ct_like(80).astype(np.float32) * 2 - 200
    return make_ct_dataset(hu, extra=extra)


def _bytes(ds) -> bytes:
    from kidneyscan.data.dicom import dataset_to_bytes

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
