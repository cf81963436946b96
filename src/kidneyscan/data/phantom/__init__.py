"""Synthetic kidney-CT phantom: axial slices at kidney level, built in HU, then windowed.

Each slice is drawn in millimetres on a field of view of about 350-400 mm and rasterised
directly at ``image_size`` (64 px test sets are cheap, 512 px is the default). Anatomy is painted
in Hounsfield units (air, fat, muscle, vertebra, vessels, liver, spleen, bowel, both kidneys with
cortex, medulla, sinus fat and pelvis, the CT table), a lesion is added for the Cyst, Stone and
Tumor classes, then the scanner is simulated (point-spread blur, which also gives partial volume,
and quantum noise) and the soft-tissue window W400/L40 maps HU to [0, 1].

Confounders appear in every class with probabilities that do not depend on the class:
phleboliths, calcified vessel walls, oral contrast in bowel, slice level, patient size, noise
and the contrast phase. :func:`generate_dataset` writes the public CT-KIDNEY layout plus masks,
noise-free ground truth and a metadata CSV; each synthetic patient contributes 1-4 neighbouring
slices with consecutive file indices, like the real data's leakage trap.

HU values follow ``DESIGN.md`` ("Facts for the synthetic kidney-CT phantom").
Modules, each importing only those above it: :mod:`.sites` (hospital profiles),
:mod:`.canvas` (drawing in mm), :mod:`.anatomy` (the patient), :mod:`.lesions`,
:mod:`.render` (one slice), :mod:`.writer` (the dataset on disk).
"""

from kidneyscan.data.phantom.anatomy import KIDNEY_DY
from kidneyscan.data.phantom.render import (
    WINDOW_LEVEL,
    WINDOW_WIDTH,
    PhantomSlice,
    iter_patient_slices,
    render_slice,
    window,
)
from kidneyscan.data.phantom.sites import CLASSES, SiteProfile, make_sites
from kidneyscan.data.phantom.writer import METADATA_COLUMNS, SERIES_BREAK_PROB, generate_dataset

__all__ = [
    "CLASSES",
    "KIDNEY_DY",
    "METADATA_COLUMNS",
    "SERIES_BREAK_PROB",
    "WINDOW_LEVEL",
    "WINDOW_WIDTH",
    "PhantomSlice",
    "SiteProfile",
    "generate_dataset",
    "iter_patient_slices",
    "make_sites",
    "render_slice",
    "window",
]
