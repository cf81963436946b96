"""Data layer: CT-KIDNEY / ImageFolder datasets, DICOM, phantom, splits, partitions."""
