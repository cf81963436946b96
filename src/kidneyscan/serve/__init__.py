"""KidneyScan inference service: Flask app factory, JSON API, web page, Grad-CAM.

Production entry point (settings from ``KIDNEYSCAN_*`` environment variables)::

    KIDNEYSCAN_CHECKPOINT=runs/demo/checkpoint \\
        gunicorn -w 2 -b 127.0.0.1:8000 "kidneyscan.serve:create_app()"
"""

from kidneyscan.serve.app import create_app
from kidneyscan.serve.config import ServeConfig

__all__ = ["ServeConfig", "create_app"]
