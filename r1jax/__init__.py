"""r1jax: the DeepSeek-R1 training system (R1-Zero, the R1 recipe, distillation) in JAX."""

__version__ = "0.1.0"
