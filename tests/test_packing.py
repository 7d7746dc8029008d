"""Packing: a packed row trains its examples as one example per row does (to float
rounding), and the packed stream neither drops, repeats nor reorders examples across a
resume."""

import numpy as np
import pytest
from flax import nnx

from r1jax import config as config_lib
from r1jax import packing, sft
from r1jax.data import tasks
from r1jax.data.tokenizer import CharTokenizer
from r1jax.model.config import ModelConfig
from r1jax.model.transformer import Transformer, token_logprobs

SEQ_LEN = 64


@nnx.jit
def _logprobs(model, batch):
  logits = model(batch["tokens"], batch["positions"], batch["segment_ids"])[0]
  return token_logprobs(logits[:, :-1], batch["tokens"][:, 1:])


def _per_example_logprobs(model, batch):
  """[(log p of each target token of one example, in order)] over the segments of a batch."""
  logp = np.asarray(_logprobs(model, batch))
  mask = np.asarray(sft.next_token_mask(batch))
  seg = np.asarray(batch["segment_ids"])[:, 1:]
  out = []
  for r in range(seg.shape[0]):
    for s in range(1, seg[r].max() + 1):
      out.append(logp[r][(seg[r] == s) & (mask[r] > 0)])
  return out


@pytest.mark.parametrize("moe", [False, True])
def test_packed_loss_equals_unpacked_loss(moe):
  tok = CharTokenizer()
  examples = tasks.generate("arithmetic", 7, seed=3, max_digits=2)
  cfg = ModelConfig(n_experts=4, top_k=2, moe_d_ff=32) if moe else ModelConfig()
  model = Transformer(cfg, nnx.Rngs(0))
  unpacked = sft.make_batch(examples, tok, SEQ_LEN, "short", completion_only=True)
  packed, n = packing.pack([packing.encode(e, tok, SEQ_LEN, "short") for e in examples],
                           n_rows=4, seq_len=SEQ_LEN, pad_id=tok.pad_id)
  assert n == len(examples)
  assert (packed["segment_ids"].max(axis=1) >= 2).sum() >= 3  # rows hold several examples
  # Positions restart at 0 in every segment; loss only on completion tokens.
  for r in range(4):
    for s in range(1, packed["segment_ids"][r].max() + 1):
      where = packed["segment_ids"][r] == s
      np.testing.assert_array_equal(packed["positions"][r][where], np.arange(where.sum()))
  assert packed["loss_mask"].sum() == unpacked["loss_mask"].sum()

  a = _per_example_logprobs(model, unpacked)
  b = _per_example_logprobs(model, packed)
  assert [len(x) for x in a] == [len(x) for x in b]
  # Equal to float rounding, not bit for bit: the softmax and the value product sum over
  # the key axis, and where a segment sits in its row changes the order of that sum (1 ulp
  # at 3 of 28 positions with attention as 3-D batched matmuls on XLA:CPU). A key that
  # crossed a segment would move a log-prob far more than rtol = 1e-6; the test below
  # shows that it fails even allclose's looser default when segments are merged.
  for x, y in zip(a, b):
    np.testing.assert_allclose(x, y, rtol=1e-6, atol=0)
  total = lambda parts: -np.sum(np.concatenate(parts).astype(np.float64))
  np.testing.assert_allclose(total(a), total(b), rtol=1e-7)
  # sft.lm_loss's mean has the same numerator terms over the same number of targets.
  assert np.asarray(sft.next_token_mask(packed)).sum() == np.asarray(sft.next_token_mask(unpacked)).sum()


def test_packing_without_segment_restart_would_differ():
  """The equivalence test can fail: treating a packed row as one sequence (one segment)
  lets examples see each other and changes their log-probs."""
  tok = CharTokenizer()
  examples = tasks.generate("arithmetic", 4, seed=1)
  model = Transformer(ModelConfig(), nnx.Rngs(0))
  packed, _ = packing.pack([packing.encode(e, tok, SEQ_LEN, "short") for e in examples],
                           n_rows=1, seq_len=SEQ_LEN * 2, pad_id=tok.pad_id)
  merged = dict(packed, segment_ids=(packed["segment_ids"] > 0).astype(np.int32),
                positions=np.tile(np.arange(SEQ_LEN * 2, dtype=np.int32), (1, 1)))
  second = (packed["segment_ids"][0] == 2)[1:]
  assert not np.allclose(np.asarray(_logprobs(model, merged))[0][second],
                         np.asarray(_logprobs(model, packed))[0][second])


class _ListSource:
  """A stand-in for a grain iterator: fixed-size lists from a list, with a state."""

  def __init__(self, items, size):
    self.items, self.size, self.pos = items, size, 0

  def __next__(self):
    out = [self.items[(self.pos + i) % len(self.items)] for i in range(self.size)]
    self.pos += self.size
    return out

  def get_state(self):
    return {"pos": self.pos}

  def set_state(self, state):
    self.pos = state["pos"]


def test_packed_stream_keeps_order_and_resumes_exactly():
  tok = CharTokenizer()
  examples = tasks.generate("arithmetic", 40, seed=2, max_digits=3)
  for i, e in enumerate(examples):
    e["answer"] = f"{e['answer']}#{i}"  # the index rides along in the answer text
  encode = lambda e: packing.encode(e, tok, SEQ_LEN, "short")
  stream = packing.PackedBatches(_ListSource(examples, 5), encode, n_rows=2, seq_len=SEQ_LEN,
                                 pad_id=tok.pad_id)
  first = next(stream)
  state = stream.get_state()
  rest = [next(stream) for _ in range(4)]
  resumed = packing.PackedBatches(_ListSource(examples, 5), encode, 2, SEQ_LEN, tok.pad_id)
  resumed.set_state(state)
  for want in rest:
    got = next(resumed)
    for key in want:
      np.testing.assert_array_equal(got[key], want[key])
  # Every example once, in stream order (row-major reading of the segments is not the
  # stream order under first fit, so collect the ids and sort by first appearance).
  seen = []
  for batch in [first] + rest:
    for r in range(batch["tokens"].shape[0]):
      for s in range(1, batch["segment_ids"][r].max() + 1):
        text = tok.decode(batch["tokens"][r][batch["segment_ids"][r] == s])
        seen.append(int(text.split("#")[1].split("<")[0]))
  assert sorted(seen) == list(range(len(seen)))


def test_general_rows_mix_in_at_the_ratio_and_resume(tmp_path):
  general = tmp_path / "general.jsonl"
  general.write_text('{"prompt": "hi", "answer": "hello"}\n'
                     '{"prompt": "name a color", "answer": "red", "solution": "any will do"}\n')
  config = config_lib.default_config()
  config.data.update(general_path=str(general), general_ratio=0.25, pack=True)
  config.train.update(batch_size=8, seq_len=SEQ_LEN)
  rows = packing.load_general(config)
  assert [r["trace"] for r in rows] == ["", "any will do"] and rows[0]["task"] == "general"
  train = tasks.generate("arithmetic", 64, seed=0)
  mixture = packing.Mixture(train, rows, 8, 0.25, seed=0)
  drawn = next(mixture)
  assert len(drawn) == 8 and sum(e["task"] == "general" for e in drawn) == 2
  tok = CharTokenizer()
  stream = packing.training_batches(config, train, tok, completion_only=True, trace_fraction=1.0)
  next(stream)
  state = stream.get_state()
  want = [next(stream) for _ in range(3)]
  resumed = packing.training_batches(config, train, tok, completion_only=True, trace_fraction=1.0)
  resumed.set_state(state)
  for batch in want:
    got = next(resumed)
    assert all(np.array_equal(got[k], batch[k]) for k in batch)
  assert any("hello" in tok.decode(r) for b in want for r in b["tokens"])
