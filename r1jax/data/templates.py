"""Prompt templates, the completion format, and SFT / RL prompt encoding.

The R1-Zero template is the one of the DeepSeek-R1 paper (Table 1): it only fixes the
structure -- reasoning in <think></think>, then the answer in <answer></answer> -- and
says nothing about how to reason, so RL is free to shape the reasoning itself. The
short template is for the tiny character model of the CPU recipe: a 2-layer model
cannot attend usefully over a 300-character preamble in a few hundred steps, and the
structure is taught by the completion format instead.

Prompts are encoded by one function (`encode_prompt`) for both SFT and RL, so the
sampler sees exactly the prefixes the model was fine-tuned on.

Shapes: B batch, T length.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from r1jax.data.tokenizer import ANSWER, END_ANSWER, END_THINK, THINK, Tokenizer

# DeepSeek-R1 paper, Table 1 (R1-Zero). Kept word for word: the prompt is part of the
# recipe being reproduced, and any rewording changes the base model's starting policy.
R1_ZERO_TEMPLATE = (
    "A conversation between User and Assistant. The user asks a question, and the "
    "Assistant solves it. The assistant first thinks about the reasoning process in the "
    "mind and then provides the user with the answer. The reasoning process and answer "
    "are enclosed within <think> </think> and <answer> </answer> tags, respectively, "
    "i.e., <think> reasoning process here </think> <answer> answer here </answer>. "
    "User: {prompt}. Assistant:")

# The tiny char model: the question, a newline, then the model writes "<think>...".
SHORT_TEMPLATE = "{prompt}\n"

TEMPLATES = {"r1_zero": R1_ZERO_TEMPLATE, "short": SHORT_TEMPLATE, "plain": "{prompt}"}
CHAT = "chat"  # the tokenizer's own chat template (HFTokenizer.apply_chat_template)


def render_prompt(template_name: str, prompt: str, tokenizer: Tokenizer | None = None) -> str:
  """The prompt text the model continues from."""
  if template_name == CHAT:
    if tokenizer is None or not hasattr(tokenizer, "apply_chat_template"):
      raise ValueError("template 'chat' needs a Hugging Face tokenizer with a chat_template "
                       "(tokenizer kind 'hf'); use 'r1_zero' or 'short' otherwise")
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                         add_generation_prompt=True)
  if template_name not in TEMPLATES:
    raise ValueError(f"template {template_name!r}: choose one of {sorted(TEMPLATES) + [CHAT]}")
  # replace, not str.format: prompts and templates may hold literal braces.
  return TEMPLATES[template_name].replace("{prompt}", prompt)


def completion_text(trace: str, answer: str) -> str:
  """The target completion: "<think>{trace}</think><answer>{answer}</answer>", no spaces."""
  return f"{THINK}{trace}{END_THINK}{ANSWER}{answer}{END_ANSWER}"


def encode_prompt(prompt: str, tokenizer: Tokenizer, template: str = "short") -> list[int]:
  """Token ids of the rendered prompt, led by BOS when the tokenizer has one (a chat
  template that already writes BOS does not get a second one)."""
  ids = tokenizer.encode(render_prompt(template, prompt, tokenizer))
  if tokenizer.bos_id is not None and (not ids or ids[0] != tokenizer.bos_id):
    ids = [tokenizer.bos_id] + ids
  return ids


def encode_prompts(prompts: Sequence[str], tokenizer: Tokenizer, max_len: int,
                   template: str = "short") -> tuple[np.ndarray, np.ndarray]:
  """Left-padded prompt batch for sampling.

  Returns:
    ids [B, T] int32, mask [B, T] int32 (1 on prompt tokens). A prompt longer than
    max_len raises: cutting its start would change the question.
  """
  ids_bt = np.full((len(prompts), max_len), tokenizer.pad_id, np.int32)
  mask_bt = np.zeros((len(prompts), max_len), np.int32)
  for b, prompt in enumerate(prompts):
    row = encode_prompt(prompt, tokenizer, template)
    if len(row) > max_len:
      raise ValueError(f"prompt {b} takes {len(row)} tokens with template {template!r}, "
                       f"more than max_len={max_len}: raise the prompt length or filter "
                       f"long prompts (max_prompt_chars): {prompt[:40]!r}")
    ids_bt[b, max_len - len(row):] = row
    mask_bt[b, max_len - len(row):] = 1
  return ids_bt, mask_bt


def sft_example(prompt: str, trace: str, answer: str, tokenizer: Tokenizer, max_len: int,
                template: str = "short") -> dict[str, np.ndarray]:
  """One right-padded SFT row: prompt, completion_text(trace, answer), EOS.

  A completion that does not fit is cut at max_len (and then has no EOS); a prompt
  that leaves no room for any completion token raises.

  Returns:
    tokens [T] int32; loss_mask [T] int32, 1 where tokens[t] is a completion token
    (EOS included) that the model predicts from position t-1, 0 on prompt and padding;
    segment_ids [T] int32, 1 on real tokens, 0 on padding.
  """
  prompt_ids = encode_prompt(prompt, tokenizer, template)
  completion_ids = tokenizer.encode(completion_text(trace, answer)) + [tokenizer.eos_id]
  if len(prompt_ids) >= max_len:
    raise ValueError(f"prompt takes {len(prompt_ids)} tokens, leaving no room for the "
                     f"completion in max_len={max_len}: {prompt[:40]!r}")
  row = (prompt_ids + completion_ids)[:max_len]
  tokens = np.full((max_len,), tokenizer.pad_id, np.int32)
  tokens[:len(row)] = row
  loss_mask = np.zeros((max_len,), np.int32)
  loss_mask[len(prompt_ids):len(row)] = 1
  segment_ids = np.zeros((max_len,), np.int32)
  segment_ids[:len(row)] = 1
  return {"tokens": tokens, "loss_mask": loss_mask, "segment_ids": segment_ids}


def sft_batch(examples: Sequence[dict], tokenizer: Tokenizer, max_len: int,
              template: str = "short") -> dict[str, np.ndarray]:
  """Stacks sft_example over dicts with 'prompt', 'trace', 'answer': each value [B, T]."""
  rows = [sft_example(e["prompt"], e["trace"], str(e["answer"]), tokenizer, max_len, template)
          for e in examples]
  return {key: np.stack([r[key] for r in rows]) for key in rows[0]}
