"""The one pipeline: every DIP step registered, serialisable, and deterministic after JSON."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from kidneyscan.preprocess import enhance
from kidneyscan.preprocess.pipeline import STEPS, Preprocessor
from preprocess_synth import synth_slice

EXPECTED_STEPS = {
    "window", "equalize", "clahe", "match_histogram", "stretch", "gamma", "sharpen", "unsharp",
    "smooth_mean", "smooth_gaussian", "smooth_median", "smooth_bilateral", "fft_filter",
    "mean_arithmetic", "mean_geometric", "mean_harmonic", "mean_contraharmonic", "median",
    "median_adaptive", "mean_alpha_trimmed", "wiener", "nlm", "tv", "bm3d", "notch",
    "restore_auto", "denoise", "dilate", "erode", "open", "close", "crop_kidney_band", "crop_body",
    "crop_kidney_band_masked",
}  # fmt: skip


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    img, _ = synth_slice(96, lesion="stone", seed=2)
    return np.clip(img + np.random.default_rng(0).normal(0, 0.04, img.shape), 0, 1).astype(
        np.float32
    )


def test_all_dip_steps_registered() -> None:
    Preprocessor()  # importing the pipeline registers the DIP modules
    assert set(STEPS) >= EXPECTED_STEPS


def test_round_trip_through_json_gives_identical_tensor(image: np.ndarray) -> None:
    # Prepare: the example chain plus a kidney crop and histogram matching
    ref, _ = synth_slice(96, seed=5)
    pre = Preprocessor(
        steps=[
            {"name": "window", "window": "kidney"},
            {"name": "denoise", "method": "nlm"},
            {"name": "clahe", "clip_limit": 2.0},
            {"name": "match_histogram", "reference": enhance.reference_quantiles(ref, n=64)},
            {"name": "crop_kidney_band", "below": 0.2},
        ],
        image_size=64,
        image_width=96,
        in_chans=3,
    )
    # Execute
    rebuilt = Preprocessor.from_dict(json.loads(json.dumps(pre.to_dict())))
    a, b = pre(image), rebuilt(image)
    # Assert
    assert rebuilt.to_dict() == pre.to_dict()
    assert a.shape == (3, 64, 96) and a.dtype == torch.float32
    assert torch.equal(a, b)
    assert not torch.equal(a, Preprocessor(image_size=64, image_width=96)(image))  # steps ran


@pytest.mark.parametrize(
    "steps",
    [
        [{"name": "restore_auto"}],
        [{"name": "notch", "peaks": [[3, 4]]}],
        [{"name": "fft_filter", "pass_type": "highpass", "boost": 0.5}],
        [{"name": "open", "shape": "diamond", "radius": 2}],
        [{"name": "crop_body"}, {"name": "smooth_bilateral"}],
    ],
)
def test_steps_run_in_pipeline(steps: list[dict], image: np.ndarray) -> None:  # type: ignore[type-arg]
    out = Preprocessor(steps=steps, image_size=48).image(image)
    assert out.shape == (48, 48) and out.dtype == np.float32
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0


def test_bad_step_parameters_name_the_problem(image: np.ndarray) -> None:
    with pytest.raises(ValueError, match="unknown pipeline step"):
        Preprocessor(steps=[{"name": "denoise_magic"}])
    with pytest.raises(ValueError, match="retired; use crop_kidney_band"):
        Preprocessor(steps=[{"name": "crop_kidneys"}])
    with pytest.raises(ValueError, match="odd integer"):
        Preprocessor(steps=[{"name": "median", "size": 4}]).image(image)
    with pytest.raises(ValueError, match="unknown CT window"):
        Preprocessor(steps=[{"name": "window", "window": "brain-ish"}]).image(image)


def test_fresh_process_knows_every_step() -> None:
    # The service rebuilds the pipeline in a process that imported nothing else: every step
    # must be registered by the pipeline module alone.
    import subprocess
    import sys

    code = (
        "from kidneyscan.preprocess.pipeline import STEPS, Preprocessor; Preprocessor(); "
        "print(' '.join(sorted(STEPS)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert set(out.stdout.split()) >= EXPECTED_STEPS
