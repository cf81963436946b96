"""Digital image processing: enhancement, restoration, segmentation, morphology, pipeline."""
