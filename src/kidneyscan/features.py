"""Frozen-prefix features on disk: computed once per image and preprocessing, reused by every
epoch, fold and run.

A frozen CT ResNet-152 costs about 17 GFLOPs per kidney-band image, a few images per second on
a laptop CPU; the trainable tail (the Transformer encoder, and the last blocks when 80 % is
frozen) costs a fraction of it. :class:`FeatureStore` runs the frozen prefix
(:class:`~kidneyscan.models.frozen.FrozenSplit`) once per image and keeps the result:

* **content-keyed**: one file per image, named by the SHA-256 of the image file's bytes, in a
  folder named by a fingerprint of everything else that determines the features (the frozen
  tensors themselves, the module list, the preprocessing, the views, the compute precision).
  Renamed or copied images hit the cache; a changed image, weight or step misses it.
* **bf16 on disk** (half of fp32; the backbone's weights are bf16 to begin with).
* **the fastest exact engine**: bf16 autocast where the CPU runs bf16 natively, otherwise the
  prefix exported to ONNX once per cache folder and run by ONNX Runtime in fp32 (its output
  equals PyTorch's to about 1e-5, far below bf16 storage; 1.17x the BatchNorm-folded PyTorch
  copy on a 2-core AVX2 CPU, ``benchmarks/prefix_speed.py``).
* **augmented views that survive caching**: ``hflip`` stores the features of the mirrored
  image, computed exactly (a flipped feature map is only an approximation of it), and training
  draws one stored view per sample and epoch (:class:`CachedFeatures`).

Files are written atomically, so an interrupted extraction leaves no half-written entry.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import DataLoader, Dataset

from kidneyscan.data.datasets import DataError, Sample, load_image
from kidneyscan.engine import predict
from kidneyscan.models.frozen import FrozenSplit
from kidneyscan.preprocess.pipeline import Preprocessor

log = logging.getLogger(__name__)

#: Stored views: the image as it is, and mirrored left-right.
VIEWS: tuple[str, ...] = ("orig", "hflip")
#: How the prefix is run: PyTorch under bf16 autocast, PyTorch fp32, ONNX Runtime fp32.
COMPUTES: tuple[str, ...] = ("bf16", "fp32", "onnx")
#: Environment variable naming the cache root (default ``~/.cache/kidneyscan/features``).
CACHE_ENV = "KIDNEYSCAN_CACHE"


def default_cache_root() -> Path:
    """``$KIDNEYSCAN_CACHE`` or ``~/.cache/kidneyscan/features``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env) if env else Path.home() / ".cache" / "kidneyscan" / "features"


def bf16_supported() -> bool:
    """Whether this CPU runs bfloat16 convolutions natively (AVX-512 BF16 / AMX via oneDNN)."""
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    try:
        return bool(check()) if check is not None else False
    except RuntimeError:
        return False


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file's bytes (the per-image cache key)."""
    h = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def prefix_fingerprint(
    split: FrozenSplit, preprocessor: Preprocessor, views: Sequence[str], compute: str
) -> str:
    """Hex digest of everything besides the image that determines the cached features."""
    h = hashlib.sha256()
    spec = {
        "modules": [type(m).__name__ for m in split.prefix],
        "cut": split.cut,
        "preprocessing": preprocessor.to_dict(),
        "views": list(views),
        "compute": compute,
        "format": 1,
    }
    h.update(json.dumps(spec, sort_keys=True).encode())
    for name, t in split.prefix.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def default_compute() -> str:
    """``bf16`` where the CPU runs it natively, else ``onnx`` (ONNX Runtime fp32) when
    ONNX Runtime is installed, else ``fp32``."""
    if bf16_supported():
        return "bf16"
    return "onnx" if importlib.util.find_spec("onnxruntime") is not None else "fp32"


class OnnxPrefix:
    """The frozen prefix exported to ONNX and run by ONNX Runtime (CPU, fp32, no autograd).

    The graph is written once per input shape into ``folder`` (the feature cache's folder,
    which the prefix's weights fingerprint), atomically, so every later run and every process
    sharing the cache (federated sites) loads it instead of exporting again.
    """

    def __init__(self, split: FrozenSplit, folder: str | Path) -> None:
        self.split = split
        self.folder = Path(folder)
        self._sessions: dict[tuple[int, ...], Any] = {}
        #: Seconds spent exporting graphs in this object (0 when every graph was on disk).
        self.export_seconds = 0.0

    def path(self, shape: Sequence[int]) -> Path:
        """File of the graph for inputs of ``shape`` (C, H, W)."""
        return self.folder / f"prefix_{'x'.join(str(int(d)) for d in shape)}.onnx"

    def _session(self, shape: tuple[int, ...]) -> Any:
        from kidneyscan.export.onnx import export_bytes, make_session

        if shape not in self._sessions:
            path = self.path(shape)
            if not path.is_file():
                t0 = time.perf_counter()
                c, h, w = shape
                meta = {"classes": [], "preprocessing": {"image_size": h, "image_width": w,
                        "in_chans": c}}  # fmt: skip
                data = export_bytes(self.split.prefix, meta)
                path.parent.mkdir(parents=True, exist_ok=True)
                fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".part")
                try:
                    with os.fdopen(fd, "wb") as fh:
                        fh.write(data)
                    os.replace(tmp, path)
                finally:
                    if os.path.exists(tmp):
                        os.remove(tmp)
                self.export_seconds += time.perf_counter() - t0
                log.info("feature cache: exported the frozen prefix to %s", path)
            self._sessions[shape] = make_session(path, threads=torch.get_num_threads())
        return self._sessions[shape]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Prefix output of a batch ``(B, C, H, W)``, fp32."""
        from kidneyscan.export.onnx import INPUT_NAME

        sess = self._session(tuple(int(d) for d in x.shape[1:]))
        arr = np.ascontiguousarray(x.detach().float().numpy())
        return torch.from_numpy(sess.run(None, {INPUT_NAME: arr})[0])


class FeatureStore:
    """The on-disk cache of one frozen prefix + preprocessing.

    Parameters
    ----------
    split
        The model's frozen split.
    preprocessor
        The run's preprocessing (the tensors fed to the prefix).
    root
        Cache root (default :func:`default_cache_root`); a sub-folder per fingerprint.
    views
        Views to store, a subset of :data:`VIEWS` starting with ``"orig"``.
    compute
        ``"bf16"`` (autocast; about 1.75x faster on CPUs with AVX-512 BF16), ``"fp32"``
        (PyTorch) or ``"onnx"`` (ONNX Runtime fp32, :class:`OnnxPrefix`); ``"auto"``:
        :func:`default_compute`.
    batch_size
        Images per prefix forward pass.
    """

    def __init__(
        self,
        split: FrozenSplit,
        preprocessor: Preprocessor,
        *,
        root: str | Path | None = None,
        views: Sequence[str] = VIEWS,
        compute: str = "auto",
        batch_size: int = 8,
    ) -> None:
        views = tuple(views)
        if not views or views[0] != "orig" or any(v not in VIEWS for v in views):
            raise ValueError(f"views must start with 'orig' and be among {VIEWS}, got {views}")
        self._auto = compute == "auto"
        if compute == "auto":
            compute = default_compute()
        if compute not in COMPUTES:
            raise ValueError(f"compute must be 'auto' or one of {COMPUTES}, got {compute!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.split = split
        self.preprocessor = preprocessor
        self.views = views
        self.compute = compute
        self.batch_size = batch_size
        self.fingerprint = prefix_fingerprint(split, preprocessor, views, compute)
        self.folder = Path(root or default_cache_root()) / self.fingerprint[:20]
        #: The ONNX Runtime engine when ``compute == "onnx"`` (else ``None``).
        self.onnx_prefix = OnnxPrefix(split, self.folder) if compute == "onnx" else None

    def _path(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.safetensors"

    def _prepare(self, samples: Sequence[Sample]) -> tuple[torch.Tensor, list[dict[str, Any]]]:
        """The preprocessed batch ``(B, C, H, W)`` and the ROI box of each image."""
        xs, rois = [], []
        for s in samples:
            img, roi = self.preprocessor.apply_steps_with_roi(load_image(s.path))
            xs.append(self.preprocessor.to_tensor(self.preprocessor.resize(img)))
            rois.append(roi or {})
        return torch.stack(xs), rois

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        """Prefix features ``(B, V, C, h, w)`` (bf16) of a preprocessed batch."""
        outs = []
        for view in self.views:
            xv = x.flip(-1) if view == "hflip" else x
            if self.onnx_prefix is not None:
                try:
                    outs.append(self.onnx_prefix(xv).to(torch.bfloat16))
                    continue
                except Exception as exc:
                    if not self._auto:
                        raise
                    # Both engines give the same features (to ~1e-5): a prefix that does not
                    # export (an exotic backbone) falls back to PyTorch, slower but correct.
                    log.warning("feature cache: the prefix does not run in ONNX Runtime (%s); "
                                "extracting with PyTorch fp32", exc)  # fmt: skip
                    self.onnx_prefix = None
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.compute == "bf16"):
                outs.append(self.split.features(xv).to(torch.bfloat16))
        return torch.stack(outs, dim=1)

    def _write(self, key: str, feats: torch.Tensor, roi: dict[str, Any]) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".part")
        os.close(fd)
        try:
            meta = {"roi": json.dumps(roi), "views": ",".join(self.views)}
            save_file({"features": feats.contiguous()}, tmp, metadata=meta)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)

    def load(
        self, samples: Sequence[Sample], *, progress: bool = False, desc: str = "features"
    ) -> CachedFeatures:
        """Features of ``samples`` (extracting and storing the missing ones).

        Parameters
        ----------
        samples
            Images to featurise, in the order wanted.
        progress
            Show a progress bar over the images that must be computed.
        desc
            Label of that bar.

        Returns
        -------
        CachedFeatures
            ``features`` ``(N, V, C, h, w)`` bf16, ``labels``, ``rois`` (per image).

        Raises
        ------
        DataError
            ``samples`` is empty, or an image cannot be read.
        """
        if not samples:
            raise DataError("no images to extract features from")
        keys = [file_sha256(s.path) for s in samples]
        have: dict[str, tuple[torch.Tensor, dict[str, Any]]] = {}
        for key in dict.fromkeys(keys):
            path = self._path(key)
            if path.is_file():
                try:
                    have[key] = _read(path)
                except Exception as exc:  # a corrupt entry is recomputed, never trusted
                    log.warning("feature cache: %s unreadable (%s); recomputing", path, exc)
        todo = [i for i, k in enumerate(keys) if k not in have]
        todo = list({keys[i]: i for i in todo}.values())
        if todo:
            log.info(
                "feature cache %s: computing %d of %d images (%s, views %s)",
                self.folder,
                len(todo),
                len(samples),
                self.compute,
                "+".join(self.views),
            )
            bar = _bar(len(todo), progress, desc)
            chunks = [todo[a : a + self.batch_size] for a in range(0, len(todo), self.batch_size)]
            # The next batch is read and preprocessed (single-threaded: decoding, the kidney
            # search) in a thread while the prefix runs on this one, so the cores the prefix
            # leaves idle do it (the demo's masked band: 0.10 s of preprocessing per slice
            # against 0.24 s of prefix; 1.12-1.18x, measured by hand, docs/federated.md).
            with ThreadPoolExecutor(max_workers=1) as pool:
                pending = pool.submit(self._prepare, [samples[i] for i in chunks[0]])
                for k, chunk in enumerate(chunks):
                    x, rois = pending.result()
                    if k + 1 < len(chunks):
                        pending = pool.submit(self._prepare, [samples[i] for i in chunks[k + 1]])
                    feats = self._features(x)
                    for j, i in enumerate(chunk):
                        self._write(keys[i], feats[j], rois[j])
                        have[keys[i]] = (feats[j], rois[j])
                    bar.update(len(chunk))
            bar.close()
        features = torch.stack([have[k][0] for k in keys])
        labels = torch.tensor([s.label for s in samples], dtype=torch.long)
        return CachedFeatures(features, labels, [have[k][1] for k in keys], list(self.views))


def _read(path: Path) -> tuple[torch.Tensor, dict[str, Any]]:
    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata() or {}
        return fh.get_tensor("features"), json.loads(meta.get("roi", "{}"))


class _NoBar:
    def update(self, n: int) -> None:
        del n

    def close(self) -> None:
        pass


def _bar(total: int, enabled: bool, desc: str) -> Any:
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="img", dynamic_ncols=True)


class CachedFeatures(Dataset[tuple[torch.Tensor, int]]):
    """Cached prefix features as a dataset: ``(features float32 (C, h, w), label)``.

    Items are the original view, or one given ``view``; with ``random_views`` each item is a
    stored view drawn at random (the cached stand-in for flip augmentation in training).
    """

    def __init__(
        self,
        features: torch.Tensor,
        labels: torch.Tensor,
        rois: list[dict[str, Any]],
        views: list[str],
        *,
        view: int = 0,
        random_views: bool = False,
        seed: int = 0,
    ) -> None:
        if features.ndim != 5 or len(features) != len(labels):
            raise ValueError(
                "features must be (N, V, C, h, w) with N = len(labels), "
                f"got {tuple(features.shape)} for {len(labels)} labels"
            )
        if not 0 <= view < features.shape[1]:
            raise ValueError(f"view {view} not in 0..{features.shape[1] - 1}")
        self.features = features
        self.labels = labels.long()
        self.rois = rois
        self.views = views
        self.view = view
        self.random_views = random_views and features.shape[1] > 1
        self._gen = torch.Generator().manual_seed(int(seed))

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        v = self.view
        if self.random_views:
            v = int(torch.randint(self.features.shape[1], (1,), generator=self._gen))
        return self.features[i, v].float(), int(self.labels[i])

    @property
    def nbytes(self) -> int:
        """Memory held by the features."""
        return self.features.numel() * self.features.element_size()

    def subset(self, index: Sequence[int] | np.ndarray) -> CachedFeatures:
        """The features of some images (same tensors, indexed)."""
        idx = torch.as_tensor(np.asarray(index, dtype=np.int64))
        return CachedFeatures(
            self.features[idx], self.labels[idx], [self.rois[int(i)] for i in idx], self.views
        )

    def loader(self, *, train: bool, batch_size: int, seed: int = 0, view: int = 0) -> DataLoader:
        """Batches of ``(features, labels)``.

        ``train``: shuffled, with a random stored view per item; otherwise in order, of
        ``view`` (0 = original; average the logits over views for test-time augmentation).
        """
        ds = CachedFeatures(
            self.features,
            self.labels,
            self.rois,
            self.views,
            view=0 if train else view,
            random_views=train,
            seed=seed + 1,
        )
        gen = torch.Generator().manual_seed(int(seed))
        return DataLoader(ds, batch_size=batch_size, shuffle=train, generator=gen)


def cached_logits(
    split: FrozenSplit, feats: CachedFeatures, *, batch_size: int = 64
) -> tuple[np.ndarray, np.ndarray]:
    """Logits ``(N, K)`` float32 and labels of the model's tail over cached features.

    A model with test-time flipping (``flip_tta``) gets the mean over the stored views, as its
    own forward pass on pixels would compute it.

    Raises
    ------
    ValueError
        The model averages a flipped view but only the original one is cached.
    """
    n_views = feats.features.shape[1]
    tta = bool(getattr(split.model, "flip_tta", False))
    if tta and n_views < 2:
        raise ValueError("the model averages a flipped view (flip_tta) but none is cached")
    outs = [
        predict(split.tail, feats.loader(train=False, batch_size=batch_size, view=v))
        for v in (range(n_views) if tta else range(1))
    ]
    return np.mean([o[0] for o in outs], axis=0).astype(np.float32), outs[0][1]
