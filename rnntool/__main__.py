"""``python -m rnntool`` runs the command line."""

from .cli import main

main()
