"""`python -m lightning_charlm` is the `charlm` command."""

from lightning_charlm.cli import main

main()
