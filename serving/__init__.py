"""Serving: the vLLM launcher (health, smoke, blue/green), the endpoint client and the streaming detector."""
