"""Talking to the vLLM server: finding its process (supervisord or a match) and its HTTP control endpoints."""
