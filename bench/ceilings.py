"""The machine's own ceilings, measured in the same run as the figures they divide.

  python bench/ceilings.py [--dtype bfloat16] [--matmul 8192] [--copy_mib 2048]

matmul: FLOP/s of one large square matmul (2 n^3 FLOPs), the denominator of every MFU
  in the suite. Inputs are random normals, never zeros (zeros run faster on some chips).
copy:   bytes/s of a large device copy, counting bytes read + bytes written, the
  denominator of every bandwidth (decode) roofline.

Both take the median of several timed calls after a warm-up. Datasheet peaks are not
used: a shared, throttled or noisy machine lowers the measured ceiling and the measured
figure alike, so their ratio survives. The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp

# Sizes that fill the machine without taking long: a CPU core does ~1e11 FLOP/s, a
# GPU ~1e15, so n=8192 would take minutes on CPU and n=1024 would be launch-bound on GPU.
DEFAULTS = {"cpu": dict(matmul=1536, copy_mib=256, dtype="float32"),
            "gpu": dict(matmul=8192, copy_mib=4096, dtype="bfloat16"),
            "tpu": dict(matmul=8192, copy_mib=4096, dtype="bfloat16")}


def defaults() -> dict:
  return DEFAULTS.get(jax.default_backend(), DEFAULTS["cpu"])


def time_call(fn, *args, iters: int = 5, warmup: int = 1) -> float:
  """Median seconds of fn(*args) over iters calls, after warmup untimed calls."""
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(iters):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def matmul_flops_per_s(n: int, dtype: str, iters: int = 5) -> float:
  ka, kb = jax.random.split(jax.random.key(0))
  a = jax.random.normal(ka, (n, n), dtype)
  b = jax.random.normal(kb, (n, n), dtype)
  mm = jax.jit(jnp.dot)  # bf16 out, as the library (cuBLAS) is fastest at
  return 2.0 * n ** 3 / time_call(mm, a, b, iters=iters)


def copy_bytes_per_s(mib: int, iters: int = 5) -> float:
  n = mib * 2 ** 20 // 4
  x = jax.random.normal(jax.random.key(0), (n,), jnp.float32)
  # x + 1 stops XLA from aliasing the copy away; one read and one write of n floats.
  copy = jax.jit(lambda v: v + 1.0)
  return 2.0 * 4 * n / time_call(copy, x, iters=iters)


def measure(matmul: int | None = None, copy_mib: int | None = None, dtype: str | None = None,
            iters: int = 10) -> dict:
  d = defaults()
  matmul, copy_mib, dtype = matmul or d["matmul"], copy_mib or d["copy_mib"], dtype or d["dtype"]
  return dict(backend=jax.default_backend(), device=jax.devices()[0].device_kind, dtype=dtype,
              matmul_n=matmul, matmul_flops_per_s=matmul_flops_per_s(matmul, dtype, iters),
              copy_mib=copy_mib, copy_bytes_per_s=copy_bytes_per_s(copy_mib, iters))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--matmul", type=int, default=None, help="square matmul size n")
  parser.add_argument("--copy_mib", type=int, default=None, help="copied buffer size in MiB")
  parser.add_argument("--dtype", default=None, help="matmul dtype (default: bf16 on accelerators, fp32 on CPU)")
  parser.add_argument("--iters", type=int, default=10)
  args = parser.parse_args()
  r = measure(args.matmul, args.copy_mib, args.dtype, args.iters)
  print(f"{r['device']}: {r['dtype']} matmul n={r['matmul_n']}: {r['matmul_flops_per_s'] / 1e12:.3f} TFLOP/s; "
        f"copy {r['copy_mib']} MiB: {r['copy_bytes_per_s'] / 1e9:.1f} GB/s (read + write)")
  print(json.dumps(dict(bench="ceilings", **r)))


if __name__ == "__main__":
  main()
