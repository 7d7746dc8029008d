"""Tokenizers: round trips, padding sides, vocabulary fit, loading errors, the CLI."""

import json
import subprocess
import sys

import numpy as np
import pytest

from r1jax.data import tokenizer as tk

TEXTS = ["37+48", "<think>7+8=15 c1 3+4+1=8</think><answer>85</answer>",
         "Use 3 5 7 to make 22", "Solve -2x+7=1\nx = 3"]


def test_char_round_trip_and_tags_are_single_tokens():
  tok = tk.get_tokenizer("char")
  assert isinstance(tok, tk.CharTokenizer) and tok.vocab_size <= 96
  for text in TEXTS:
    assert tok.decode(tok.encode(text)) == text
  ids = tok.encode("<think>1</think><answer>2</answer>")
  assert len(ids) == 6
  assert len(set(ids[::2])) == 3  # <think>, </think>, <answer> are distinct single ids
  assert tok.encode("<thinker") == [tok.encode(c)[0] for c in "<thinker"]


def test_char_unknown_characters_never_fail():
  tok = tk.CharTokenizer()
  ids = tok.encode("é€\t9")
  assert ids[:3] == [tok.unk_id] * 3 and tok.decode(ids) == "???9"


def test_char_decode_drops_padding_and_control_tokens_but_not_after_eos():
  tok = tk.CharTokenizer()
  ids = [tok.pad_id, tok.bos_id] + tok.encode("12") + [tok.eos_id] + tok.encode("3") + [tok.pad_id]
  assert tok.decode(ids) == "123"  # stops nothing
  assert tok.decode(ids, skip_special_tokens=False) == "<bos>12<eos>3"
  assert tok.special_ids == {tok.pad_id, tok.eos_id, tok.bos_id, tok.unk_id}


def test_encode_batch_pads_left_and_right():
  tok = tk.CharTokenizer()
  a, b = tok.encode("12"), tok.encode("3456")
  ids, mask = tok.encode_batch(["12", "3456"], max_len=5, pad_side="left")
  assert ids.dtype == np.int32 and ids.shape == mask.shape == (2, 5)
  np.testing.assert_array_equal(ids[0], [0, 0, 0] + a)
  np.testing.assert_array_equal(mask, [[0, 0, 0, 1, 1], [0, 1, 1, 1, 1]])
  ids, mask = tok.encode_batch(["12", "3456"], max_len=5, pad_side="right", add_eos=True)
  np.testing.assert_array_equal(ids[1], b + [tok.eos_id])
  np.testing.assert_array_equal(ids[0], a + [tok.eos_id, 0, 0])
  np.testing.assert_array_equal(mask[0], [1, 1, 1, 0, 0])


def test_encode_batch_truncates_on_the_pad_side_or_raises():
  tok = tk.CharTokenizer()
  left, _ = tok.encode_batch(["123456"], max_len=3, pad_side="left")
  right, _ = tok.encode_batch(["123456"], max_len=3, pad_side="right")
  assert tok.decode(left[0]) == "456" and tok.decode(right[0]) == "123"
  with pytest.raises(ValueError, match="max_len=3"):
    tok.encode_batch(["123456"], max_len=3, truncate=False)
  with pytest.raises(ValueError, match="pad_side"):
    tok.encode_batch(["1"], max_len=3, pad_side="middle")


def test_check_fits():
  tok = tk.CharTokenizer()
  tok.check_fits(128)
  tok.check_fits(tok.vocab_size)
  with pytest.raises(ValueError, match=f"tokenizer vocabulary {tok.vocab_size} does not fit the "
                     f"model's vocab_size 64; set model.vocab_size >= {tok.vocab_size}"):
    tok.check_fits(64)


def test_get_tokenizer_errors():
  with pytest.raises(ValueError, match="choose one of"):
    tk.get_tokenizer("bytes")
  with pytest.raises(ValueError, match="needs a path"):
    tk.get_tokenizer("hf")
  with pytest.raises(FileNotFoundError):
    tk.get_tokenizer("sentencepiece", "/nonexistent/tok.model")


@pytest.mark.parametrize("model_type", ["bpe", "unigram"])
def test_sentencepiece_train_load_round_trip(tmp_path, model_type):
  corpus = TEXTS * 10
  tok = tk.train_sentencepiece(corpus, vocab_size=120, model_prefix=str(tmp_path / "tok"),
                               model_type=model_type)
  loaded = tk.get_tokenizer("sentencepiece", str(tmp_path / "tok.model"))
  assert (loaded.pad_id, loaded.eos_id, loaded.bos_id) == (0, 1, 2)
  assert loaded.vocab_size == tok.vocab_size <= 120
  for text in TEXTS:
    assert loaded.encode(text) == tok.encode(text)
    assert loaded.decode(loaded.encode(text)) == text
  think = loaded.encode("<think>")
  assert len(think) == 1
  ids = [loaded.bos_id] + loaded.encode("37") + [loaded.eos_id, loaded.pad_id]
  assert loaded.decode(ids) == "37"
  assert loaded.decode(ids, skip_special_tokens=False) == "<s>37</s>"
  batch, mask = loaded.encode_batch(["37", "37+48"], max_len=8)
  assert batch.shape == (2, 8) and mask[0, -1] == 1 and mask[0, 0] == 0


def test_sentencepiece_byte_fallback_needs_a_large_vocab():
  with pytest.raises(ValueError, match="byte_fallback needs vocab_size >= "):
    tk.train_sentencepiece(TEXTS, vocab_size=100, byte_fallback=True)
  with pytest.raises(ValueError, match="corpus is empty"):
    tk.train_sentencepiece(["", "  "], vocab_size=100)


def test_sentencepiece_cli(tmp_path):
  corpus = tmp_path / "corpus.txt"
  corpus.write_text("\n".join(TEXTS * 5))
  out = tmp_path / "tok.model"
  cmd = [sys.executable, "-m", "r1jax.data.tokenizer", "train", "--input", str(corpus),
         "--vocab_size", "100", "--output", str(out)]
  done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
  assert done.returncode == 0, done.stderr
  loaded = tk.SentencePieceTokenizer(str(out))
  assert loaded.decode(loaded.encode("37+48")) == "37+48"
  cmd[cmd.index("--input") + 1] = str(tmp_path / "missing.txt")
  done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
  assert done.returncode == 1 and "does not exist" in done.stderr and "Traceback" not in done.stderr


CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n"
                 "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")


def _write_hf_tokenizer(folder, chat_template=CHAT_TEMPLATE):
  """A tiny byte-level BPE tokenizer.json built locally (no hub)."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<eos>", "<bos>"],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(TEXTS * 10, trainer)
  tok.add_tokens(list(tk.TAGS))  # like DeepSeek-R1's tokenizer: added, not special
  folder.mkdir(exist_ok=True)
  tok.save(str(folder / "tokenizer.json"))
  config = {"eos_token": {"content": "<eos>"}, "pad_token": "<pad>", "bos_token": "<bos>"}
  if chat_template:
    config["chat_template"] = chat_template
  (folder / "tokenizer_config.json").write_text(json.dumps(config))


def test_hf_tokenizer_round_trip_and_specials(tmp_path):
  _write_hf_tokenizer(tmp_path / "hf")
  tok = tk.get_tokenizer("hf", str(tmp_path / "hf"))
  assert (tok.pad_id, tok.eos_id, tok.bos_id) == (0, 1, 2)
  for text in TEXTS + ["héllo wörld"]:
    assert tok.decode(tok.encode(text)) == text
  assert len(tok.encode("<answer>")) == 1
  ids = [tok.bos_id] + tok.encode("85") + [tok.eos_id, tok.pad_id]
  assert tok.decode(ids) == "85"
  assert tok.decode(ids, skip_special_tokens=False) == "<bos>85<eos>"
  assert {0, 1, 2} <= tok.special_ids
  tok.check_fits(tok.vocab_size)
  with pytest.raises(ValueError, match="does not fit"):
    tok.check_fits(tok.vocab_size - 1)
  # the tokenizer.json path works as well as its folder
  assert tk.HFTokenizer(str(tmp_path / "hf" / "tokenizer.json")).encode("37") == tok.encode("37")


def test_hf_chat_template(tmp_path):
  _write_hf_tokenizer(tmp_path / "hf")
  tok = tk.HFTokenizer(str(tmp_path / "hf"))
  messages = [{"role": "user", "content": "37+48"}]
  assert tok.apply_chat_template(messages) == "<bos><|user|>37+48\n<|assistant|>"
  assert tok.apply_chat_template(messages, add_generation_prompt=False) == "<bos><|user|>37+48\n"
  _write_hf_tokenizer(tmp_path / "plain", chat_template=None)
  with pytest.raises(ValueError, match="no chat_template"):
    tk.HFTokenizer(str(tmp_path / "plain")).apply_chat_template(messages)


def test_hf_tokenizer_missing_files(tmp_path):
  with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
    tk.HFTokenizer(str(tmp_path))
