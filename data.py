"""Text to tensors: dataset readers, splits, prompt rendering, tokenization and collation.

Bottom layer of macpo: imports nothing from the project. Every (prompt, response) pair becomes token ids in
exactly one place, `encode`, used by training, reference caching and perplexity scoring alike.
"""
from dataclasses import dataclass

import torch


class DataError(ValueError):
    """A problem with the user's data: the message names the file and line (or the flag) to fix."""


@dataclass
class Example:
    """One preference record. `prompt` is the conversation so far as role/content turns ending with a user
    turn; `chosen` / `rejected` are bare response texts (no template, no EOS). `rejected` is None for SFT-only
    records. `source` is "file:line" so any later error can point back at the record."""
    prompt: list            # [{"role": "user" | "assistant", "content": str}, ...], last role == "user"
    chosen: str
    rejected: str | None = None
    source: str = ""


# ---------------------------------------------------------------------------------------------------------
# Prompt rendering: the one function that turns a conversation into the text a model is conditioned on.

VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the user's questions.")
ALPACA_SYSTEM = "Below is an instruction that describes a task. Write a response that appropriately completes the request."
TEMPLATES = ("vicuna", "alpaca", "chat", "hh")


def render_prompt(turns, template="vicuna", tokenizer=None, system=None):
    """Conversation (role/content turns ending with a user turn) -> prompt text ending where the reply starts.

    vicuna  "{system} USER: {u1} ASSISTANT: {a1} USER: {u2} ASSISTANT:"  (the release's --template vicuna, HH)
    alpaca  "{system}\\n\\n### Instruction:\\n{u}\\n\\n### Response:\\n"  (the release's --template alpaca, PKU)
    chat    the tokenizer's own chat template, with the generation prompt appended
    hh      HH-RLHF's raw "\\n\\nHuman: {u}\\n\\nAssistant:" dialogue format
    `system=None` means the template's default system line; pass "" for none (the toy task does, to keep
    sequences short).
    """
    if not turns or turns[-1]["role"] != "user":
        raise DataError("a prompt must be a non-empty list of turns ending with a user turn")
    if template == "vicuna":
        system = VICUNA_SYSTEM if system is None else system
        parts = [system] if system else []
        for t in turns:
            parts.append(f"USER: {t['content']} ASSISTANT:" if t["role"] == "user" else t["content"])
        return " ".join(parts)
    if template == "alpaca":
        system = ALPACA_SYSTEM if system is None else system
        text = f"{system}\n\n" if system else ""
        for t in turns:
            if t["role"] == "user":
                text += f"### Instruction:\n{t['content']}\n\n### Response:\n"
            else:
                text += f"{t['content']}\n\n"
        return text
    if template == "hh":
        return "".join(f"\n\n{'Human' if t['role'] == 'user' else 'Assistant'}: {t['content']}" for t in turns) \
            + "\n\nAssistant:"
    if template == "chat":
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise DataError("--template chat needs a tokenizer with a chat template; use vicuna or alpaca instead")
        messages = ([{"role": "system", "content": system}] if system else []) + list(turns)
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        # tokenizer(prompt) adds BOS itself (see encode); drop the template's textual copy so it is not doubled.
        if tokenizer.bos_token and text.startswith(tokenizer.bos_token):
            text = text[len(tokenizer.bos_token):]
        return text
    raise DataError(f"unknown --template {template!r}; choose one of {', '.join(TEMPLATES)}")


# ---------------------------------------------------------------------------------------------------------
# Tokenization: prompt + response + EOS, loss on the response and the EOS only.

def encode(tokenizer, prompt, response, max_length, max_prompt_length=None):
    """(rendered prompt text, response text) -> (input_ids, loss_mask), two lists of ints of equal length.

    prompt ids   = tokenizer(prompt)                                   (the tokenizer's own BOS, if it adds one)
    response ids = tokenizer(response, add_special_tokens=False) + [eos]
    loss_mask is 1 exactly on the response ids (EOS included), 0 on the prompt.
    Too long for max_length: first keep the END of the prompt (at most max_prompt_length tokens, default
    max_length // 2, the BOS kept in front), then cut the response's tail; a cut response loses its EOS too,
    so the model is never taught to stop mid-sentence.
    """
    prompt_ids = tokenizer(prompt)["input_ids"]
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    if len(prompt_ids) + len(response_ids) > max_length:
        max_prompt_length = max_length // 2 if max_prompt_length is None else max_prompt_length
        if len(prompt_ids) > max_prompt_length:
            has_bos = tokenizer.bos_token_id is not None and prompt_ids[:1] == [tokenizer.bos_token_id]
            keep = max_prompt_length - int(has_bos)
            prompt_ids = prompt_ids[:1] * has_bos + prompt_ids[len(prompt_ids) - keep:]
        response_ids = response_ids[:max_length - len(prompt_ids)]
    return prompt_ids + response_ids, [0] * len(prompt_ids) + [1] * len(response_ids)


def collate(rows, pad_id):
    """[(input_ids, loss_mask), ...] -> dict of LongTensors [N, T], right-padded with pad_id.
    attention_mask is 1 on real tokens; loss_mask is 1 on scored (response) tokens and 0 on padding."""
    T = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), T), dtype=torch.long)
    loss_mask = torch.zeros((len(rows), T), dtype=torch.long)
    for i, (ids, mask) in enumerate(rows):
        input_ids[i, :len(ids)] = torch.tensor(ids)
        attention_mask[i, :len(ids)] = 1
        loss_mask[i, :len(ids)] = torch.tensor(mask)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "loss_mask": loss_mask}


def collate_pairs(chosen_rows, rejected_rows, pad_id):
    """B chosen and B rejected encodings -> one [2B, T] batch, chosen rows first (rows i and B + i are a pair),
    so the policy scores both sides in a single forward pass."""
    assert len(chosen_rows) == len(rejected_rows)
    return collate(list(chosen_rows) + list(rejected_rows), pad_id)
