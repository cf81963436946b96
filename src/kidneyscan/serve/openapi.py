"""The OpenAPI 3.1 document served at ``/api/v1/openapi.json``."""

from __future__ import annotations

from typing import Any

from kidneyscan.serve.config import ServeConfig


def _error(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
    }


def build_openapi(classes: list[str], config: ServeConfig) -> dict[str, Any]:
    """Describe the API for ``classes`` and the limits in ``config``.

    Returns
    -------
    dict
        An OpenAPI 3.1 document (JSON-ready).
    """
    errors = {
        "400": _error("Bad input: empty, truncated or corrupt file, bad base64, bad option"),
        "401": _error("Missing or wrong bearer token (only when KIDNEYSCAN_API_TOKEN is set)"),
        "413": _error(
            f"Request over {config.max_upload_mb:g} MiB, image over {config.max_pixels} "
            f"pixels, or more than {config.max_files} images"
        ),
        "415": _error("Not PNG, JPEG or DICOM (decided by content), or wrong content type"),
        "422": _error("Readable but unusable: DICOM without pixel data, not CT, multi-frame"),
        "429": _error("Rate limit exceeded; see the Retry-After header"),
        "503": _error("Model not loaded yet"),
    }
    analyse_body = {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "file": {
                            "type": "array",
                            "items": {"type": "string", "format": "binary"},
                            "description": "One or more PNG, JPEG or DICOM files",
                        },
                        "target_class": {"type": "string", "enum": classes},
                        "alpha": {"type": "number", "minimum": 0, "maximum": 1},
                    },
                }
            },
            "application/json": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "image": {"type": "string", "contentEncoding": "base64"},
                        "images": {
                            "type": "array",
                            "items": {"type": "string", "contentEncoding": "base64"},
                        },
                        "target_class": {"type": "string", "enum": classes},
                        "alpha": {"type": "number", "minimum": 0, "maximum": 1},
                    },
                }
            },
        },
    }

    def analyse(summary: str, schema: str) -> dict[str, Any]:
        return {
            "summary": summary,
            "requestBody": analyse_body,
            "responses": {
                "200": {
                    "description": "One result per image, in upload order; with several images "
                    "a file that fails has ok=false and its own error, the others are analysed",
                    "content": {
                        "application/json": {"schema": {"$ref": f"#/components/schemas/{schema}"}}
                    },
                },
                **errors,
            },
        }

    probs = {"type": "object", "properties": {c: {"type": "number"} for c in classes}}
    result = {
        "type": "object",
        "properties": {
            "index": {"type": "integer"},
            "ok": {"type": "boolean", "description": "false: this file failed, see 'error'"},
            "error": {
                "type": "object",
                "description": "Only when ok is false: status, code and message of this file "
                "(the other files of the request are still analysed)",
            },
            "input": {"type": "object"},
            "predicted_class": {"type": "string", "enum": classes},
            "predicted_index": {"type": "integer"},
            "confidence": {"type": "number"},
            "confidence_band": {"type": "string", "enum": ["high", "good", "moderate", "low"]},
            "confidence_band_text": {"type": "string"},
            "probabilities": probs,
            "refer_to_radiologist": {"type": "boolean"},
            "timing_ms": {"type": "object"},
            "roi": {
                "type": ["object", "null"],
                "description": "Crop box (top, left, bottom, right) in pixels of the uploaded "
                "image and its source: spine (kidney band), body or full (spine not found)",
            },
            "warnings": {"type": "array", "items": {"type": "string"}},
        },
    }
    explained = {
        "allOf": [
            {"$ref": "#/components/schemas/Result"},
            {
                "type": "object",
                "properties": {
                    "explanation": {
                        "type": "object",
                        "properties": {
                            "method": {"const": "Grad-CAM"},
                            "target_class": {"type": "string"},
                            "layer": {"type": "string"},
                            "image_png": {"type": "string", "contentEncoding": "base64"},
                            "heatmap_png": {"type": "string", "contentEncoding": "base64"},
                            "overlay_png": {"type": "string", "contentEncoding": "base64"},
                            "slice_png": {
                                "type": "string",
                                "contentEncoding": "base64",
                                "description": "The uploaded slice (at most 512 px) the roi "
                                "box is drawn on; slice_scale = its size / the upload's",
                            },
                        },
                    }
                },
            },
        ]
    }

    def envelope(item: str) -> dict[str, Any]:
        return {
            "type": "object",
            "properties": {
                "model": {"type": "object"},
                "refer_threshold": {"type": "number"},
                "count": {"type": "integer"},
                "succeeded": {"type": "integer"},
                "failed": {"type": "integer"},
                "results": {"type": "array", "items": {"$ref": f"#/components/schemas/{item}"}},
                "timing_ms": {"type": "object"},
                "disclaimer": {"type": "string"},
            },
        }

    ok_json = {"200": {"description": "OK", "content": {"application/json": {}}}}
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "KidneyScan inference API",
            "version": "1",
            "description": "Kidney CT slice classification (Cyst, Normal, Stone, Tumor) with "
            "calibrated confidence and Grad-CAM. Research use only; not a diagnosis.",
        },
        "servers": [{"url": "/"}],
        "security": [{"bearer": []}] if config.api_token else [],
        "paths": {
            "/api/v1/predict": {"post": analyse("Classify images", "Predictions")},
            "/api/v1/explain": {
                "post": analyse("Classify and explain (Grad-CAM)", "ExplainedPredictions")
            },
            "/api/v1/model": {"get": {"summary": "Model card", "responses": ok_json}},
            "/api/v1/openapi.json": {"get": {"summary": "This document", "responses": ok_json}},
            "/health/live": {"get": {"summary": "Process is up", "responses": ok_json}},
            "/health/ready": {
                "get": {
                    "summary": "Model loaded and warmed up",
                    "responses": {**ok_json, "503": {"description": "Not ready"}},
                }
            },
            "/upload": {"post": analyse("Alias of /api/v1/predict", "Predictions")},
            "/api/analyze": {"post": analyse("Alias of /api/v1/explain", "ExplainedPredictions")},
            "/model-info": {"get": {"summary": "Alias of /api/v1/model", "responses": ok_json}},
            "/health": {"get": {"summary": "Alias of /health/ready", "responses": ok_json}},
        },
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "Error": {
                    "type": "object",
                    "properties": {
                        "error": {
                            "type": "object",
                            "properties": {
                                "status": {"type": "integer"},
                                "code": {"type": "string"},
                                "message": {"type": "string"},
                            },
                        }
                    },
                },
                "Result": result,
                "Explained": explained,
                "Predictions": envelope("Result"),
                "ExplainedPredictions": envelope("Explained"),
            },
        },
    }
