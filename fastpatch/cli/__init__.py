"""The ``fastpatch`` command line: ``fastpatch sweep`` (see ``fastpatch --help``)."""

from fastpatch.cli.main import main

__all__ = ["main"]
