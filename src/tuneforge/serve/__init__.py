"""Servers: the OpenAI-compatible API."""
