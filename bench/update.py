"""bench, section 3: the MACPO update (DPO + 0.2 SFT, AdamW), from two full-vocabulary passes with the
reference model run every step up to train.train's step, one technique added per rung. Pairs/s and peak memory."""
import copy
import time

import torch

from bench.common import collate_pairs, encode, matmul_params
from bench.timing import ladder_rows, peak_extra_memory_mb
from data import collate
from generate import ScoredLM, pack_rows, packed_sequence_logps, reference_logps, sequence_logps
from losses import dpo_loss, sft_loss


def full_vocab_logps(model, batch, device):
    """The naive log-prob: logits at every position, a full [B, T, V] log_softmax, gather, mask, sum."""
    input_ids = batch["input_ids"].to(device)
    logits = model(input_ids=input_ids, attention_mask=batch["attention_mask"].to(device)).logits   # [B, T, V]
    token = logits[:, :-1].log_softmax(-1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)             # [B, T-1]
    mask = batch["loss_mask"][:, 1:].to(device)
    return (token * mask).sum(-1), mask.sum(-1)


def preference_step(policy, optimizer, chosen, rejected, pad_id, *, one_pass, head_everywhere, share=False,
                    reference=None, reference_model=None):
    """One MACPO update (DPO + 0.2 x SFT, AdamW) on B pairs, each technique switchable. `reference` is the
    cached (reference_chosen_logps, reference_rejected_logps) for these pairs; else `reference_model` runs now."""
    device, B = policy.device, len(chosen)
    logps_fn = (lambda m, b: full_vocab_logps(m, b, device)) if head_everywhere else \
        (lambda m, b: sequence_logps(m, b["input_ids"].to(device), b["attention_mask"].to(device), b["loss_mask"]))
    if share:                                   # one pass of each prompt, chosen and rejected after it
        rows = pack_rows(chosen + rejected, 2 * max(len(ids) for ids, _ in chosen + rejected))
        logps, n = packed_sequence_logps(ScoredLM(policy), rows, 2 * B, pad_id, torch.float32, device)
        policy_chosen, policy_rejected, n_chosen = logps[:B], logps[B:], n[:B]
    elif one_pass:
        logps, n = logps_fn(policy, collate_pairs(chosen, rejected, pad_id))                # [2B]: chosen rows first
        policy_chosen, policy_rejected, n_chosen = logps[:B], logps[B:], n[:B]
    else:
        (policy_chosen, n_chosen), (policy_rejected, _) = (logps_fn(policy, collate(side, pad_id)) for side in (chosen, rejected))
    if reference is None:
        with torch.no_grad():
            reference = tuple(logps_fn(reference_model, collate(side, pad_id))[0] for side in (chosen, rejected))
    # MACPO's update as train.train computes it, at its defaults (beta=0.1, sft_weight=0.2, sigmoid, no label
    # smoothing): DPO plus 0.2 x the chosen response's token-averaged NLL
    dpo, _, _ = dpo_loss(policy_chosen, policy_rejected, *reference)
    losses = dpo + 0.2 * sft_loss(policy_chosen, n_chosen)
    losses.mean().backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def bench_update(policy, tokenizer, pairs, args):
    """-> rows of the update ladder (pairs/s, peak extra memory), and what caching the reference cost. The policy
    trains with a negligible learning rate so every candidate sees practically the same weights; the reference
    is a frozen copy."""
    device, B, pad_id = policy.device, args.train_batch_size, tokenizer.pad_token_id
    reference_model = copy.deepcopy(policy).eval().requires_grad_(False)
    policy.train()
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-9)
    chosen = [encode(tokenizer, p, c, args.train_max_length) for p, c, _ in pairs]
    rejected = [encode(tokenizer, p, r, args.train_max_length) for p, _, r in pairs]
    batches = [list(range(s, s + B)) for s in range(0, len(pairs) - B + 1, B)]
    t0 = time.perf_counter()
    cached = reference_logps(reference_model, tokenizer, pairs, batch_size=args.batch_size,
                             max_length=args.train_max_length)                  # once per round, before the update
    cache_seconds = time.perf_counter() - t0

    def run(one_pass, head_everywhere, cache, share=False, batches=batches):
        def fn():
            for idx in batches:
                reference = tuple(r[idx].to(device) for r in cached) if cache else None
                preference_step(policy, optimizer, [chosen[i] for i in idx], [rejected[i] for i in idx], pad_id,
                                one_pass=one_pass, head_everywhere=head_everywhere, share=share, reference=reference,
                                reference_model=reference_model)
        return fn
    ladder = {                                  # name: (one_pass, head_everywhere, cache[, share])
        "naive: 2 passes, full-vocab log_softmax, reference model each step": (False, True, False),
        "+ reference log-probs cached": (False, True, True),
        "+ chosen and rejected in one [2B, T] pass": (True, True, True),
        "+ LM head only at scored positions": (True, False, True),
        "+ chosen and rejected after one pass of their prompt = train.train's step": (True, False, True, True),
    }
    tokens = sum(len(chosen[i][0]) + len(rejected[i][0]) for idx in batches for i in idx)
    rows = ladder_rows({name: run(*flags) for name, flags in ladder.items()},
                       {name: run(*flags, batches=batches[:1]) for name, flags in ladder.items()}, args.repeats, device,
                       work=sum(len(idx) for idx in batches), flops=6 * matmul_params(policy) * tokens)
    for row, flags in zip(rows, ladder.values()):
        row["peak_mb"] = peak_extra_memory_mb(run(*flags, batches=batches[:1]), device)
    policy.eval()
    return rows, {"reference_cache_seconds": cache_seconds, "reference_cache_pairs_per_s": len(pairs) / cache_seconds}
