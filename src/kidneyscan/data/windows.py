"""CT display windows: one ``(width, level)`` type and one table of named windows, in HU.

DICOM loading (:mod:`kidneyscan.data.dicom`), enhancement
(:func:`kidneyscan.preprocess.enhance.window_ct`) and the phantom (:mod:`kidneyscan.data.phantom`)
all read their windows from here, so a window is always ``Window(width=..., level=...)`` by
name and never a bare pair whose order has to be remembered.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Window:
    """A display window in HU: ``width`` and ``level`` (centre), with the name it came from."""

    width: float
    level: float
    name: str = "custom"

    @property
    def low(self) -> float:
        """HU shown as black (0): ``level - width / 2``."""
        return self.level - self.width / 2.0

    @property
    def high(self) -> float:
        """HU shown as white (1): ``level + width / 2``."""
        return self.level + self.width / 2.0

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly form, used in :func:`kidneyscan.data.dicom.load_dicom_bytes` metadata."""
        return {"name": self.name, "width": self.width, "level": self.level}

    def apply(self, hu: np.ndarray) -> np.ndarray:
        """Map HU to float32 ``[0, 1]`` linearly: 0 at :attr:`low` and below, 1 at :attr:`high`.

        Parameters
        ----------
        hu
            Array of Hounsfield units (any shape, any real dtype).

        Returns
        -------
        numpy.ndarray
            float32 array of ``hu``'s shape. The width is not checked here: the resolvers of
            the callers reject a non-positive one with their own error type.
        """
        out = (np.asarray(hu, dtype=np.float32) - np.float32(self.low)) / np.float32(self.width)
        return np.clip(out, 0.0, 1.0).astype(np.float32, copy=False)


#: Named windows. ``abdomen`` is the soft-tissue window the public CT-KIDNEY JPEGs are shown in
#: (about W 400 / L 40); ``soft_tissue`` and ``kidney`` are narrower soft-tissue windows;
#: ``bone`` the usual bone window; ``stone`` is centred between enhancing parenchyma
#: (<= ~200 HU) and calcium stones (200-1500 HU) so that stones stay separable from
#: contrast-enhanced kidney and only the densest calcium oxalate stones saturate, while fat and
#: soft tissue stay visible at the dark end.
WINDOWS: dict[str, Window] = {
    "abdomen": Window(width=400.0, level=40.0, name="abdomen"),
    "soft_tissue": Window(width=350.0, level=50.0, name="soft_tissue"),
    "kidney": Window(width=250.0, level=60.0, name="kidney"),
    "bone": Window(width=1800.0, level=400.0, name="bone"),
    "stone": Window(width=1200.0, level=300.0, name="stone"),
}

#: The window of the public CT-KIDNEY images, which the phantom imitates.
CT_KIDNEY_WINDOW = WINDOWS["abdomen"]
