"""Prompts as the model sees them: the tokenizer's chat template with the configured system
prompt and the generation prompt, tokenised; prompts over the length limit are dropped and
counted."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from megatron_intuitor.data.datasets import DataError
from megatron_intuitor.data.records import PromptRecord

# The official INTUITOR recipe's instruction.
DEFAULT_SYSTEM_PROMPT = "Let's think step by step and output the final answer within \\boxed{}."


@dataclass
class Prompt:
    record: PromptRecord
    text: str  # chat-templated, ending with the assistant generation prompt
    token_ids: list[int]


@dataclass
class PromptSet:
    prompts: list[Prompt]
    num_dropped: int  # prompts longer than max_prompt_length tokens
    name: str = "dataset"  # for messages: the config key or validation set it came from


def chat_messages(record: PromptRecord, system_prompt: str) -> list[dict[str, str]]:
    """The record's messages behind a system message, unless the system prompt is empty or the
    record brings its own system message (prepared files may bake one in)."""
    if not system_prompt or any(m["role"] == "system" for m in record.messages):
        return list(record.messages)
    return [{"role": "system", "content": system_prompt}] + list(record.messages)


def build_prompts(records: Sequence[PromptRecord], tokenizer, system_prompt: str,
                  max_prompt_length: int, name: str = "dataset") -> PromptSet:
    """Apply the chat template (with the generation prompt) and tokenise; drop and count the
    prompts longer than `max_prompt_length` tokens; an empty result is an error."""
    if max_prompt_length <= 0:
        raise ValueError(f"max_prompt_length must be > 0, got {max_prompt_length}")
    if not records:
        raise DataError(f"{name}: no prompts to build")
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no chat "
                        f"template: use a model with one (an instruct or Qwen2.5 base tokenizer)")
    texts = tokenizer.apply_chat_template([chat_messages(r, system_prompt) for r in records],
                                          add_generation_prompt=True, tokenize=False)
    # The template already wrote the special tokens; the tokenizer must not add more.
    token_ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    prompts = [Prompt(record, text, ids) for record, text, ids in zip(records, texts, token_ids)
               if len(ids) <= max_prompt_length]
    if not prompts:
        raise DataError(f"{name}: all {len(records)} prompts are longer than "
                        f"max_prompt_length={max_prompt_length} tokens (the shortest has "
                        f"{min(len(ids) for ids in token_ids)})")
    return PromptSet(prompts, num_dropped=len(records) - len(prompts), name=name)
