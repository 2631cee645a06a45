"""Data stages: the English corpus (load, formats), language id, and the pairs stage."""
