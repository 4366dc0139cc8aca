"""The error type of every dataset reader in medjax.data (fundus + genome, image-report, images)."""
from __future__ import annotations

from medjax.errors import MedjaxInputError


class DataError(MedjaxInputError):
    """A dataset file is missing or malformed; the message names file, line and field."""


class DataFileNotFoundError(DataError, FileNotFoundError):
    """A dataset file or directory that does not exist (also a FileNotFoundError, as before)."""


class DataWarning(UserWarning):
    """Suspect but usable dataset content (e.g. duplicates kept with allow_duplicates=True)."""
