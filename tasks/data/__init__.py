"""Helpers of the data stages: expert review files (kappa, resolution) and the rationale teachers."""
