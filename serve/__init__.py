"""Inference API: an OpenAI-compatible HTTP server over KibanModel."""
