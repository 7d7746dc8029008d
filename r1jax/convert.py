"""`python -m r1jax.convert`: Hugging Face folders <-> r1jax orbax checkpoints (a thin CLI over hf.py).

  python -m r1jax.convert import --hf PATH --out DIR [--param-dtype bfloat16] [--mtp-depth N]
  python -m r1jax.convert export --ckpt DIR --out PATH [--arch ARCH] [--dtype bfloat16]

An imported DIR holds:
  model_config.json   the ModelConfig fields
  hf_config.json      the source config.json (export reuses its token ids and max length)
  params/             orbax StandardCheckpointer of the model's variables as a plain dict
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import jax
import orbax.checkpoint as ocp
from flax import nnx

from r1jax import hf
from r1jax.model.config import ModelConfig
from r1jax.model.transformer import Transformer


def import_hf(hf_path, out_dir, **overrides) -> Path:
  """Loads a Hugging Face folder and writes it as an r1jax checkpoint directory."""
  out = Path(out_dir).absolute()
  if (out / "params").exists():
    raise FileExistsError(f"{out / 'params'} already exists; choose a new --out")
  model = hf.load(hf_path, **overrides)
  out.mkdir(parents=True, exist_ok=True)
  (out / "model_config.json").write_text(json.dumps(dataclasses.asdict(model.cfg), indent=2))
  (out / "hf_config.json").write_text((Path(hf_path) / "config.json").read_text())
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(out / "params", nnx.to_pure_dict(nnx.state(model)))
  checkpointer.wait_until_finished()
  return out


def _check_checkpoint(ckpt: Path):
  if not (ckpt / "model_config.json").exists() or not (ckpt / "params").exists():
    raise FileNotFoundError(f"{ckpt} is not an r1jax checkpoint (expected model_config.json and params/)")


def load_checkpoint(ckpt_dir) -> Transformer:
  """The Transformer of an imported checkpoint directory (restored onto the default device)."""
  ckpt = Path(ckpt_dir).absolute()
  _check_checkpoint(ckpt)
  cfg = ModelConfig(**json.loads((ckpt / "model_config.json").read_text()))
  graphdef, abstract_state = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(0))))
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), nnx.to_pure_dict(abstract_state))
  restored = ocp.StandardCheckpointer().restore(ckpt / "params", target)
  nnx.replace_by_pure_dict(abstract_state, restored)
  return nnx.merge(graphdef, abstract_state)


def export_hf(ckpt_dir, out_path, arch: str | None = None, dtype: str | None = None) -> Path:
  """Writes an imported checkpoint directory as a Hugging Face folder."""
  ckpt = Path(ckpt_dir).absolute()
  _check_checkpoint(ckpt)
  base = json.loads((ckpt / "hf_config.json").read_text()) if (ckpt / "hf_config.json").exists() else None
  if arch is None:
    if base is None:
      raise ValueError(f"{ckpt} does not record its architecture; pass --arch "
                       f"(one of {', '.join(hf.ARCHITECTURES)})")
    arch = hf.arch_of(base)
  arch = hf.canonical_arch(arch)  # fail on a bad name before restoring anything
  hf.save(load_checkpoint(ckpt), out_path, arch, dtype=dtype, base_config=base)
  return Path(out_path)


def parse_args(argv):
  parser = argparse.ArgumentParser(prog="python -m r1jax.convert", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  commands = parser.add_subparsers(dest="command", required=True)
  imp = commands.add_parser("import", help="Hugging Face folder -> r1jax checkpoint directory")
  imp.add_argument("--hf", required=True, help="folder with config.json and *.safetensors")
  imp.add_argument("--out", required=True, help="new checkpoint directory")
  imp.add_argument("--param-dtype", choices=("float32", "bfloat16"), default="float32",
                   help="dtype the weights are stored in (default float32: fp32 master weights)")
  imp.add_argument("--mtp-depth", type=int, default=0,
                   help="DeepSeek-V3: keep this many multi-token-prediction layers (default: skip them)")
  exp = commands.add_parser("export", help="r1jax checkpoint directory -> Hugging Face folder")
  exp.add_argument("--ckpt", required=True, help="directory written by `import` (or by training)")
  exp.add_argument("--out", required=True, help="output folder (config.json + model*.safetensors)")
  exp.add_argument("--arch", default=None,
                   help=f"one of {', '.join(hf.ARCHITECTURES)} (default: the imported one)")
  exp.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                   help="cast the weights on export (default: as stored)")
  return parser.parse_args(argv)


def main(argv=None) -> int:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  try:
    if args.command == "import":
      out = import_hf(args.hf, args.out, param_dtype=args.param_dtype, mtp_depth=args.mtp_depth)
    else:
      out = export_hf(args.ckpt, args.out, args.arch, args.dtype)
  except (OSError, ValueError, KeyError, NotImplementedError, TypeError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(f"wrote {out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
