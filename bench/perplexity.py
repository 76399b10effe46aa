"""bench, section 1: perplexity of K responses per prompt (MACPO's filter), from one pair at a time through
model(labels=...) up to generate.perplexity, one technique added per rung. Response tokens/s."""
import math

import torch

from bench.common import encode, matmul_params
from bench.timing import ladder_rows
from data import collate
from generate import length_sorted_batches, packed_logps, perplexity, sequence_logps
from losses import token_logps


@torch.inference_mode()
def naive_perplexity(model, tokenizer, pairs, max_length):
    """The common script: one pair at a time, prompt labels -100, exp(mean loss). transformers applies the LM
    head at every position and takes a full-vocabulary log-softmax there."""
    device, out = model.device, []
    for prompt, response in pairs:
        ids, mask = encode(tokenizer, prompt, response, max_length)
        input_ids = torch.tensor([ids], device=device)
        labels = input_ids.masked_fill(torch.tensor([mask], device=device) == 0, -100)
        out.append(math.exp(model(input_ids=input_ids, labels=labels).loss.item()))
    return out


@torch.inference_mode()
def batched_perplexity(model, tokenizer, pairs, batch_size, max_length, sort, head_everywhere):
    """Batched scoring with each technique of generate.perplexity switchable: length-sorted batches (else input
    order, padded to each batch's longest), and the LM head at every position (else only where scored)."""
    device = model.device
    encoded = [encode(tokenizer, p, r, max_length) for p, r in pairs]
    if sort:
        batches = length_sorted_batches([len(ids) for ids, _ in encoded], batch_size)
    else:
        batches = [list(range(s, min(s + batch_size, len(encoded)))) for s in range(0, len(encoded), batch_size)]
    out = [0.0] * len(pairs)
    for idx in batches:
        b = collate([encoded[i] for i in idx], tokenizer.pad_token_id)
        input_ids, attention_mask = b["input_ids"].to(device), b["attention_mask"].to(device)
        if head_everywhere:
            logits = model(input_ids=input_ids, attention_mask=attention_mask).logits          # [B, T, V]
            mask = b["loss_mask"][:, 1:].to(device)
            logps, n = (token_logps(logits[:, :-1], input_ids[:, 1:]) * mask).sum(-1), mask.sum(-1)
        else:
            logps, n = sequence_logps(model, input_ids, attention_mask, b["loss_mask"])
        for i, v in zip(idx, torch.exp(-logps / n.clamp(min=1)).tolist()):
            out[i] = v
    return out


@torch.inference_mode()
def packed_perplexity(model, tokenizer, pairs, batch_size, max_length, share_prompts):
    """generate.perplexity with prompt sharing switchable (generate.packed_logps)."""
    encoded = [encode(tokenizer, p, r, max_length) for p, r in pairs]
    logps, n = packed_logps(model, encoded, tokenizer.pad_token_id, batch_size, max_length, share_prompts=share_prompts)
    return torch.exp(-logps / n.clamp(min=1)).tolist()


def bench_perplexity(model, tokenizer, pairs, args):
    """-> rows of the perplexity ladder (response tokens/s), after checking that ours give the naive loop's PPL,
    and the mean prompt and response tokens of a pair."""
    kw = dict(batch_size=args.batch_size, max_length=args.max_length)

    def ladder(pairs):
        return {
            "naive: one pair at a time, model(labels=...)": lambda: naive_perplexity(model, tokenizer, pairs, args.max_length),
            "+ batched (input order, head everywhere)": lambda: batched_perplexity(model, tokenizer, pairs, sort=False, head_everywhere=True, **kw),
            "+ length-sorted batches": lambda: batched_perplexity(model, tokenizer, pairs, sort=True, head_everywhere=True, **kw),
            "+ LM head only at scored positions": lambda: batched_perplexity(model, tokenizer, pairs, sort=True, head_everywhere=False, **kw),
            "+ packed rows, batches cut at 10% padding (no sharing)": lambda: packed_perplexity(model, tokenizer, pairs, share_prompts=False, **kw),
            "+ each prompt run once for its K responses = generate.perplexity": lambda: perplexity(model, tokenizer, *zip(*pairs), **kw),
        }
    reference = naive_perplexity(model, tokenizer, pairs, args.max_length)
    for ours in (perplexity(model, tokenizer, *zip(*pairs), **kw), packed_perplexity(model, tokenizer, pairs, share_prompts=False, **kw)):
        worst = max(abs(a / b - 1) for a, b in zip(ours, reference))
        assert worst < 1e-3, f"generate.perplexity disagrees with the naive loop by {worst:.2e} (relative)"
    masks = [mask for _, mask in (encode(tokenizer, p, r, args.max_length) for p, r in pairs)]
    response_tokens = sum(sum(mask) for mask in masks)
    flops = 2 * matmul_params(model) * sum(len(mask) for mask in masks)
    rows = ladder_rows(ladder(pairs), ladder(pairs[:args.k_responses]), args.repeats, model.device, response_tokens, flops)
    return rows, {"mean_prompt_tokens": sum(m.count(0) for m in masks) / len(masks),
                  "mean_response_tokens": response_tokens / len(masks)}
