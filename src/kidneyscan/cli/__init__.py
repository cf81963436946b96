"""Command-line interface: thin adapters over the plain core.

Each area registers its commands in its own module; heavy libraries (torch, flwr, flask) are
imported inside the commands so that ``kidneyscan --help`` stays fast.
"""

import importlib

from kidneyscan.cli._app import app

for _name in ("data", "phantom", "train", "federate", "preprocess", "serve", "export"):
    try:
        importlib.import_module(f"kidneyscan.cli.{_name}")
    except ModuleNotFoundError as _exc:  # an area not present yet
        if _exc.name != f"kidneyscan.cli.{_name}":
            raise

__all__ = ["app"]


def main() -> None:
    """Entry point for ``python -m kidneyscan``."""
    app()
