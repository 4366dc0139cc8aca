"""Moved to `medjax.ontology.universal_classes` (models and data both read it); re-exported here."""
from medjax.ontology.universal_classes import *  # noqa: F401,F403
from medjax.ontology.universal_classes import NUM_CLASSES  # noqa: F401
