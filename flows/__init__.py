"""Prefect flows: composition only. Each flow calls stage tasks in the order things happen."""
