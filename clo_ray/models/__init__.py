"""Model references (hub id, local dir, built-ins) and trainable-module selectors."""
