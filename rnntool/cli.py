"""The ``rnntool`` command line: a thin Typer layer over the library."""

from __future__ import annotations

import typer

from . import __version__

app = typer.Typer(
    name="rnntool",
    help="RNN-Transducer loss: score dumped logits, check gradients, see alignments.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"rnntool {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """RNN-Transducer loss: score dumped logits, check gradients, see alignments."""


def main() -> None:
    app()
