"""Valid CT slices built from HU arrays, for the tests and benchmarks (not used by the product)."""

from __future__ import annotations

import io
from collections.abc import Mapping
from typing import Any

import numpy as np
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from kidneyscan.data.errors import DataError


def make_ct_dataset(
    hu: np.ndarray,
    *,
    pixel_spacing: tuple[float, float] = (0.7, 0.7),
    slice_thickness: float = 5.0,
    position_z: float = 0.0,
    instance_number: int = 1,
    series_uid: str | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Any:
    """Build a minimal valid CT slice dataset from a HU array (for tests, demos, exports).

    Stored values are ``HU + 1024`` as uint16 with RescaleIntercept -1024, the common scanner
    convention. ``extra`` sets further attributes by keyword (e.g. ``PatientName`` in tests).

    Returns
    -------
    pydicom.dataset.FileDataset
        Explicit VR little endian, ready for ``save_as`` or :meth:`Dataset.compress`.
    """
    hu = np.asarray(hu)
    if hu.ndim != 2:
        raise DataError(f"make_ct_dataset: expected a 2-D HU array, got shape {hu.shape}")
    stored = np.clip(np.rint(hu) + 1024, 0, 65535).astype(np.uint16)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset("", {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.FrameOfReferenceUID = generate_uid()
    ds.Modality = "CT"
    ds.InstanceNumber = instance_number
    ds.ImagePositionPatient = [0.0, 0.0, float(position_z)]
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ds.PixelSpacing = [float(pixel_spacing[0]), float(pixel_spacing[1])]
    ds.SliceThickness = float(slice_thickness)
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.RescaleIntercept = -1024
    ds.RescaleSlope = 1
    ds.PixelData = stored.tobytes()
    for key, value in (extra or {}).items():
        setattr(ds, key, value)
    return ds


def dataset_to_bytes(ds: Any) -> bytes:
    """Serialise a dataset to DICOM file bytes (with preamble and ``DICM`` magic)."""
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()
