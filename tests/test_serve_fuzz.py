"""Fuzz: a few hundred malformed and mutated files -> only 4xx JSON, and the service lives on."""

from __future__ import annotations

import numpy as np
import pytest

from _serve_support import ct_like, encode, make_checkpoint, multipart
from kidneyscan.serve import ServeConfig, create_app


def _seeds() -> list[bytes]:
    from kidneyscan.testing.dicom import dataset_to_bytes, make_ct_dataset

    dicom = dataset_to_bytes(make_ct_dataset(ct_like(48).astype(np.float32) * 2 - 200))
    return [encode(ct_like(48)), encode(ct_like(48), "JPEG", quality=85), dicom]


def _mutants(rng: np.random.Generator, seeds: list[bytes], n: int) -> list[bytes]:
    out: list[bytes] = [b"", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"\0" * 128 + b"DICM"]
    while len(out) < n:
        src = bytearray(seeds[int(rng.integers(len(seeds)))])
        op = int(rng.integers(6))
        if op == 0:  # truncate anywhere
            src = src[: int(rng.integers(1, len(src)))]
        elif op == 1:  # flip a handful of bytes, mostly in the header
            for _ in range(int(rng.integers(1, 12))):
                pos = int(rng.integers(min(len(src), 400)))
                src[pos] = int(rng.integers(256))
        elif op == 2:  # flip bytes anywhere
            for _ in range(int(rng.integers(1, 40))):
                src[int(rng.integers(len(src)))] ^= 0xFF
        elif op == 3:  # insert junk in the middle
            pos = int(rng.integers(len(src)))
            src[pos:pos] = rng.integers(0, 256, int(rng.integers(1, 200)), dtype=np.uint8).tobytes()
        elif op == 4:  # valid magic, random rest
            head = bytes(src[:132]) if src[128:132] == b"DICM" else bytes(src[:8])
            src = bytearray(head + rng.integers(0, 256, 600, dtype=np.uint8).tobytes())
        else:  # duplicate / overwrite a chunk with a copy of another region
            a, b = sorted(int(x) for x in rng.integers(0, len(src), 2))
            src[a:b] = src[: b - a][::-1]
        out.append(bytes(src))
    return out


@pytest.mark.slow
def test_fuzzed_uploads_only_get_4xx_json_and_service_stays_up(tmp_path):
    # Prepare
    app = create_app(ServeConfig(checkpoint=make_checkpoint(tmp_path / "ckpt"), rate_limit=0))
    client = app.test_client()
    seeds = _seeds()
    mutants = _mutants(np.random.default_rng(1234), seeds, 250)
    # Execute
    statuses = []
    for i, blob in enumerate(mutants):
        route = "/api/v1/explain" if i % 25 == 0 else "/api/v1/predict"
        resp = client.post(route, data=multipart(blob))
        statuses.append(resp.status_code)
        # Assert (per file): never a server error; every refusal is a JSON error with a reason.
        assert resp.status_code < 500, (i, resp.get_data(as_text=True))
        assert resp.is_json
        if resp.status_code != 200:
            assert 400 <= resp.status_code < 500
            assert resp.get_json()["error"]["message"]
    # Assert (overall): most mutants are refused, and the service still works afterwards.
    refused = sum(400 <= s < 500 for s in statuses)
    assert refused >= len(mutants) // 2, f"only {refused} of {len(mutants)} refused"
    assert client.get("/health/ready").status_code == 200
    ok = client.post("/api/v1/predict", data=multipart(*seeds))
    assert ok.status_code == 200 and ok.get_json()["count"] == 3
