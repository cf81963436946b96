"""De-identification of DICOM datasets, and the value-safe walk over their sequences.

Walking a dataset the usual way converts every value, and pydicom's conversion errors and
warnings quote the value, which for patient attributes is patient data: everything here touches
only keywords, tags and sequences. :mod:`kidneyscan.data.dicom` uses the same walk to check the
nesting depth of untrusted files.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from pydicom.datadict import dictionary_VR
from pydicom.uid import generate_uid

#: Attributes removed by :func:`deidentify` (a subset of the DICOM PS3.15 basic profile that
#: covers every identifying attribute pydicom's and common CT test files carry).
PHI_KEYWORDS: tuple[str, ...] = (
    "PatientName",
    "PatientID",
    "IssuerOfPatientID",
    "OtherPatientIDs",
    "OtherPatientIDsSequence",
    "OtherPatientNames",
    "PatientBirthDate",
    "PatientBirthTime",
    "PatientBirthName",
    "PatientMotherBirthName",
    "PatientAddress",
    "PatientTelephoneNumbers",
    "PatientAge",
    "PatientSex",
    "PatientSize",
    "PatientWeight",
    "EthnicGroup",
    "Occupation",
    "MilitaryRank",
    "BranchOfService",
    "MedicalRecordLocator",
    "AdditionalPatientHistory",
    "PatientComments",
    "PatientInsurancePlanCodeSequence",
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "SeriesDate",
    "AcquisitionDate",
    "ContentDate",
    "InstanceCreationDate",
    "StudyTime",
    "SeriesTime",
    "AcquisitionTime",
    "ContentTime",
    "InstanceCreationTime",
    "AcquisitionDateTime",
    "InstitutionName",
    "InstitutionAddress",
    "InstitutionalDepartmentName",
    "InstitutionCodeSequence",
    "ReferringPhysicianName",
    "ReferringPhysicianAddress",
    "ReferringPhysicianTelephoneNumbers",
    "PerformingPhysicianName",
    "PhysiciansOfRecord",
    "NameOfPhysiciansReadingStudy",
    "RequestingPhysician",
    "OperatorsName",
    "StationName",
    "DeviceSerialNumber",
    "RequestAttributesSequence",
    "StudyDescription",
    "SeriesDescription",
    "RequestedProcedureDescription",
    "PerformedProcedureStepDescription",
    "PerformedProcedureStepID",
    "ScheduledProcedureStepID",
    "ImageComments",
    "FrameComments",
)
#: UIDs replaced by :func:`deidentify` with a stable hash, so slices of one series stay together.
UID_KEYWORDS: tuple[str, ...] = (
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "SOPInstanceUID",
    "FrameOfReferenceUID",
)


def _element_vr(elem: Any) -> str | None:
    """VR of a raw or converted element without converting its value."""
    if elem.VR:
        return str(elem.VR)
    try:  # implicit VR: the dictionary knows standard tags; unknown/private ones stay opaque
        return str(dictionary_VR(elem.tag))
    except KeyError:
        return None


def sequence_elements(ds: Any) -> Iterator[Any]:
    """The sequence elements of ``ds`` (one level), converting nothing else.

    Iterating a dataset converts every value, and pydicom's conversion errors and warnings
    quote the value, which for patient attributes is patient data: only sequences are touched.
    """
    for raw in ds.elements():
        if _element_vr(raw) == "SQ":
            yield ds[raw.tag]


def deidentify(ds: Any, *, salt: str = "kidneyscan") -> Any:
    """Remove patient-identifying data from a dataset, in place, and return it.

    Deletes the attributes of :data:`PHI_KEYWORDS` at every nesting level, removes private
    tags, replaces the UIDs of :data:`UID_KEYWORDS` with stable hashed ones (slices of one series
    keep a common series UID) and marks the dataset ``PatientIdentityRemoved = "YES"``.
    """
    phi = set(PHI_KEYWORDS)

    def scrub(d: Any) -> None:
        # Deleting by keyword and walking only sequences never converts (or quotes) a value.
        for keyword in phi:
            if keyword in d:
                delattr(d, keyword)
        # keys(), not iteration: iterating a Dataset yields converted elements
        for tag in [t for t in d.keys() if t.is_private]:  # noqa: SIM118
            del d[tag]
        for elem in list(sequence_elements(d)):
            for item in elem.value:
                scrub(item)

    scrub(ds)
    for keyword in UID_KEYWORDS:
        if keyword in ds:
            new = generate_uid(entropy_srcs=[salt, str(ds.data_element(keyword).value)])
            setattr(ds, keyword, new)
    meta = getattr(ds, "file_meta", None)
    if meta is not None and "SOPInstanceUID" in ds:
        meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = "kidneyscan.deidentify: PS3.15 basic profile subset"
    return ds
