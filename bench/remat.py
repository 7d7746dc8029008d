"""What the memory knobs of a differentiated forward cost and save (model.remat,
model.attention_chunk, model.logits_chunk), on one SFT training step.

  python bench/remat.py [--size cpu|gpu] [--layers 8] [--seq_len 1024] [--rows 2] [--iters 3]

Each variant compiles sft.make_step (forward, backward, AdamW) for the same model and
batch; reported: XLA's compiled memory analysis of the loss's value_and_grad alone ("grad
temp") and of the whole step (temporaries, and the peak = arguments + outputs +
temporaries - aliased), the median step time, and ratios to the variant with every knob
off, measured in the same run. Values and gradients are the same
in every variant (tests/test_remat_chunking.py, tests/test_logits_chunk.py).

On CPU the script starts XLA with --xla_cpu_enable_concurrency_optimized_scheduler=false
(before jax is imported): XLA:CPU's default scheduler runs every block's recomputation
early, so remat saves nothing there (bench/NOTES.md, session 7); --default_scheduler
keeps the default to show that. Sizes: "cpu" is bench/train_step.py's CPU model (vocab
512, d_model 256, fp32) with --layers layers (default 8: remat saves per layer kept, so
it shows with depth); "gpu" its ~1.1B bf16 model. The last line printed is
one JSON object.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time

if __name__ == "__main__" and "--default_scheduler" not in sys.argv:
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_cpu_enable_concurrency_optimized_scheduler=false").strip()

import jax  # noqa: E402  pylint: disable=wrong-import-position
import optax  # noqa: E402  pylint: disable=wrong-import-position

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench import train_step  # noqa: E402  pylint: disable=wrong-import-position
from r1jax import sft  # noqa: E402  pylint: disable=wrong-import-position
from r1jax import state as state_lib  # noqa: E402  pylint: disable=wrong-import-position

VARIANTS = {
    "none": {},
    "remat full": dict(remat="full"),
    "remat save_dots": dict(remat="save_dots"),
    "attention blocks": dict(attention_chunk=128),
    "logits blocks": dict(logits_chunk=256),
    "all three": dict(remat="full", attention_chunk=128, logits_chunk=256),
}


def measure(cfg, rows: int, seq_len: int, iters: int) -> dict:
  model = state_lib.create_model(cfg, seed=0)
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-4, weight_decay=0.1))
  graphdef, state = state_lib.create_state(model, tx)
  batch = jax.device_put(train_step.random_batch(cfg, rows, seq_len))
  # The loss's gradient alone (no optimizer), to tell XLA's scheduling of the whole step
  # apart from what the knob saves in the backward pass itself.
  model_graphdef, params, other = state_lib.split_model(model)
  def loss(p, b):
    return sft.lm_loss(state_lib.merge(model_graphdef, p, other), b)[0]
  grad = jax.jit(jax.value_and_grad(loss)).lower(params, batch).compile()
  grad_temp = grad.memory_analysis().temp_size_in_bytes
  step = jax.jit(sft.make_step(graphdef, tx), donate_argnums=0)
  compiled = step.lower(state, batch).compile()
  m = compiled.memory_analysis()
  peak = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes
  state, _ = jax.block_until_ready(compiled(state, batch))  # warm-up
  times = []
  for _ in range(iters):
    start = time.perf_counter()
    state, _ = jax.block_until_ready(compiled(state, batch))
    times.append(time.perf_counter() - start)
  return dict(grad_temp_bytes=int(grad_temp), temp_bytes=int(m.temp_size_in_bytes), peak_bytes=int(peak),
              seconds=statistics.median(times), all_seconds=times)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--size", choices=sorted(train_step.SIZES), default="cpu")
  ap.add_argument("--layers", type=int, default=8, help="n_layers (0: the size's own)")
  ap.add_argument("--seq_len", type=int, default=1024)
  ap.add_argument("--rows", type=int, default=2)
  ap.add_argument("--iters", type=int, default=3)
  ap.add_argument("--only", default="", help="comma-separated variant names (default: all)")
  ap.add_argument("--default_scheduler", action="store_true",
                  help="CPU: keep XLA's concurrency-optimised scheduler (remat then saves nothing)")
  args = ap.parse_args()
  base = train_step.model_config(args.size, moe=False)
  if args.layers:
    base = dataclasses.replace(base, n_layers=args.layers)
  names = [n.strip() for n in args.only.split(",") if n.strip()] or list(VARIANTS)
  results = {}
  for name in names:
    results[name] = measure(dataclasses.replace(base, **VARIANTS[name]), args.rows, args.seq_len, args.iters)
    print(f"measured {name}: {results[name]['seconds']:.3f} s", file=sys.stderr, flush=True)

  ref = results.get("none")
  platform = jax.devices()[0].platform
  print(f"SFT step, {args.size} model ({base.n_layers} layers), {args.rows} rows x {args.seq_len} tokens, "
        f"{platform}, jax {jax.__version__}, XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
  print(f"{'variant':<18} {'knobs':<52} {'grad temp':>9} {'x none':>7} {'step temp':>9} {'peak MiB':>9} "
        f"{'x none':>7} {'step s':>7} {'x none':>7}")
  for name, r in results.items():
    knobs = ", ".join(f"{k}={v}" for k, v in VARIANTS[name].items()) or "-"
    ratio = lambda key, r=r: r[key] / ref[key] if ref else float("nan")  # pylint: disable=unnecessary-lambda-assignment
    print(f"{name:<18} {knobs:<52} {r['grad_temp_bytes'] / 2**20:9.1f} {ratio('grad_temp_bytes'):7.2f} "
          f"{r['temp_bytes'] / 2**20:9.1f} {r['peak_bytes'] / 2**20:9.1f} "
          f"{ratio('peak_bytes'):7.2f} {r['seconds']:7.3f} {ratio('seconds'):7.2f}")
  print(json.dumps(dict(size=args.size, layers=base.n_layers, rows=args.rows, seq_len=args.seq_len,
                        platform=platform, xla_flags=os.environ.get("XLA_FLAGS", ""), variants=results)))


if __name__ == "__main__":
  main()
