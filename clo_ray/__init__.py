"""clo-ray: Cross-Lingual Optimization (CLO) as a distributed Ray sweep engine."""

from clo_ray.spec import load_spec

__all__ = ["load_spec"]
__version__ = "0.1.0"
