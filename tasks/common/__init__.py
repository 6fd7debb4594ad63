"""Shared infrastructure every layer may use: configuration and typed settings, errors, file helpers,
the prompt/answer format, MLflow conventions, DVC calls and the file contracts between modules."""
