"""Class ontologies that models, data pipelines and metrics all read (data only, no imports of medjax)."""
