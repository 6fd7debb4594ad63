"""Helpers of the evaluate stage: test data, metrics, baselines, batched inference and the report."""
