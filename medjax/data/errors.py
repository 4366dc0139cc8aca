"""The error type of every dataset reader in medjax.data (fundus + genome, image-report, images)."""
from __future__ import annotations


class DataError(ValueError):
    """A dataset file is missing or malformed; the message names file, line and field."""


class DataWarning(UserWarning):
    """Suspect but usable dataset content (e.g. duplicates kept with allow_duplicates=True)."""
