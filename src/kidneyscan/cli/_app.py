"""The Typer application object every command module registers on."""

import typer

app = typer.Typer(
    name="kidneyscan",
    help="KidneyScan: privacy-preserving federated kidney CT classification (research use only).",
    no_args_is_help=True,
    add_completion=False,
)


@app.callback()
def _root() -> None:
    """KidneyScan: privacy-preserving federated kidney CT classification (research use only)."""


@app.command()
def version() -> None:
    """Print the KidneyScan version."""
    from kidneyscan import __version__

    typer.echo(__version__)
