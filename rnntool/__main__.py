"""``python -m rnntool`` runs the command line (through the console script's entry)."""

from ._entry import main

main()
