"""The embedded CPU default (what `python -m r1jax.train` runs with no --config)."""

from r1jax.config import default_config


def get_config():
  return default_config()
