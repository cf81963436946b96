"""Fast CPU inference: ONNX export, int8 static quantization and an ONNX Runtime backend.

* :mod:`kidneyscan.export.onnx` -- checkpoint -> ``model.onnx`` with the preprocessing and class
  list in the ONNX ``metadata_props`` and a sidecar ``metadata.json``;
* :mod:`kidneyscan.export.quantize` -- int8 static (QDQ) quantization calibrated through the
  checkpoint's own :class:`~kidneyscan.preprocess.pipeline.Preprocessor`, with a quality guard;
* :mod:`kidneyscan.export.backend` -- :class:`OnnxBackend`, the service's ``--backend onnx``.
"""
