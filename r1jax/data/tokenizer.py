"""Tokenizers behind one interface: a character tokenizer, SentencePiece, Hugging Face.

Every tokenizer gives `encode`, `decode`, `encode_batch` (padded numpy arrays for the
device), the ids of its control tokens and `check_fits(model_vocab_size)`. The reasoning
tags `<think>`, `</think>`, `<answer>`, `</answer>` (DeepSeek-R1 paper, Table 1) are one
token each in the char and SentencePiece vocabularies, so the format reward and the
sampler's stop strings see them whole; decode never drops them.

Shapes: B batch, T length.

CLI (train a SentencePiece model on a text corpus, one example per line):
  python -m r1jax.data.tokenizer train --input corpus.txt --vocab_size 256 --output tok.model
"""

from __future__ import annotations

import argparse
import io
import json
import os
import string
import sys
from typing import Iterable, Sequence

import numpy as np

THINK, END_THINK, ANSWER, END_ANSWER = "<think>", "</think>", "<answer>", "</answer>"
TAGS = (THINK, END_THINK, ANSWER, END_ANSWER)


class Tokenizer:
  """The shared interface. Subclasses set the ids and implement encode / decode."""

  vocab_size: int
  pad_id: int
  eos_id: int
  bos_id: int | None = None
  unk_id: int | None = None

  def encode(self, text: str) -> list[int]:
    """Token ids of `text`; adds no BOS / EOS."""
    raise NotImplementedError

  def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
    """Text of `ids`. Never stops early at EOS; padding is always dropped; the other
    control tokens (EOS, BOS) are dropped unless skip_special_tokens=False."""
    raise NotImplementedError

  @property
  def special_ids(self) -> frozenset[int]:
    """Ids of the control tokens (pad, EOS, BOS, unk where present)."""
    ids = (self.pad_id, self.eos_id, self.bos_id, self.unk_id)
    return frozenset(i for i in ids if i is not None)

  def encode_batch(self, texts: Sequence[str], max_len: int, pad_side: str = "left",
                   truncate: bool = True, add_bos: bool = False,
                   add_eos: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Encodes and pads to `max_len`.

    Prompts for sampling are padded on the left so every row ends at the same position
    and decoding continues all rows together; SFT targets are padded on the right.
    A row longer than max_len loses its tokens on the pad side (the end of a left-padded
    prompt, where the template hands over to the model, is kept); truncate=False raises.

    Returns:
      ids [B, T] int32 (pad_id in padding), mask [B, T] int32 (1 on real tokens).
    """
    if pad_side not in ("left", "right"):
      raise ValueError(f"pad_side={pad_side!r}: choose 'left' or 'right'")
    ids_bt = np.full((len(texts), max_len), self.pad_id, np.int32)
    mask_bt = np.zeros((len(texts), max_len), np.int32)
    for b, text in enumerate(texts):
      row = self.encode(text)
      if add_bos and self.bos_id is not None:
        row = [self.bos_id] + row
      if add_eos:
        row = row + [self.eos_id]
      if len(row) > max_len:
        if not truncate:
          raise ValueError(f"text {b} has {len(row)} tokens, more than max_len={max_len}: "
                           f"raise max_len or pass truncate=True ({text[:40]!r}...)")
        row = row[len(row) - max_len:] if pad_side == "left" else row[:max_len]
      start = max_len - len(row) if pad_side == "left" else 0
      ids_bt[b, start:start + len(row)] = row
      mask_bt[b, start:start + len(row)] = 1
    return ids_bt, mask_bt

  def check_fits(self, model_vocab_size: int) -> None:
    """Raises ValueError when an id of this tokenizer has no row in the embedding."""
    if self.vocab_size > model_vocab_size:
      raise ValueError(
          f"tokenizer vocabulary {self.vocab_size} does not fit the model's vocab_size "
          f"{model_vocab_size}; set model.vocab_size >= {self.vocab_size}")


# ----------------------------------------------------------------------------- char

# Ids 0..7: control tokens then the reasoning tags; then one id per character. The
# alphabet covers the synthetic tasks (digits, operators) and plain English text in 96
# ids, small enough for the tiny CPU recipe's embedding.
_CHAR_CONTROL = ("<pad>", "<eos>", "<bos>", "<unk>")
_CHAR_ALPHABET = (string.digits + "+-*/=() \n" + string.ascii_lowercase
                  + string.ascii_uppercase + ".,:;?!'\"<>[]_%^&#")


class CharTokenizer(Tokenizer):
  """Deterministic character-level tokenizer over a fixed alphabet (vocab 96).

  The four reasoning tags are single tokens; any character outside the alphabet maps
  to <unk> (decoded as '?'), so no input can make it fail.
  """

  def __init__(self):
    self.pieces = list(_CHAR_CONTROL) + list(TAGS) + list(_CHAR_ALPHABET)
    self._id_of = {p: i for i, p in enumerate(self.pieces)}
    self.pad_id, self.eos_id, self.bos_id, self.unk_id = 0, 1, 2, 3
    self.vocab_size = len(self.pieces)

  def encode(self, text: str) -> list[int]:
    ids, i = [], 0
    while i < len(text):
      if text[i] == "<":
        tag = next((t for t in TAGS if text.startswith(t, i)), None)
        if tag is not None:
          ids.append(self._id_of[tag])
          i += len(tag)
          continue
      ids.append(self._id_of.get(text[i], self.unk_id))
      i += 1
    return ids

  def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
    out = []
    for i in ids:
      i = int(i)
      if i == self.pad_id or not 0 <= i < self.vocab_size:
        continue
      if i == self.unk_id:
        out.append("?")
      elif i in (self.eos_id, self.bos_id):
        if not skip_special_tokens:
          out.append(self.pieces[i])
      else:
        out.append(self.pieces[i])
    return "".join(out)


# ---------------------------------------------------------------------- sentencepiece

class SentencePieceTokenizer(Tokenizer):
  """A SentencePiece model (`.model` file or serialized bytes)."""

  def __init__(self, model: str | bytes):
    import sentencepiece as spm
    if isinstance(model, bytes):
      self.sp = spm.SentencePieceProcessor(model_proto=model)
    else:
      if not os.path.isfile(model):
        raise FileNotFoundError(f"SentencePiece model {model!r} does not exist; train one with "
                                f"`python -m r1jax.data.tokenizer train`")
      self.sp = spm.SentencePieceProcessor(model_file=model)
    self.vocab_size = self.sp.get_piece_size()
    self.eos_id = self.sp.eos_id()
    if self.eos_id < 0:
      raise ValueError("the SentencePiece model has no EOS piece; retrain it with eos_id set")
    # A model trained without a pad piece pads with EOS, which the loss mask hides anyway.
    self.pad_id = self.sp.pad_id() if self.sp.pad_id() >= 0 else self.eos_id
    self.bos_id = self.sp.bos_id() if self.sp.bos_id() >= 0 else None
    self.unk_id = self.sp.unk_id() if self.sp.unk_id() >= 0 else None

  def encode(self, text: str) -> list[int]:
    return list(self.sp.encode(text))

  def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
    ids = [int(i) for i in ids if int(i) != self.pad_id and 0 <= int(i) < self.vocab_size]
    if skip_special_tokens:
      return self.sp.decode(ids)
    # sentencepiece drops control pieces on decode; put their names back in place.
    out, run = [], []
    for i in ids:
      if self.sp.is_control(i):
        out.append(self.sp.decode(run) + self.sp.id_to_piece(i))
        run = []
      else:
        run.append(i)
    return "".join(out) + self.sp.decode(run)


def train_sentencepiece(corpus: str | Iterable[str], vocab_size: int,
                        model_prefix: str | None = None, model_type: str = "bpe",
                        byte_fallback: bool = False) -> SentencePieceTokenizer:
  """Trains a SentencePiece model in memory.

  Args:
    corpus: a text file path (one example per line) or an iterable of texts.
    vocab_size: the largest vocabulary wanted; a small corpus may give fewer pieces
      (hard_vocab_limit=False) rather than an error.
    model_prefix: when given, also writes `{model_prefix}.model`.
    model_type: 'bpe' or 'unigram'.
    byte_fallback: encode unseen characters as UTF-8 bytes instead of <unk>; needs
      vocab_size >= 256 + the reserved pieces + the corpus characters.
  Returns:
    The trained tokenizer, with pad=0, eos=1, bos=2, unk=3 and the tags as single pieces.
  """
  import sentencepiece as spm
  if model_type not in ("bpe", "unigram"):
    raise ValueError(f"model_type={model_type!r}: choose 'bpe' or 'unigram'")
  if isinstance(corpus, str):
    if not os.path.isfile(corpus):
      raise FileNotFoundError(f"corpus {corpus!r} does not exist")
    with open(corpus, encoding="utf-8") as f:
      texts = [line.rstrip("\n") for line in f]
  else:
    texts = list(corpus)
  texts = [t for t in texts if t.strip()]
  if not texts:
    raise ValueError("the corpus is empty: SentencePiece needs some text to train on")
  # Newline is a user symbol so multi-line traces survive (sentencepiece splits the
  # corpus on newlines and would otherwise never see one).
  user_symbols = list(TAGS) + ["\n"]
  reserved = 4 + len(user_symbols)
  if byte_fallback and vocab_size < 256 + reserved + 1:
    raise ValueError(f"byte_fallback needs vocab_size >= {256 + reserved + 1} "
                     f"(256 bytes + {reserved} reserved pieces + characters); got {vocab_size}")
  if vocab_size <= reserved:
    raise ValueError(f"vocab_size={vocab_size} leaves no room beside the {reserved} reserved pieces")
  model = io.BytesIO()
  try:
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=model, vocab_size=vocab_size,
        model_type=model_type, pad_id=0, eos_id=1, bos_id=2, unk_id=3,
        user_defined_symbols=user_symbols, byte_fallback=byte_fallback,
        hard_vocab_limit=False, character_coverage=1.0,
        # Exact round trips: no normalisation, whitespace kept as written.
        normalization_rule_name="identity", add_dummy_prefix=False,
        remove_extra_whitespaces=False, allow_whitespace_only_pieces=True,
        split_digits=True, minloglevel=2)
  except RuntimeError as e:
    raise ValueError(f"SentencePiece training failed: {e}") from None
  proto = model.getvalue()
  if model_prefix is not None:
    with open(model_prefix + ".model", "wb") as f:
      f.write(proto)
  return SentencePieceTokenizer(proto)


# ----------------------------------------------------------------------- hugging face

class HFTokenizer(Tokenizer):
  """A Hugging Face `tokenizer.json` loaded with the `tokenizers` package (offline).

  `path` is a folder with tokenizer.json (and optionally tokenizer_config.json and
  chat_template.jinja), or the tokenizer.json file itself. EOS / pad / BOS come from
  tokenizer_config.json; without a pad token, EOS pads.
  """

  def __init__(self, path: str):
    from tokenizers import Tokenizer as _RustTokenizer
    folder, file = (path, os.path.join(path, "tokenizer.json")) if os.path.isdir(path) \
        else (os.path.dirname(path), path)
    if not os.path.isfile(file):
      raise FileNotFoundError(f"no tokenizer.json at {path!r}")
    self.tok = _RustTokenizer.from_file(file)
    config = _read_json(os.path.join(folder, "tokenizer_config.json"))
    self.chat_template = _chat_template(config, folder)
    self.token_strings = {name: _token_content(config.get(f"{name}_token"))
                          for name in ("eos", "pad", "bos", "unk")}
    ids = {name: (self.tok.token_to_id(s) if s else None)
           for name, s in self.token_strings.items()}
    if ids["eos"] is None:
      raise ValueError(f"{folder}: tokenizer_config.json names no EOS token found in the "
                       f"vocabulary (eos_token={self.token_strings['eos']!r})")
    self.eos_id = ids["eos"]
    self.pad_id = ids["pad"] if ids["pad"] is not None else self.eos_id
    self.bos_id, self.unk_id = ids["bos"], ids["unk"]
    self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)

  @property
  def special_ids(self) -> frozenset[int]:
    added = self.tok.get_added_tokens_decoder()
    return super().special_ids | {i for i, t in added.items() if t.special}

  def encode(self, text: str) -> list[int]:
    return list(self.tok.encode(text, add_special_tokens=False).ids)

  def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
    ids = [int(i) for i in ids if int(i) != self.pad_id]
    return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)

  def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
    """Renders `messages` ([{'role', 'content'}]) with the tokenizer's jinja chat template,
    as transformers does (sandboxed jinja2, trimmed blocks)."""
    if not self.chat_template:
      raise ValueError("this tokenizer has no chat_template (none in tokenizer_config.json or "
                       "chat_template.jinja); use a plain template such as 'r1_zero'")
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
      raise ValueError(f"chat template error: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    # jinja's own tojson escapes HTML characters; templates expect plain JSON.
    env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent)
    env.globals["raise_exception"] = raise_exception
    tokens = {f"{k}_token": v or "" for k, v in self.token_strings.items()}
    return env.from_string(self.chat_template).render(
        messages=messages, add_generation_prompt=add_generation_prompt, **tokens)


def _read_json(path: str) -> dict:
  if not os.path.isfile(path):
    return {}
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def _token_content(token) -> str | None:
  """tokenizer_config.json writes a special token as a string or {'content': ...}."""
  if isinstance(token, dict):
    return token.get("content")
  return token


def _chat_template(config: dict, folder: str) -> str | None:
  template = config.get("chat_template")
  if isinstance(template, list):  # named templates: take the default one
    named = {t.get("name"): t.get("template") for t in template}
    template = named.get("default") or next(iter(named.values()), None)
  jinja_file = os.path.join(folder, "chat_template.jinja")
  if not template and os.path.isfile(jinja_file):
    with open(jinja_file, encoding="utf-8") as f:
      template = f.read()
  return template or None


# -------------------------------------------------------------------------- factory

KINDS = ("char", "sentencepiece", "hf")


def get_tokenizer(kind: str = "char", path: str | None = None) -> Tokenizer:
  """The tokenizer of `kind` ('char', 'sentencepiece' or 'hf'); the latter two need `path`."""
  if kind == "char":
    return CharTokenizer()
  if kind not in KINDS:
    raise ValueError(f"tokenizer kind {kind!r}: choose one of {KINDS}")
  if not path:
    raise ValueError(f"tokenizer kind {kind!r} needs a path (a .model file for sentencepiece, "
                     f"a folder with tokenizer.json for hf)")
  return SentencePieceTokenizer(path) if kind == "sentencepiece" else HFTokenizer(path)


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m r1jax.data.tokenizer",
                                   description="Train a SentencePiece tokenizer.")
  commands = parser.add_subparsers(dest="command", required=True)
  train = commands.add_parser("train", help="train a SentencePiece model on a text corpus")
  train.add_argument("--input", required=True, help="text file, one example per line")
  train.add_argument("--vocab_size", type=int, required=True)
  train.add_argument("--output", required=True, help="where to write the .model file")
  train.add_argument("--model_type", choices=("bpe", "unigram"), default="bpe")
  train.add_argument("--byte_fallback", action="store_true")
  args = parser.parse_args(argv)
  if not args.output.endswith(".model"):
    parser.error(f"--output {args.output!r} must end in .model")
  try:
    tok = train_sentencepiece(args.input, args.vocab_size,
                              model_prefix=args.output[:-len(".model")],
                              model_type=args.model_type, byte_fallback=args.byte_fallback)
  except (OSError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(f"wrote {args.output} (vocabulary {tok.vocab_size})")
  return 0


if __name__ == "__main__":
  sys.exit(main())
