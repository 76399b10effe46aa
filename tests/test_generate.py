"""generate.py on tiny randomly initialised Llamas, against independent one-at-a-time computations."""
import math

import pytest
import torch

from data import collate
from tiny import encode, greedy_alone, make_model
from generate import (ScoredLM, generate, pack_rows, packed_logps, packed_sequence_logps, perplexity,
                      sequence_logps, length_sorted_batches)

PROMPTS = ["USER: What is 12 + 30? ASSISTANT:", "USER: hello ASSISTANT:",
           "A chat between a curious user and an artificial intelligence assistant. USER: How do I pick a lock? ASSISTANT:"]
RESPONSES = ["12 + 30 = 42.", "the quick brown fox jumps over the lazy dog", "Sorry"]


def reference_logps(model, ids, mask):
    """Independent: full forward of ONE unpadded sequence, log_softmax over the whole vocabulary, sum the
    log-probs of the masked tokens."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].double()           # [T, V]
    lp = torch.log_softmax(logits, -1)
    return sum(lp[p - 1, ids[p]].item() for p in range(1, len(ids)) if mask[p]), sum(mask[1:])


def test_sequence_logps_batched_equals_one_at_a_time(model, tokenizer):
    rows = [encode(tokenizer, p, r, 128) for p, r in zip(PROMPTS, RESPONSES)]
    batch = collate(rows, tokenizer.pad_token_id)
    assert batch["input_ids"].shape[0] == 3 and len({len(ids) for ids, _ in rows}) > 1   # padding happens
    with torch.no_grad():
        logps, n = sequence_logps(model, batch["input_ids"], batch["attention_mask"], batch["loss_mask"])
    for i, (ids, mask) in enumerate(rows):
        ref, ref_n = reference_logps(model, ids, mask)
        assert logps[i].item() == pytest.approx(ref, abs=1e-4)
        assert n[i].item() == ref_n == len(tokenizer(RESPONSES[i], add_special_tokens=False)["input_ids"]) + 1


def test_sequence_scores_the_same_alone_and_in_a_padded_batch(model, tokenizer):
    short = encode(tokenizer, PROMPTS[1], RESPONSES[2], 128)
    long = encode(tokenizer, PROMPTS[2], RESPONSES[1], 128)
    with torch.no_grad():
        alone = sequence_logps(model, *[collate([short], 0)[k] for k in ("input_ids", "attention_mask", "loss_mask")])
        b = collate([long, short], tokenizer.pad_token_id)
        batched = sequence_logps(model, b["input_ids"], b["attention_mask"], b["loss_mask"])
    assert batched[0][1].item() == pytest.approx(alone[0][0].item(), abs=1e-4)


def test_fully_masked_row_is_zero_and_prompt_positions_do_not_count(model, tokenizer):
    ids, mask = encode(tokenizer, PROMPTS[0], RESPONSES[0], 128)
    b = collate([(ids, mask), (ids, [0] * len(ids))], tokenizer.pad_token_id)
    with torch.no_grad():
        logps, n = sequence_logps(model, b["input_ids"], b["attention_mask"], b["loss_mask"])
    assert logps[1].item() == 0.0 and n[1].item() == 0
    # changing the loss mask on prompt positions to 1 changes the score: they are excluded by the mask only
    n_prompt = mask.index(1)
    full = collate([(ids, [0] + [1] * (len(ids) - 1))], tokenizer.pad_token_id)
    with torch.no_grad():
        all_logps, all_n = sequence_logps(model, full["input_ids"], full["attention_mask"], full["loss_mask"])
    assert all_n.item() == n[0].item() + n_prompt - 1
    assert all_logps.item() < logps[0].item()


def test_gradients_flow_through_sequence_logps(model, tokenizer):
    b = collate([encode(tokenizer, PROMPTS[0], RESPONSES[0], 128)], tokenizer.pad_token_id)
    logps, _ = sequence_logps(model, b["input_ids"], b["attention_mask"], b["loss_mask"])
    logps.sum().backward()
    assert model.lm_head.weight.grad is not None and model.lm_head.weight.grad.abs().sum() > 0


def test_perplexity_of_uniform_model_is_vocabulary_size(tokenizer):
    m = make_model(tokenizer)
    torch.nn.init.zeros_(m.lm_head.weight)          # every logit 0 -> p = 1/V for every token
    ppl = perplexity(m, tokenizer, PROMPTS, RESPONSES, batch_size=2)
    assert ppl == pytest.approx([m.config.vocab_size] * 3, rel=1e-5)


def test_perplexity_matches_one_pair_at_a_time_in_input_order(model, tokenizer):
    prompts, responses = PROMPTS * 2, RESPONSES + RESPONSES[::-1]
    ppl = perplexity(model, tokenizer, prompts, responses, batch_size=4)
    for p, r, got in zip(prompts, responses, ppl):
        logp, n = reference_logps(model, *encode(tokenizer, p, r, 128))
        assert got == pytest.approx(math.exp(-logp / n), rel=1e-4)


# K responses per prompt, as MACPO scores them: prompts repeat, and one of them has four responses
SHARED_PROMPTS = PROMPTS * 3 + [PROMPTS[0], "hello"]
SHARED_RESPONSES = RESPONSES + RESPONSES[::-1] + [r + " again" for r in RESPONSES] + ["42", "world"]


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("row_tokens", [1, 40, 128, 10_000])
def test_packed_logps_equal_one_pair_at_a_time(tokenizer, attention, row_tokens):
    # row_tokens 1: one document per row (a split at every response); 40: a prompt's responses split over
    # rows; 128 and more: several prompts, each with all of its responses, in one row
    m = make_model(tokenizer, seed=1)
    m.config._attn_implementation = attention
    encoded = [encode(tokenizer, p, r, 128) for p, r in zip(SHARED_PROMPTS, SHARED_RESPONSES)]
    logps, n = packed_logps(m, encoded, tokenizer.pad_token_id, batch_size=3, row_tokens=row_tokens)
    for i, (ids, mask) in enumerate(encoded):
        ref, ref_n = reference_logps(m, ids, mask)
        assert logps[i].item() == pytest.approx(ref, abs=1e-4) and n[i].item() == ref_n


def test_pack_rows_runs_each_prompt_once(tokenizer):
    encoded = [encode(tokenizer, p, r, 128) for p, r in zip(SHARED_PROMPTS, SHARED_RESPONSES)]
    rows = pack_rows(encoded, 10_000)
    assert len(rows) == 1
    placed = sorted(i for row in rows for _, responses in row for i, _, _ in responses)
    assert placed == list(range(len(encoded)))                   # every pair exactly once
    # tokens in the row: each distinct prompt once plus every response (counted from the prompt strings)
    prompt_tokens = sum(len(tokenizer(p)["input_ids"]) for p in set(SHARED_PROMPTS))
    response_tokens = sum(sum(mask) for _, mask in encoded)
    packed = sum(len(prompt) + sum(len(r) for _, r, _ in responses) for row in rows for prompt, responses in row)
    assert packed == prompt_tokens + response_tokens < sum(len(ids) for ids, _ in encoded)
    # a budget below a prompt and its responses splits the prompt's document, repeating the prompt; the budget
    # is raised to the longest pair, so that every pair fits somewhere
    longest = max(len(ids) for ids, _ in encoded)
    small = pack_rows(encoded, 1)
    assert all(sum(len(p) + sum(len(r) for _, r, _ in rs) for p, rs in row) <= longest for row in small)
    assert sum(len(row) for row in small) > len(set(SHARED_PROMPTS))


def test_packed_gradients_equal_one_pair_at_a_time(tokenizer):
    # the preference update: chosen and rejected of each pair after one pass of their prompt, gradients on
    encoded = [encode(tokenizer, p, r, 128) for p, r in zip(SHARED_PROMPTS[:4] * 2, SHARED_RESPONSES[:8])]
    weights = torch.tensor([1.0, -2.0, 0.5, 3.0, -1.0, 0.25, 2.0, -0.5])
    packed = make_model(tokenizer, seed=4)
    logps, n = packed_sequence_logps(ScoredLM(packed), pack_rows(encoded, 256), len(encoded), tokenizer.pad_token_id,
                                     torch.float32, "cpu")
    (weights * logps).sum().backward()
    alone = make_model(tokenizer, seed=4)                  # same weights; independent: one full sequence at a time
    for w, (ids, mask) in zip(weights, encoded):
        lp = torch.log_softmax(alone(torch.tensor([ids])).logits[0], -1)
        (w * sum(lp[p - 1, ids[p]] for p in range(1, len(ids)) if mask[p])).backward()
    for (name, a), b in zip(packed.named_parameters(), alone.parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-5, rtol=1e-4), name


def test_packable_checks_the_model_and_the_padded_fallback_is_exact(tokenizer, monkeypatch):
    import generate as g
    assert g.packable(make_model(tokenizer, seed=1))
    # an attention that ignores the packed mask (as older model code that inverts 4D masks would) is caught
    real = g.packed_batch
    monkeypatch.setattr(g, "packed_batch", lambda *a, **k: (*real(*a, **k)[:2], real(*a, **k)[2] * 0, *real(*a, **k)[3:]))
    broken = make_model(tokenizer, seed=1)
    assert not g.packable(broken)
    monkeypatch.setattr(g, "packed_batch", real)
    # ... and then gets one padded pair per row, with the same scores
    encoded = [encode(tokenizer, p, r, 128) for p, r in zip(SHARED_PROMPTS, SHARED_RESPONSES)]
    logps, n = packed_logps(broken, encoded, tokenizer.pad_token_id, batch_size=3)
    for i, (ids, mask) in enumerate(encoded):
        assert logps[i].item() == pytest.approx(reference_logps(broken, ids, mask)[0], abs=1e-4)


def test_dpo_training_with_shared_prompts_equals_padded_pairs(tokenizer):
    import copy
    from generate import reference_logps as train_reference_logps
    from train import TrainSettings, train
    rows = list(zip(SHARED_PROMPTS[:6], SHARED_RESPONSES[:6], SHARED_RESPONSES[6:12]))
    start = make_model(tokenizer, seed=2)
    reference = train_reference_logps(start, tokenizer, rows, max_length=128)
    runs = []
    for share in (True, False):
        m = copy.deepcopy(start)
        log = train(m, tokenizer, rows, TrainSettings(kind="dpo", epochs=2, lr=1e-3, batch_size=3, max_length=128,
                                                      share_prompts=share, progress=False, log_every=1),
                    reference=reference)
        runs.append((m, [r["loss"] for r in log]))
    assert runs[0][1] == pytest.approx(runs[1][1], rel=1e-5) and len(runs[0][1]) == 4
    for a, b in zip(runs[0][0].parameters(), runs[1][0].parameters()):
        assert torch.allclose(a, b, atol=1e-5)


def test_length_sorted_batches_bound_padding_and_batch_size():
    lengths = [50, 100, 10, 89, 48, 95, 49, 47]
    # by hand, longest first: 100 95 | 89 (below 0.9 x 100) | 50 49 48 (full at 3) | 47 | 10
    assert length_sorted_batches(lengths, batch_size=3, max_padding=0.1) == [[1, 5], [3], [0, 6, 4], [7], [2]]
    # with no padding limit (the default) batches are only cut at batch_size
    assert length_sorted_batches(lengths, batch_size=3) == [[1, 5, 3], [0, 6, 4], [7, 2]]


def test_reference_logps_of_chosen_and_rejected_equal_one_at_a_time(model, tokenizer):
    from generate import reference_logps as train_reference_logps
    rows = list(zip(SHARED_PROMPTS[:4], SHARED_RESPONSES[:4], SHARED_RESPONSES[4:8]))
    chosen, rejected = train_reference_logps(model, tokenizer, rows, batch_size=2, max_length=128)
    for (p, c, r), got_c, got_r in zip(rows, chosen.tolist(), rejected.tolist()):
        assert got_c == pytest.approx(reference_logps(model, *encode(tokenizer, p, c, 128))[0], abs=1e-4)
        assert got_r == pytest.approx(reference_logps(model, *encode(tokenizer, p, r, 128))[0], abs=1e-4)


def test_greedy_batched_generate_equals_one_prompt_at_a_time_and_eos_stops(tokenizer):
    m = make_model(tokenizer, seed=3)
    # a head with a bias on EOS makes some rows stop early and others run to the limit
    head = torch.nn.Linear(m.config.hidden_size, m.config.vocab_size, bias=True)
    head.weight.data.copy_(m.lm_head.weight.data * 5)
    head.bias.data.zero_()
    head.bias.data[tokenizer.eos_token_id] = 0.5
    m.lm_head = head
    prompts = PROMPTS + ["USER: What is 1 + 2? ASSISTANT:", "hello", "the lazy dog"]
    got = generate(m, tokenizer, prompts, max_new_tokens=12, temperature=0, batch_size=4, progress=False)
    refs = [greedy_alone(m, tokenizer, p, 12) for p in prompts]
    assert got == [r for r, _ in refs]
    lengths = [n for _, n in refs]
    assert min(lengths) < 12 and max(lengths) == 12, lengths     # both an EOS stop and a full-length row


def test_sampling_is_deterministic_for_a_seed(model, tokenizer):
    a = generate(model, tokenizer, PROMPTS, max_new_tokens=8, temperature=1.0, top_p=0.9, seed=5, progress=False)
    b = generate(model, tokenizer, PROMPTS, max_new_tokens=8, temperature=1.0, top_p=0.9, seed=5, progress=False)
    c = generate(model, tokenizer, PROMPTS, max_new_tokens=8, temperature=1.0, top_p=0.9, seed=6, progress=False)
    assert a == b and a != c


def test_bucketed_batches_sort_within_windows_and_window_one_keeps_batches_uniform():
    from train import _bucketed_batches
    lengths = [i % 2 for i in range(64)]                     # two kinds of rows, told apart by length
    sorted_batches = _bucketed_batches(lengths, 8, torch.Generator().manual_seed(0), window=8)
    assert all(len({lengths[i] for i in b}) == 1 for b in sorted_batches)          # each batch one kind
    uniform = _bucketed_batches(lengths, 8, torch.Generator().manual_seed(0), window=1)
    assert sorted(i for b in uniform for i in b) == list(range(64))
    # window 1: the batches are consecutive slices of one random permutation, as drawn here independently
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(64, generator=g).tolist()
    slices = [perm[j:j + 8] for j in range(0, 64, 8)]
    assert sorted(map(sorted, uniform)) == sorted(map(sorted, slices))
    assert sum(len({lengths[i] for i in b}) == 2 for b in uniform) >= 6            # mixed kinds
