"""The translate stage: Ray Data over translator actors, quality checks, the cache."""
