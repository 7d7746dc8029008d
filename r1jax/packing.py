"""The SFT batch stream: packing short examples into fixed-length rows, and mixing in
general (non-reasoning) data.

Cold-start and rejection-sampled examples are much shorter than train.seq_len at the
start of training (DeepSeek-R1 sec. 2.3.1: a few thousand CoT examples; sec. 2.3.3:
~800k samples of very mixed length), so one example per row spends most of every step
on padding. A packed row holds several examples back to back:

  tokens       prompt_1 completion_1 EOS prompt_2 completion_2 EOS ... pad
  segment_ids  1 ...                    2 ...                        0
  positions    0 1 2 ...                0 1 2 ...                    0
  loss_mask    1 on completion tokens (EOS included), 0 on prompts and padding

The model never attends across a segment (transformer.attention_mask compares
segment ids) and sft.next_token_mask drops the target that would cross a boundary, so
a packed row gives every example the same per-token loss it gets alone in a row
(tests/test_packing.py checks it).

`training_batches` is what the pretrain / sft stages iterate: train rows, mixed with
data.general_path rows at data.general_ratio of every batch (DeepSeek-R1 sec. 2.3.3:
~600k reasoning + ~200k non-reasoning samples), packed when data.pack is set; its state
resumes exactly.

Shapes: R rows, T = seq_len, n one example's length (n <= T).
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from r1jax import session, sft
from r1jax.data import sources, templates


def encode(example: dict, tokenizer, seq_len: int, template: str) -> dict[str, np.ndarray]:
  """One example unpadded: tokens [n] and loss_mask [n], exactly as templates.sft_example
  builds a row (same BOS, EOS and truncation at seq_len)."""
  row = templates.sft_example(example["prompt"], example["trace"], str(example["answer"]),
                              tokenizer, seq_len, template)
  n = int(row["segment_ids"].sum())
  return {"tokens": row["tokens"][:n], "loss_mask": row["loss_mask"][:n]}


def first_fit(lengths: Sequence[int], n_rows: int, seq_len: int) -> list[tuple[int, int]]:
  """(row, start) of each example placed in order, first fit: each goes into the first
  row with room for it. Stops at the first example that fits no row, rather than
  skipping it for a later, shorter one: the data order (and so epochs and resumes)
  stays that of the stream, and no long example waits forever."""
  used_r = np.zeros(n_rows, np.int64)
  places = []
  for n in lengths:
    if n > seq_len:
      raise ValueError(f"an encoded example of {n} tokens exceeds seq_len={seq_len}")
    free = np.nonzero(used_r + n <= seq_len)[0]
    if not len(free):
      break
    places.append((int(free[0]), int(used_r[free[0]])))
    used_r[free[0]] += n
  return places


def pack(encoded: Sequence[dict], n_rows: int, seq_len: int, pad_id: int) -> tuple[dict, int]:
  """Packs encoded examples (see first_fit) into R rows of T tokens.

  Returns:
    batch: tokens, loss_mask, segment_ids, positions, each [R, T] int32;
    the number of examples packed (a prefix of `encoded`).
  """
  batch = {k: np.zeros((n_rows, seq_len), np.int32)
           for k in ("tokens", "loss_mask", "segment_ids", "positions")}
  batch["tokens"][:] = pad_id
  places = first_fit([len(ex["tokens"]) for ex in encoded], n_rows, seq_len)
  count_r = np.zeros(n_rows, np.int64)
  for ex, (r, start) in zip(encoded, places):
    s = slice(start, start + len(ex["tokens"]))
    count_r[r] += 1
    batch["tokens"][r, s] = ex["tokens"]
    batch["loss_mask"][r, s] = ex["loss_mask"]
    batch["segment_ids"][r, s] = count_r[r]
    batch["positions"][r, s] = np.arange(len(ex["tokens"]))
  return batch, len(places)


class PackedBatches:
  """Packed [R, T] batches from a stream of example lists (a grain iterator, a mixture).

  Examples drawn but not yet packed wait in a buffer, always a suffix of the latest
  draw; the state is (the source's state before that draw, how many of it were used),
  so a resumed run re-draws the same list and packs the same rows, with no example
  stored in the checkpoint.
  """

  def __init__(self, source, encode_fn: Callable[[dict], dict], n_rows: int, seq_len: int,
               pad_id: int):
    self.source, self.encode_fn = source, encode_fn
    self.n_rows, self.seq_len, self.pad_id = n_rows, seq_len, pad_id
    self._before_draw = source.get_state()
    self._drawn, self._used = [], 0
    self._encoded = []
    self.last_examples = 0  # examples in the batch `next` returned last

  def __iter__(self):
    return self

  def _draw(self) -> None:
    self._before_draw = self.source.get_state()
    self._drawn, self._used = list(next(self.source)), 0
    self._encoded = [None] * len(self._drawn)

  def _pending(self, i: int) -> dict:
    if self._encoded[i] is None:
      self._encoded[i] = self.encode_fn(self._drawn[i])
    return self._encoded[i]

  def __next__(self) -> dict:
    rows, used_r = [], np.zeros(self.n_rows, np.int64)
    while True:
      if self._used == len(self._drawn):
        self._draw()
      ex = self._pending(self._used)
      free = np.nonzero(used_r + len(ex["tokens"]) <= self.seq_len)[0]
      if not len(free):  # the same first-fit rule as `pack`, one example at a time
        break
      used_r[free[0]] += len(ex["tokens"])
      rows.append(ex)
      self._used += 1
    batch, n = pack(rows, self.n_rows, self.seq_len, self.pad_id)
    assert n == len(rows)
    self.last_examples = n
    return batch

  def get_state(self) -> dict:
    return {"source": self._before_draw, "used": self._used, "drawn": len(self._drawn)}

  def set_state(self, state: dict) -> None:
    self.source.set_state(state["source"])
    self._before_draw = state["source"]
    self._drawn, self._used, self._encoded = [], 0, []
    if state.get("drawn"):
      self._draw()
      self._used = int(state["used"])


# --------------------------------------------------------------- the SFT batch stream


def load_general(config) -> list[dict]:
  """Rows of data.general_path (prompt, answer, optional solution): non-reasoning data
  mixed into SFT. A row without a solution trains an empty <think></think>, as R1 gives
  no CoT for simple queries (DeepSeek-R1 sec. 2.3.3, "Non-Reasoning data")."""
  path = config.data.general_path
  if not path:
    return []
  try:
    source = sources.read_records(path, required=("prompt", "answer"))
  except (FileNotFoundError, sources.BadRowError, ValueError) as e:
    raise session.DataError(f"data.general_path={path!r}: {e}") from None
  rows = [dict(source[i]) for i in range(len(source))]
  for row in rows:
    row.setdefault("task", "general")
    row.setdefault("trace", row.get("solution", ""))
  return rows


class Mixture:
  """Lists of B examples: round(ratio * B) from `general`, the rest from `main`, each
  drawn by its own grain iterator (both resume through get_state / set_state)."""

  def __init__(self, main, general, batch_size: int, ratio: float, seed: int):
    self.n_general = min(int(round(ratio * batch_size)), batch_size - 1)
    self.main = session.global_iterator(main, batch_size - self.n_general, seed)
    self.general = (session.global_iterator(general, self.n_general, seed + 1)
                    if self.n_general else None)

  def __iter__(self):
    return self

  def __next__(self) -> list:
    return list(next(self.main)) + (list(next(self.general)) if self.general else [])

  def get_state(self) -> dict:
    return {"main": self.main.get_state(),
            "general": self.general.get_state() if self.general else None}

  def set_state(self, state: dict) -> None:
    self.main.set_state(state["main"])
    if self.general:
      self.general.set_state(state["general"])


class Batches:
  """One example per row: batch_fn over the source's lists; the state is the source's
  (a plain grain state without general data, as before packing and mixing existed)."""

  def __init__(self, source, batch_fn):
    self.source, self.batch_fn = source, batch_fn
    self.last_examples = 0

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    examples = next(self.source)
    self.last_examples = len(examples)
    return self.batch_fn(examples)

  def get_state(self):
    return self.source.get_state()

  def set_state(self, state) -> None:
    self.source.set_state(state)


def training_batches(config, train, tokenizer, completion_only: bool, trace_fraction: float):
  """The stage's batch stream: train rows (mixed with data.general_path rows at
  data.general_ratio), one example a row or packed (data.pack); resumable. Its batches
  are the GLOBAL batch, the same on every process (session.global_iterator)."""
  b, t, template = config.train.batch_size, config.train.seq_len, config.data.template
  general = load_general(config)
  if general:
    source = Mixture(train, general, b, config.data.general_ratio, config.seed)
  else:
    source = session.global_iterator(train, b, config.seed)
  if not config.data.pack:
    return Batches(source, lambda ex: sft.make_batch(ex, tokenizer, t, template, completion_only,
                                                     trace_fraction))

  def encode_one(example):
    example = sft.hide_traces([example], trace_fraction)[0]
    row = encode(example, tokenizer, t, template)
    if not completion_only:  # pretraining: every real token is a target
      row["loss_mask"] = np.ones_like(row["loss_mask"])
    return row

  return PackedBatches(source, encode_one, b, t, tokenizer.pad_id)
