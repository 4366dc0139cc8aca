"""The one base class of every "your input is wrong" error in medjax (issue #15: refused up front, in one line).

Data readers (`medjax.data.errors.DataError`, `CTDataError`, `SlideError`, `TileCoordsError`,
`PlinkFormatError`, `ArrowFormatError`) and the config (`medjax.config.ConfigError`) derive from
`MedjaxInputError`; every CLI (`medjax.cli.entry_point`) prints one such error as a single
`error: FILE: line N: field F: what was expected` line and exits 2. It is a `ValueError`, so code catching
`ValueError` keeps working. This module imports nothing, so any layer may use it.
"""
from __future__ import annotations


class MedjaxInputError(ValueError):
    """A data file, config value or argument that does not fit; the message names where and what was expected."""


class InputFileNotFoundError(MedjaxInputError, FileNotFoundError):
    """A file or directory named on the command line or in a config does not exist (also a FileNotFoundError)."""
