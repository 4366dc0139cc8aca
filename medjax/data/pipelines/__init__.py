"""Grain pipelines: the process-count-independent global batching and each family's example stream."""
