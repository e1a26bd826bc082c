"""Downstream task heads (structure, disease, drug)."""
