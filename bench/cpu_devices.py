"""`--devices N` for the CPU benchmarks: XLA must be told before jax is imported.

A bench script calls `set_from_argv()` first thing; with `--devices N` it appends
--xla_force_host_platform_device_count=N to XLA_FLAGS (one CPU device per core is how
r1jax uses several cores in one process). No jax import here, on purpose.
"""

from __future__ import annotations

import os
import sys


def devices_arg(argv) -> str | None:
  for i, arg in enumerate(argv):
    if arg == "--devices" and i + 1 < len(argv):
      return argv[i + 1]
    if arg.startswith("--devices="):
      return arg.split("=", 1)[1]
  return None


def set_from_argv(argv=None) -> None:
  n = devices_arg(sys.argv if argv is None else argv)
  if n:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={n}").strip()
