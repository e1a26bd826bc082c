"""Data layer: readers, instruction records, datasets and batching."""
