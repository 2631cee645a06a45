"""Data stages: corpus loading, translation, quality checks, training pairs."""
