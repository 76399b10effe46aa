"""Running models over text: batched sequence log-probs, perplexity scoring and sampling.

    logps, n_tokens = sequence_logps(model, input_ids, attention_mask, loss_mask)   # training and scoring
    ppl = perplexity(model, tokenizer, prompts, responses)                          # one float per pair
    texts = generate(model, tokenizer, prompts, max_new_tokens=64, temperature=0)   # one string per prompt

Prompts are passed already rendered (data.render_prompt); every (prompt, response) pair becomes ids through
data.encode, the same split the training loss mask uses.
"""
import inspect

import torch
from tqdm.auto import tqdm

import parallel
from data import collate, encode, truncate_prompt
from losses import token_logps


def _backbone(model):
    """The transformer stack under the LM head (model.model for Llama, Mistral, Qwen...). Calling it and the
    head separately lets us apply the [H, V] output projection only where a token is scored.
    Models that post-process logits (e.g. Gemma-2's soft-capping) are not special-cased here."""
    return getattr(model, model.base_model_prefix)


def _cache_kwarg(module):
    # transformers renamed `past_key_values` to `cache` in the 5.2x series; accept either.
    return "cache" if "cache" in inspect.signature(module.forward).parameters else "past_key_values"


def sequence_logps(model, input_ids, attention_mask, loss_mask):
    """Sum of log-probabilities of the masked tokens and their count, from one forward pass.

    input_ids, attention_mask [B, T] on the model's device; loss_mask [B, T] 0/1 (may stay on the CPU: the
    gather indices are computed where it lives, so a CPU mask costs no device sync).
    Returns (logps [B] float32, n_tokens [B] long). Differentiable: training calls it with gradients on.
    """
    B = input_ids.shape[0]
    logits, targets, rows = scored_logits(model, input_ids, attention_mask, loss_mask)
    scored = token_logps(logits, targets)                                               # [N] float32
    logps = torch.zeros(B, dtype=torch.float32, device=input_ids.device).index_add(0, rows, scored)
    n_tokens = torch.bincount(rows, minlength=B)
    return logps, n_tokens


class ScoredLM(torch.nn.Module):
    """A causal LM whose output projection runs only at the scored positions (rows, cols).

    The token at position p + 1 is predicted from the hidden state at p; prompts are long and V is the widest
    matrix of a small model, so most of the head's FLOPs would go to unscored prompt positions. A module rather
    than a function so that DistributedDataParallel and FSDP can wrap it: their hooks run on forward()."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, rows, cols):
        hidden = _backbone(self.model)(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self.model.get_output_embeddings()(hidden[rows, cols])              # [B, T, H] -> [N, V]


def scored_logits(model, input_ids, attention_mask, loss_mask):
    """Logits at the scored positions only: (logits [N, V], target ids [N], row of each [N]), N = the number
    of masked-in tokens. `model` is a transformers causal LM, or a ScoredLM already wrapped for several
    processes (parallel.wrap). Used by sequence_logps and by token-level losses (losses.confident_loss)."""
    rows, cols = loss_mask[:, 1:].nonzero(as_tuple=True)                                # [N], [N]
    rows, cols = rows.to(input_ids.device), cols.to(input_ids.device)
    scorer = ScoredLM(model) if hasattr(model, "get_output_embeddings") else model
    return scorer(input_ids, attention_mask, rows, cols), input_ids[rows, cols + 1], rows


def length_sorted_batches(lengths, batch_size):
    """Indices grouped into batches of similar length (longest first, so an out-of-memory shows up at once)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[s:s + batch_size] for s in range(0, len(order), batch_size)]


def _device(model):
    return next(model.parameters()).device


@torch.inference_mode()
def perplexity(model, tokenizer, prompts, responses, batch_size=32, max_length=1024, max_prompt_length=None,
               progress=False):
    """PPL(response | prompt) = exp(-(1/|y|) sum_t log p(y_t | x, y_<t)) for each pair, in input order.
    The response's tokens are the ones data.encode puts in the loss mask (response + EOS)."""
    assert len(prompts) == len(responses)
    device = _device(model)
    encoded = [encode(tokenizer, p, r, max_length, max_prompt_length) for p, r in zip(prompts, responses)]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    done = []
    batches = length_sorted_batches([len(ids) for ids, _ in encoded], batch_size)
    # with several processes each rank scores its share of the batches; gather restores the input order
    for idx in tqdm(parallel.mine(batches), desc="perplexity", disable=not progress, leave=False):
        batch = collate([encoded[i] for i in idx], pad_id)
        logps, n = sequence_logps(model, batch["input_ids"].to(device), batch["attention_mask"].to(device),
                                  batch["loss_mask"])
        done += zip(idx, torch.exp(-logps / n.clamp(min=1)).tolist())      # one sync per batch
    return [v for _, v in parallel.gather(done)]


def _sample(logits, temperature, top_p, generator):
    """Next token per row from logits [B, V]. temperature 0 is greedy; top_p keeps the smallest set of tokens
    whose probability mass reaches top_p (nucleus sampling, Holtzman et al. 2020)."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, sorted_ids = probs.sort(dim=-1, descending=True)
        # drop a token when the mass before it already reaches top_p (the top token always survives)
        drop = sorted_probs.cumsum(-1) - sorted_probs >= top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        return sorted_ids.gather(-1, torch.multinomial(sorted_probs, 1, generator=generator)).squeeze(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.inference_mode()
def generate(model, tokenizer, prompts, max_new_tokens=128, temperature=1.0, top_p=1.0, batch_size=32, seed=0,
             max_prompt_length=1024, progress=True, desc="generate"):
    """One response string per prompt, in input order (prompt stripped, special tokens removed).

    Prompts are sorted by length and left-padded into batches so that every row's last prompt token sits in
    the last column; decoding uses the KV cache, so each step feeds one token per row. A row stops at EOS
    (later positions are padding); the batch stops when every row has. Deterministic for a seed: batch b
    samples from its own generator seeded with seed + b, so the same prompts give the same responses however
    many processes share the batches.
    """
    device = _device(model)
    backbone, head = _backbone(model), model.get_output_embeddings()
    cache_kw = _cache_kwarg(backbone)
    eos_id = tokenizer.eos_token_id
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id
    encoded = [truncate_prompt(tokenizer(p)["input_ids"], max_prompt_length, tokenizer.bos_token_id) for p in prompts]
    done = []
    batches = list(enumerate(length_sorted_batches([len(e) for e in encoded], batch_size)))
    bar = tqdm(total=len(prompts), desc=desc, disable=not progress or not parallel.is_main(), leave=False)
    for b, idx in parallel.mine(batches):
        generator = torch.Generator(device=device).manual_seed(seed + b)
        B, P = len(idx), max(len(encoded[i]) for i in idx)
        input_ids = torch.full((B, P), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((B, P), dtype=torch.long)
        for r, i in enumerate(idx):
            input_ids[r, P - len(encoded[i]):] = torch.tensor(encoded[i])
            attention_mask[r, P - len(encoded[i]):] = 1
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)                   # [B, P], pads at 0
        new_tokens = torch.full((B, max_new_tokens), pad_id, dtype=torch.long, device=device)
        finished = torch.zeros(B, dtype=torch.bool, device=device)
        cache, step_ids = None, input_ids
        for t in range(max_new_tokens):
            hidden = backbone(input_ids=step_ids, attention_mask=attention_mask, position_ids=position_ids,
                              use_cache=True, **{cache_kw: cache})
            cache = hidden.past_key_values
            token = _sample(head(hidden.last_hidden_state[:, -1]), temperature, top_p, generator)   # [B]
            token = token.masked_fill(finished, pad_id)
            new_tokens[:, t] = token
            finished |= token == eos_id
            # checking `finished` on the host is a device sync: do it every 8 steps, not every step
            if t % 8 == 7 and bool(finished.all()):
                break
            step_ids = token[:, None]                                                   # [B, 1]
            attention_mask = torch.cat([attention_mask, torch.ones_like(step_ids)], dim=1)
            position_ids = position_ids[:, -1:] + 1
        for r, row in enumerate(new_tokens.tolist()):
            row = row[:row.index(eos_id)] if eos_id in row else row
            done.append((idx[r], tokenizer.decode(row, skip_special_tokens=True).strip()))
        bar.update(B * parallel.world_size())
    bar.close()
    return [text for _, text in parallel.gather(done)]
