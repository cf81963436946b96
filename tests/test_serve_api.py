"""The Flask service through its test client: every endpoint, alias and error."""

from __future__ import annotations

import base64
import io
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from _serve_support import (
    CLASSES,
    TEMPERATURE,
    ct_like,
    encode,
    make_checkpoint,
    multipart,
    png_with_size,
)
from kidneyscan.serve import ServeConfig, create_app
from kidneyscan.serve.app import get_state
from kidneyscan.serve.security import RateLimiter


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt"))


@pytest.fixture(scope="module")
def app(ckpt: Path):
    return create_app(ServeConfig(checkpoint=ckpt, rate_limit=0))


@pytest.fixture(scope="module")
def make_client(app, ckpt: Path):
    """Apps with other settings, sharing the loaded predictor (loading is the slow part)."""

    def make(**settings):
        cfg = ServeConfig(checkpoint=ckpt, **{"rate_limit": 0, **settings})
        return create_app(cfg, predictor=get_state(app).predictor).test_client()

    return make


@pytest.fixture
def client(app):
    return app.test_client()


PNG = encode(ct_like(96, seed=1))
JPEG = encode(ct_like(96, seed=2), "JPEG", quality=90)


def _error(resp, status: int) -> dict:
    assert resp.status_code == status, resp.get_data(as_text=True)
    assert resp.is_json
    err = resp.get_json()["error"]
    assert err["status"] == status and err["message"]
    return err


# -- predict ----------------------------------------------------------------------------------
def test_predict_png_gives_calibrated_probabilities_band_and_model_facts(client, ckpt):
    # Prepare
    from kidneyscan.models.checkpoint import read_metadata

    meta = read_metadata(ckpt)
    # Execute
    resp = client.post("/api/v1/predict", data=multipart(PNG))
    # Assert
    assert resp.status_code == 200
    body = resp.get_json()
    assert body["model"]["weights_sha256"] == meta["weights_sha256"]
    assert body["model"]["name"] == "convnext_atto" and body["model"]["temperature"] == TEMPERATURE
    (res,) = body["results"]
    probs = res["probabilities"]
    assert list(probs) == CLASSES
    assert sum(probs.values()) == pytest.approx(1.0, abs=1e-5)
    assert res["predicted_class"] == max(probs, key=probs.get)
    assert res["confidence"] == pytest.approx(max(probs.values()))
    conf = res["confidence"]
    expected_band = (
        "high" if conf >= 0.9 else "good" if conf >= 0.7 else "moderate" if conf >= 0.5 else "low"
    )
    assert res["confidence_band"] == expected_band
    assert res["refer_to_radiologist"] == (conf < body["refer_threshold"])
    assert res["input"] == {"type": "png", "width": 96, "height": 96}
    assert {"decode", "preprocess", "inference"} <= set(res["timing_ms"])
    assert "Research use only" in body["disclaimer"]


def test_probabilities_are_softmax_of_logits_over_temperature(client, app, tmp_path):
    # Prepare: the evaluation path (file on disk -> load_image -> Preprocessor -> model)
    from kidneyscan.data.datasets import load_image

    path = tmp_path / "slice.png"
    path.write_bytes(PNG)
    predictor = get_state(app).predictor
    with torch.inference_mode():
        logits = predictor.model(predictor.preprocessor(load_image(path))[None])
    expected = torch.softmax(logits / TEMPERATURE, dim=1)[0].numpy()
    # Execute
    res = client.post("/api/v1/predict", data=multipart(PNG)).get_json()["results"][0]
    # Assert
    got = np.array([res["probabilities"][c] for c in CLASSES])
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert not np.allclose(got, torch.softmax(logits, dim=1)[0].numpy(), atol=1e-4)


@pytest.mark.parametrize("kind", ["png", "jpeg", "dicom"])
def test_served_tensor_equals_evaluation_tensor(app, tmp_path, kind):
    # Prepare: the same file, read the evaluation way and the serving way.
    from kidneyscan.data.datasets import load_image
    from kidneyscan.serve.inputs import decode_upload

    if kind == "dicom":
        from kidneyscan.testing.dicom import dataset_to_bytes, make_ct_dataset

        hu = ct_like(80).astype(np.float32) * 2 - 200
        data = dataset_to_bytes(make_ct_dataset(hu))
    else:
        data = PNG if kind == "png" else JPEG
    path = tmp_path / f"slice.{'dcm' if kind == 'dicom' else kind}"
    path.write_bytes(data)
    predictor = get_state(app).predictor
    # Execute
    eval_tensor = predictor.preprocessor(load_image(path))
    _, served_tensor, _ = predictor.prepare(decode_upload(data).image)
    # Assert
    assert served_tensor.shape == (3, 64, 64)
    assert torch.equal(served_tensor, eval_tensor)


def test_several_files_keep_their_order(client):
    # Prepare
    other = encode(ct_like(64, seed=7))
    single_a = client.post("/api/v1/predict", data=multipart(PNG)).get_json()["results"][0]
    single_b = client.post("/api/v1/predict", data=multipart(other)).get_json()["results"][0]
    # Execute
    body = client.post("/api/v1/predict", data=multipart(PNG, other, JPEG)).get_json()
    # Assert
    assert body["count"] == 3
    assert [r["index"] for r in body["results"]] == [0, 1, 2]
    assert [r["input"]["type"] for r in body["results"]] == ["png", "png", "jpeg"]
    for batched, single in ((body["results"][0], single_a), (body["results"][1], single_b)):
        for c in CLASSES:
            assert batched["probabilities"][c] == pytest.approx(
                single["probabilities"][c], abs=1e-4
            )


def test_file_names_are_not_echoed(client):
    resp = client.post("/api/v1/predict", data=multipart(PNG, names=["DOE_JANE_1970.png"]))
    assert resp.status_code == 200
    assert "DOE_JANE" not in resp.get_data(as_text=True)


@pytest.mark.parametrize(
    "body",
    [
        {"image": base64.b64encode(PNG).decode()},
        {"images": [base64.b64encode(PNG).decode(), {"data": base64.b64encode(JPEG).decode()}]},
        {"image": "data:image/png;base64," + base64.b64encode(PNG).decode()},
    ],
    ids=["image", "images-list", "data-url"],
)
def test_predict_accepts_base64_json(client, body):
    resp = client.post("/api/v1/predict", json=body)
    assert resp.status_code == 200
    assert resp.get_json()["count"] == len(body.get("images", [None]))


# -- explain ----------------------------------------------------------------------------------
def _png_array(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))))


def test_explain_returns_heatmap_for_predicted_class(client):
    # Execute
    resp = client.post("/api/v1/explain", data=multipart(PNG))
    # Assert
    assert resp.status_code == 200
    res = resp.get_json()["results"][0]
    ex = res["explanation"]
    assert ex["method"] == "Grad-CAM" and ex["target_class"] == res["predicted_class"]
    assert ex["layer"] == "stages.3"
    assert _png_array(ex["heatmap_png"]).shape == (64, 64, 4)
    assert _png_array(ex["overlay_png"]).shape == (64, 64, 3)
    assert _png_array(ex["image_png"]).shape == (64, 64)
    assert res["timing_ms"]["gradcam"] > 0


def test_explain_requested_class_changes_heatmap(client):
    # Execute
    maps = {}
    for cls in ("Cyst", "tumor", "2"):
        resp = client.post("/api/v1/explain", data={**multipart(PNG), "target_class": cls})
        assert resp.status_code == 200
        maps[cls] = resp.get_json()["results"][0]["explanation"]
    # Assert: names are case-insensitive, indices work, and the heatmap depends on the class.
    assert [maps[c]["target_class"] for c in maps] == ["Cyst", "Tumor", "Stone"]
    assert maps["Cyst"]["heatmap_png"] != maps["tumor"]["heatmap_png"]


@pytest.mark.parametrize(
    "field,value", [("target_class", "Kidney"), ("target_class", "7"), ("alpha", "2")]
)
def test_explain_rejects_bad_options(client, field, value):
    err = _error(client.post("/api/v1/explain", data={**multipart(PNG), field: value}), 400)
    assert field.split("_")[0] in err["message"]


@pytest.mark.parametrize("value", [[1], 9, True, {"c": 1}, 0.5])
def test_explain_rejects_bad_json_target_class(client, value):
    body = {"image": base64.b64encode(PNG).decode(), "target_class": value}
    _error(client.post("/api/v1/explain", json=body), 400)


# -- model card, openapi, health ---------------------------------------------------------------
def test_model_card_comes_from_metadata(client):
    card = client.get("/api/v1/model").get_json()
    assert card["classes"] == CLASSES
    assert card["architecture"]["name"] == "convnext_atto"
    assert card["input"]["image_size"] == 64
    assert card["preprocessing"]["image_size"] == 64
    assert card["training"] == {"dataset": "test fixture", "n": 0}
    assert card["metrics"] == {"test": {"macro_f1": 0.25}}
    assert card["calibration"]["temperature"] == TEMPERATURE
    assert "not for diagnosis" in card["intended_use"].lower()
    assert len(card["limitations"]) >= 3


def test_openapi_lists_every_route(client):
    doc = client.get("/api/v1/openapi.json").get_json()
    assert doc["openapi"].startswith("3.")
    for path in (
        "/api/v1/predict",
        "/api/v1/explain",
        "/api/v1/model",
        "/health/live",
        "/health/ready",
        "/upload",
        "/api/analyze",
        "/model-info",
        "/health",
    ):
        assert path in doc["paths"], path
    assert (
        doc["components"]["schemas"]["Result"]["properties"]["predicted_class"]["enum"] == CLASSES
    )


def test_health_live_and_ready(client):
    assert client.get("/health/live").get_json() == {"status": "live"}
    ready = client.get("/health/ready")
    assert ready.status_code == 200 and ready.get_json()["status"] == "ready"


def test_ready_is_503_while_model_cannot_load(tmp_path, ckpt):
    # Prepare: a checkpoint whose weights no longer match their SHA-256.
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(ckpt, bad)
    with (bad / "model.safetensors").open("r+b") as fh:
        fh.seek(-4, 2)
        fh.write(b"\0\0\0\1")
    app = create_app(ServeConfig(checkpoint=bad, background_load=True, rate_limit=0))
    client = app.test_client()
    deadline = time.time() + 60
    while get_state(app).load_error is None and time.time() < deadline:
        time.sleep(0.05)
    # Execute
    ready = client.get("/health/ready")
    predict = client.post("/api/v1/predict", data=multipart(PNG))
    # Assert
    assert client.get("/health/live").status_code == 200
    assert ready.status_code == 503 and ready.get_json()["status"] == "failed"
    assert "SHA-256" in ready.get_json()["reason"]
    _error(predict, 503)
    assert predict.headers["Retry-After"] == "5"


def test_missing_checkpoint_says_how_to_make_one(tmp_path):
    with pytest.raises(FileNotFoundError, match="make demo"):
        create_app(ServeConfig(checkpoint=tmp_path / "none"))


# -- aliases ----------------------------------------------------------------------------------
def test_alias_routes_match_their_targets(client):
    # Execute
    upload = client.post("/upload", data=multipart(PNG)).get_json()
    predict = client.post("/api/v1/predict", data=multipart(PNG)).get_json()
    analyze = client.post("/api/analyze", data=multipart(PNG)).get_json()
    # Assert
    assert upload["results"][0]["probabilities"] == predict["results"][0]["probabilities"]
    assert "heatmap_png" in analyze["results"][0]["explanation"]
    assert client.get("/model-info").get_json() == client.get("/api/v1/model").get_json()
    assert client.get("/health").get_json()["status"] == "ready"


# -- web page ---------------------------------------------------------------------------------
def test_index_page_has_upload_disclaimer_and_local_assets(client):
    html = client.get("/").get_data(as_text=True)
    assert 'type="file"' in html and "multiple" in html
    assert "Research use only" in html
    assert "http://" not in html and "https://" not in html  # no CDN: works offline
    for asset in ("/static/app.js", "/static/style.css"):
        assert asset in html
        assert client.get(asset).status_code == 200


# -- bad input --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "data,status,code",
    [
        (b"", 400, "empty_file"),
        (b"just some text, named .png by the client", 415, "unsupported_media_type"),
        (b"GIF89a" + bytes(64), 415, "unsupported_media_type"),
        (PNG[: len(PNG) // 2], 400, "corrupt_image"),
        (JPEG[:200], 400, "corrupt_image"),
        (png_with_size(50_000, 50_000), 413, "image_too_large"),
        (png_with_size(5_000, 5_000), 413, "image_too_large"),
        (encode(ct_like(8)), 422, "image_too_small"),
    ],
    ids=["empty", "text", "gif", "truncated-png", "truncated-jpeg", "bomb", "5000px", "tiny"],
)
def test_bad_files_get_4xx_json(client, data, status, code):
    err = _error(client.post("/api/v1/predict", data=multipart(data)), status)
    assert err["code"] == code


def test_pixel_limit_is_checked_before_decoding(client, monkeypatch):
    # A header claiming 50,000 x 50,000 pixels must be refused without decoding pixel data.
    from PIL import ImageFile

    def boom(self):  # pragma: no cover - failing path
        raise AssertionError("pixel data was decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", boom)
    for side in (50_000, 5_000):
        err = _error(client.post("/api/v1/predict", data=multipart(png_with_size(side, side))), 413)
        assert "before decoding" in err["message"]


def test_bad_file_in_a_batch_fails_alone_and_is_named(client):
    # Prepare
    other = encode(ct_like(64, seed=7))
    singles = [
        client.post("/api/v1/predict", data=multipart(b)).get_json()["results"][0]
        for b in (PNG, other)
    ]
    # Execute: good, not an image, good, truncated
    resp = client.post(
        "/api/v1/predict", data=multipart(PNG, b"junk" * 40, other, PNG[: len(PNG) // 2])
    )
    # Assert: 200, one entry per file in upload order, the two good ones unchanged.
    assert resp.status_code == 200, resp.get_data(as_text=True)
    body = resp.get_json()
    assert (body["count"], body["succeeded"], body["failed"]) == (4, 2, 2)
    assert [r["index"] for r in body["results"]] == [0, 1, 2, 3]
    assert [r["ok"] for r in body["results"]] == [True, False, True, False]
    bad, truncated = body["results"][1]["error"], body["results"][3]["error"]
    assert (bad["status"], bad["code"]) == (415, "unsupported_media_type")
    assert bad["message"].startswith("file 2") and "not a PNG, JPEG or DICOM" in bad["message"]
    assert (truncated["status"], truncated["code"]) == (400, "corrupt_image")
    assert truncated["message"].startswith("file 4")
    for batched, single in zip((body["results"][0], body["results"][2]), singles, strict=True):
        assert batched["predicted_class"] == single["predicted_class"]
        for c in CLASSES:
            assert batched["probabilities"][c] == pytest.approx(
                single["probabilities"][c], abs=1e-4
            )


def test_batch_explain_keeps_failures_in_place(client):
    resp = client.post("/api/v1/explain", data=multipart(b"", PNG))
    assert resp.status_code == 200
    first, second = resp.get_json()["results"]
    assert first["ok"] is False and first["error"]["code"] == "empty_file"
    assert "explanation" not in first
    assert second["ok"] is True and second["explanation"]["method"] == "Grad-CAM"


def test_batch_where_every_file_fails_is_4xx_with_each_reason(client):
    # Execute
    resp = client.post("/api/v1/predict", data=multipart(b"junk" * 40, b"more junk" * 20))
    # Assert: the error of the first file, and every file's own entry.
    err = _error(resp, 415)
    assert "none of the 2 files" in err["message"] and "file 2" in err["message"]
    body = resp.get_json()
    assert (body["count"], body["succeeded"], body["failed"]) == (2, 0, 2)
    assert [r["error"]["code"] for r in body["results"]] == ["unsupported_media_type"] * 2


def test_one_bad_file_alone_is_still_a_plain_4xx(client):
    err = _error(client.post("/api/v1/predict", data=multipart(b"junk" * 40)), 415)
    assert err["message"].startswith("the file")
    assert "results" not in client.post("/api/v1/predict", data=multipart(b"")).get_json()


@pytest.mark.parametrize(
    "kwargs,status",
    [
        ({"data": "x=1", "content_type": "text/plain"}, 415),
        ({"data": {"note": "no file"}, "content_type": "multipart/form-data"}, 400),
        ({"data": {"note": "no file"}}, 415),
        ({"data": "{not json", "content_type": "application/json"}, 400),
        ({"json": {"image": "@@@not base64@@@"}}, 400),
        ({"json": {"images": "not-a-list"}}, 400),
        ({"json": {"image": 12}}, 400),
    ],
    ids=[
        "text-plain",
        "no-file",
        "urlencoded",
        "bad-json",
        "bad-base64",
        "images-not-list",
        "image-not-str",
    ],
)
def test_malformed_requests_get_4xx_json(client, kwargs, status):
    _error(client.post("/api/v1/predict", **kwargs), status)


def test_too_many_files_is_413(make_client):
    client = make_client(max_files=2)
    err = _error(client.post("/api/v1/predict", data=multipart(PNG, PNG, PNG)), 413)
    assert "at most 2" in err["message"]


def test_request_over_max_content_length_is_413_json(make_client):
    client = make_client(max_upload_mb=0.01)
    big = encode((np.random.default_rng(0).random((200, 200)) * 255).astype(np.uint8))
    assert len(big) > 0.01 * 1048576
    err = _error(client.post("/api/v1/predict", data=multipart(big)), 413)
    assert "MiB" in err["message"]


def test_unknown_route_and_wrong_method_are_json(client):
    _error(client.get("/api/v1/nothing"), 404)
    resp = client.get("/api/v1/predict")
    _error(resp, 405)
    assert "POST" in resp.headers["Allow"]


def test_uploads_are_never_spooled_to_disk(client, monkeypatch):
    # Werkzeug spools uploads over 500 KiB to temporary files; the service must not.
    import tempfile

    import werkzeug.formparser

    def no_disk(*args, **kwargs):  # pragma: no cover - failing path
        raise AssertionError("upload written to a temporary file")

    for mod in (tempfile, werkzeug.formparser):
        for name in ("SpooledTemporaryFile", "TemporaryFile", "NamedTemporaryFile"):
            if hasattr(mod, name):
                monkeypatch.setattr(mod, name, no_disk)
    big = encode((np.random.default_rng(1).random((800, 800)) * 255).astype(np.uint8))
    assert len(big) > 500 * 1024
    assert client.post("/api/v1/predict", data=multipart(big)).status_code == 200


def test_internal_errors_are_json_without_details(app, ckpt, caplog):
    # Prepare: a route that fails like a bug would.
    app = create_app(ServeConfig(checkpoint=ckpt, rate_limit=0), predictor=get_state(app).predictor)

    def broken():
        raise KeyError("secret detail")

    app.add_url_rule("/broken", view_func=broken)
    # Execute
    resp = app.test_client().get("/broken")
    # Assert
    err = _error(resp, 500)
    assert "secret detail" not in resp.get_data(as_text=True)
    assert err["code"] == "internal_error"
    assert "secret detail" not in caplog.text


def test_no_debug_and_security_headers(app, client):
    assert app.debug is False and app.config["DEBUG"] is False
    resp = client.get("/")
    assert resp.headers["X-Content-Type-Options"] == "nosniff"
    assert "default-src 'self'" in resp.headers["Content-Security-Policy"]
    api = client.get("/api/v1/model")
    assert api.headers["Cache-Control"] == "no-store"


# -- auth and rate limit ----------------------------------------------------------------------
def test_bearer_token_required_when_configured(make_client):
    # Prepare
    token = "s3cret-token-for-tests-0123"
    client = make_client(api_token=token)
    # Execute
    none = client.post("/api/v1/predict", data=multipart(PNG))
    wrong = client.post(
        "/api/v1/predict", data=multipart(PNG), headers={"Authorization": "Bearer nope"}
    )
    alias = client.post("/upload", data=multipart(PNG))
    good = client.post(
        "/api/v1/predict", data=multipart(PNG), headers={"Authorization": f"Bearer {token}"}
    )
    # Assert
    assert _error(none, 401)["code"] == "unauthorized"
    assert none.headers["WWW-Authenticate"].startswith("Bearer")
    _error(wrong, 401)
    _error(alias, 401)
    _error(client.get("/api/v1/model"), 401)
    assert good.status_code == 200
    assert token not in good.get_data(as_text=True)
    # Health checks and the API description stay open for load balancers and clients.
    assert client.get("/health/ready").status_code == 200
    assert client.get("/api/v1/openapi.json").get_json()["security"] == [{"bearer": []}]


def test_short_token_is_refused():
    with pytest.raises(ValueError, match="at least 16"):
        ServeConfig(api_token="short")


def test_rate_limit_gives_429_with_retry_after(make_client):
    # Prepare
    client = make_client(rate_limit=3)
    # Execute
    codes = [client.post("/api/v1/predict", data=multipart(PNG)).status_code for _ in range(4)]
    limited = client.get("/api/v1/model")
    # Assert
    assert codes == [200, 200, 200, 429]
    err = _error(limited, 429)
    assert int(limited.headers["Retry-After"]) >= 1
    assert "rate limit" in err["message"]
    assert client.get("/health/ready").status_code == 200  # health checks are not limited


def test_rate_limiter_window_slides_and_clients_are_separate():
    # Prepare
    now = [100.0]
    limiter = RateLimiter(2, 10.0, clock=lambda: now[0])
    # Execute / Assert
    assert limiter.hit("a") is None and limiter.hit("a") is None
    assert limiter.hit("a") == 10
    assert limiter.hit("b") is None
    now[0] += 10.5
    assert limiter.hit("a") is None


def test_settings_from_environment():
    cfg = ServeConfig.from_env(
        {"KIDNEYSCAN_MAX_UPLOAD_MB": "8", "KIDNEYSCAN_RATE_LIMIT": "0", "KIDNEYSCAN_BACKEND": ""},
        refer_threshold=0.8,
    )
    assert cfg.max_content_length == 8 * 1024 * 1024
    assert cfg.rate_limit == 0 and cfg.refer_threshold == 0.8 and cfg.backend == "torch"
    with pytest.raises(ValueError, match="KIDNEYSCAN_MAX_PIXELS"):
        ServeConfig.from_env({"KIDNEYSCAN_MAX_PIXELS": "lots"})


@pytest.mark.slow
def test_onnx_backend_serves_the_same_probabilities(client, ckpt):
    # Prepare: the same checkpoint behind the perf area's ONNX Runtime backend.
    pytest.importorskip("onnxruntime")
    onnx_client = create_app(
        ServeConfig(checkpoint=ckpt, backend="onnx", rate_limit=0)
    ).test_client()
    # Execute
    torch_res = client.post("/api/v1/predict", data=multipart(PNG)).get_json()
    onnx_res = onnx_client.post("/api/v1/predict", data=multipart(PNG)).get_json()
    explained = onnx_client.post("/api/v1/explain", data=multipart(PNG))
    # Assert
    assert onnx_res["model"]["backend"].startswith("onnx")
    assert torch_res["model"]["backend"] == "torch"
    for c in CLASSES:
        assert onnx_res["results"][0]["probabilities"][c] == pytest.approx(
            torch_res["results"][0]["probabilities"][c], abs=1e-4
        )
    assert explained.status_code == 200  # Grad-CAM still runs on the torch model
