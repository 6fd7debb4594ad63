"""Serving: the vLLM launcher (health, smoke, blue/green), the endpoint client, the streaming detector, and the
launcher of the tools' own UIs (Prefect server, MLflow UI)."""
