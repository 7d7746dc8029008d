"""Templates: prompt rendering, completion format, SFT loss masks, prompt batches."""

import numpy as np
import pytest

from r1jax.data import templates
from r1jax.data.tokenizer import CharTokenizer


def test_r1_zero_template_matches_the_paper():
  text = templates.render_prompt("r1_zero", "What is 2+2?")
  assert text.startswith("A conversation between User and Assistant. The user asks a question, "
                         "and the Assistant solves it.")
  assert ("<think> reasoning process here </think> <answer> answer here </answer>. "
          "User: What is 2+2?. Assistant:") in text
  assert text.endswith("Assistant:")


def test_short_template_is_short_and_keeps_braces():
  assert templates.render_prompt("short", "37+48") == "37+48\n"
  assert templates.render_prompt("plain", "{x}+1") == "{x}+1"
  assert len(templates.render_prompt("short", "Use 12 20 7 3 to make 100")) < 48


def test_unknown_and_chat_template_errors():
  with pytest.raises(ValueError, match="choose one of"):
    templates.render_prompt("r2", "1+1")
  with pytest.raises(ValueError, match="needs a Hugging Face tokenizer"):
    templates.render_prompt("chat", "1+1", CharTokenizer())


def test_chat_template_uses_the_tokenizer():
  class ChatTok(CharTokenizer):
    def apply_chat_template(self, messages, add_generation_prompt=True):
      return f"U:{messages[0]['content']}\nA:" if add_generation_prompt else "?"
  assert templates.render_prompt("chat", "1+1", ChatTok()) == "U:1+1\nA:"


def test_completion_text():
  assert (templates.completion_text("7+8=15 c1 3+4+1=8", "85")
          == "<think>7+8=15 c1 3+4+1=8</think><answer>85</answer>")


def test_sft_example_loss_mask_positions():
  tok = CharTokenizer()
  row = templates.sft_example("1+2", "1+2=3", "3", tok, max_len=40, template="short")
  prompt = [tok.bos_id] + tok.encode("1+2\n")  # 5 tokens
  completion = tok.encode("<think>1+2=3</think><answer>3</answer>") + [tok.eos_id]  # 10 tokens
  n = len(prompt) + len(completion)
  assert set(row) == {"tokens", "loss_mask", "segment_ids"}
  assert all(v.shape == (40,) and v.dtype == np.int32 for v in row.values())
  np.testing.assert_array_equal(row["tokens"][:n], prompt + completion)
  assert (row["tokens"][n:] == tok.pad_id).all()
  expected_mask = np.zeros(40, np.int32)
  expected_mask[len(prompt):n] = 1
  np.testing.assert_array_equal(row["loss_mask"], expected_mask)
  np.testing.assert_array_equal(row["segment_ids"], (np.arange(40) < n).astype(np.int32))
  assert row["tokens"][row["loss_mask"] == 1][-1] == tok.eos_id


def test_sft_example_truncates_completion_and_rejects_long_prompt():
  tok = CharTokenizer()
  row = templates.sft_example("1+2", "1+2=3", "3", tok, max_len=8)
  assert row["loss_mask"].tolist() == [0] * 5 + [1] * 3 and row["segment_ids"].all()
  assert tok.eos_id not in row["tokens"]
  with pytest.raises(ValueError, match="no room"):
    templates.sft_example("1+2", "t", "3", tok, max_len=5)


def test_sft_batch_stacks():
  tok = CharTokenizer()
  examples = [{"prompt": "1+2", "trace": "1+2=3", "answer": 3},
              {"prompt": "10+20", "trace": "0+0=0 1+2=3", "answer": "30"}]
  batch = templates.sft_batch(examples, tok, max_len=48)
  assert batch["tokens"].shape == batch["loss_mask"].shape == (2, 48)
  assert tok.decode(batch["tokens"][1]) == "10+20\n<think>0+0=0 1+2=3</think><answer>30</answer>"


def test_encode_prompts_left_pads_like_sft():
  tok = CharTokenizer()
  ids, mask = templates.encode_prompts(["1+2", "10+20"], tok, max_len=8)
  sft = templates.sft_example("10+20", "", "30", tok, max_len=20)
  prompt_len = int((sft["segment_ids"] - sft["loss_mask"]).sum())
  np.testing.assert_array_equal(ids[1, 8 - prompt_len:], sft["tokens"][:prompt_len])
  assert mask[0].tolist() == [0, 0, 0, 1, 1, 1, 1, 1] and ids[0, 3] == tok.bos_id
  with pytest.raises(ValueError, match="max_len=4"):
    templates.encode_prompts(["10+20"], tok, max_len=4)
