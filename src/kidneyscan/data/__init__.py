"""Data layer: CT-KIDNEY / ImageFolder datasets, DICOM, the synthetic phantom, splits, partitions."""
