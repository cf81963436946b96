"""The web page: server-rendered HTML, one small script and one stylesheet (no CDN, no build)."""

from __future__ import annotations

from flask import Blueprint, current_app, render_template

from kidneyscan.serve.predictor import BANDS
from kidneyscan.serve.state import DISCLAIMER, get_state

web_bp = Blueprint("web", __name__)


@web_bp.get("/")
def index() -> str:
    """Upload page: drag-and-drop or picker, probabilities, band, Grad-CAM, disclaimer."""
    state = get_state(current_app)
    predictor = state.predictor
    return render_template(
        "index.html",
        disclaimer=DISCLAIMER,
        model_name=predictor.model_info["name"] if predictor else "loading...",
        classes=list(predictor.classes) if predictor else [],
        refer_threshold=int(round(state.config.refer_threshold * 100)),
        max_upload_mb=state.config.max_upload_mb,
        max_files=state.config.max_files,
        auth_required=bool(state.config.api_token),
        bands=[(int(lower * 100), name, text) for lower, name, text in BANDS],
    )
