"""``python -m autodrop`` runs the same command as ``autodrop``."""

from autodrop.cli import main

main(prog_name="autodrop")
