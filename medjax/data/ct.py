"""Moved to `medjax.data.readers.ct`; re-exported here because `medjax.data.ct` is a public import path."""
from medjax.data.readers.ct import *  # noqa: F401,F403
