"""Fusion: projectors, the LLM backbone and the fused multimodal model."""
