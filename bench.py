"""How much faster macpo's scoring, generation and preference step are than the naive scripts, measured side by
side in one run, each technique switched on one at a time.

    bash run.sh bench                      # = python bench.py: CPU, under 10 minutes, writes runs/bench/bench.json
    python bench.py --models tiny --repeats 3

Two randomly initialised Llamas (tiny: hidden 256 / 4 layers, small: hidden 512 / 8 layers, vocabulary 8k, a
BPE tokenizer trained on the spot on the prompts) run over real HH-Helpful test prompts (the toy task's when
../shared/data is absent). Every number is the median of --repeats timed runs after one warm-up, and the
candidates of one comparison run interleaved (A, B, C, A, B, C, ...) so that other jobs on a shared machine
slow them alike. Each table is a ladder: the naive script first, then one technique added per row.

  1. perplexity of K responses per prompt (MACPO's filter: the student scores each weak teacher's answer): one
     pair at a time through model(input_ids, labels=...) and exp(loss), as most scripts do, up to
     generate.perplexity (the LM head only at scored positions, rows packed without padding, each prompt run
     once for its K responses). Response tokens/s.
  2. generation: model.generate over prompts in input order, up to generate.generate (length-sorted batches,
     KV cache, its own sampling loop). Same prompts, batch size, sampling, and number of new tokens for all:
     neither may stop early (min_new_tokens for model.generate; an EOS id the model cannot emit for ours).
  3. the MACPO update (DPO + 0.2 SFT, AdamW): two forward passes with full-vocabulary log_softmax at every
     position and the reference model run every step, up to train.train's step (reference log-probs cached, one
     pass, the head only at scored positions, chosen and rejected after one pass of their shared prompt).
     Pairs/s and the step's peak extra memory.
  4. every row's share of the machine's fp32 matmul peak (a 2048 x 2048 torch.matmul timed in the same rounds),
     counting 2 x parameters x tokens FLOPs forward and 6 x for forward + backward (the input embedding, a
     lookup, is not counted). The count is the full model's, whatever a row skips, so rows compare directly.
"""
import argparse
import copy
import ctypes
import json
import math
import os
import random
import statistics
import threading
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import toy
from data import collate, collate_pairs, encode, read_hh, render_prompt
from generate import (ScoredLM, generate, length_sorted_batches, pack_rows, packed_logps, packed_sequence_logps,
                      perplexity, sequence_logps)
from losses import macpo_loss, token_logps
from train import reference_logps

HH_TEST = "../shared/data/hh-rlhf/helpful-base/test.jsonl.gz"
MODELS = {"tiny": (256, 4), "small": (512, 8)}          # name: (hidden size, layers)


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="tiny,small", help="comma-separated, from: " + ", ".join(MODELS))
    p.add_argument("--repeats", type=int, default=3, help="timed runs per candidate (the median is reported)")
    p.add_argument("--n_score", type=int, default=12, help="prompts scored for perplexity, --k_responses each")
    p.add_argument("--k_responses", type=int, default=3, help="responses per prompt scored for perplexity, as the "
                   "MACPO student scores its K teachers' answers: the pair's chosen and rejected, then other pairs' chosen")
    p.add_argument("--n_generate", type=int, default=16, help="prompts for generation")
    p.add_argument("--n_train", type=int, default=4, help="pairs per timed pass of the preference update")
    p.add_argument("--batch_size", type=int, default=8, help="scoring and generation batch size")
    p.add_argument("--train_batch_size", type=int, default=2, help="pairs per preference step")
    p.add_argument("--max_new_tokens", type=int, default=32)
    p.add_argument("--max_length", type=int, default=512, help="prompt + response tokens (pairs that fit are used)")
    p.add_argument("--max_prompt_length", type=int, default=384)
    p.add_argument("--min_prompt_length", type=int, default=128, help="prompts of a few hundred tokens, as in "
                   "multi-turn HH dialogues (for scoring and generation)")
    p.add_argument("--train_max_length", type=int, default=256, help="prompt + response tokens in the update")
    p.add_argument("--only", default="perplexity,generation,update,trl", help="comma-separated sections to run "
                   "(trl: TRL's DPOTrainer against train.train, where trl is installed)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default="runs/bench/bench.json")
    return p.parse_args()


# ---------------------------------------------------------------------------------------------------------
# Data, tokenizer, models.

def load_pairs():
    """-> [(rendered prompt, chosen, rejected)] in file order, and where they came from."""
    if Path(HH_TEST).is_file():
        examples, source = read_hh(HH_TEST), "HH-RLHF helpful-base test"
        template = {}
    else:
        init, w2s, test = toy.make_task(0, 1000, 1000, 0)
        examples, source = init + w2s, "toy task (HH file absent)"
        template = {"system": ""}
    return [(render_prompt(e.prompt, "vicuna", **template), e.chosen, e.rejected) for e in examples], source


def fitting_pairs(tokenizer, pairs, n, max_length, max_prompt_length, seed, min_prompt_length=0):
    """n pairs drawn at random (seeded) among those whose prompt and both responses fit untruncated, so that
    every candidate below sees exactly the same tokens whichever way it encodes them."""
    def fits(p, c, r):
        P = len(tokenizer(p)["input_ids"])
        return min_prompt_length <= P <= max_prompt_length and all(len(encode(tokenizer, p, x, 10 ** 6)[0]) <= max_length for x in (c, r))
    shuffled = random.Random(seed).sample(pairs, len(pairs))
    out = []
    for pair in shuffled:
        if fits(*pair):
            out.append(pair)
        if len(out) == n:
            return out
    raise SystemExit(f"only {len(out)} pairs fit --max_length {max_length}; lower --n_score / --n_generate / --n_train")


def k_responses_per_prompt(triples, k):
    """[(prompt, chosen, rejected)] -> k (prompt, response) pairs per prompt, grouped by prompt: its chosen, its
    rejected, then the chosen of the next triples (real responses, about as long as its own)."""
    out = []
    for i, (prompt, chosen, rejected) in enumerate(triples):
        others = [triples[(i + j) % len(triples)][1] for j in range(1, k - 1)]
        out += [(prompt, r) for r in ([chosen, rejected] + others)[:k]]
    return out


def build_model(tokenizer, hidden, layers, device, seed=0):
    """A Llama-shaped model from its config (heads of 64, SwiGLU MLP ~8/3 wide, untied head), random weights."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=layers,
                         intermediate_size=(8 * hidden // 3 + 63) // 64 * 64, num_attention_heads=hidden // 64,
                         num_key_value_heads=hidden // 64, max_position_embeddings=1024, tie_word_embeddings=False,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    return LlamaForCausalLM(config).to(device).eval()


def matmul_params(model):
    """Parameters that take part in matrix products (all but the input embedding, a table lookup)."""
    return sum(p.numel() for p in model.parameters()) - model.get_input_embeddings().weight.numel()


# ---------------------------------------------------------------------------------------------------------
# Measuring: interleaved medians, the matmul peak, peak memory.

def sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def interleaved_medians(candidates, repeats, device, warmup=None):
    """candidates {name: fn} -> {name: median seconds of fn()}. One warm-up call each first (allocator, kernels,
    caches; `warmup` {name: fn} may give a cheaper one, e.g. on a slice of the data), then `repeats` rounds of
    A, B, C, ... so that background load from other jobs falls on every candidate alike."""
    for fn in (warmup or candidates).values():
        fn()
    times = {name: [] for name in candidates}
    for _ in range(repeats):
        for name, fn in candidates.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def ladder_rows(candidates, warmup, repeats, device, work, flops, n=2048):
    """Time a ladder {name: fn} and -> rows {what, seconds, rate = work / s, gflops, percent_of_peak}. The fp32
    matmul peak ([n, n] x [n, n], 2 n^3 FLOPs) is timed as one more candidate in the same interleaved rounds,
    so that it is measured under the same background load as the rows it is the yardstick for."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    matmul = {"fp32 matmul peak": lambda: a @ b}
    seconds = interleaved_medians(candidates | matmul, repeats, device, warmup=warmup | matmul)
    peak = 2 * n ** 3 / seconds.pop("fp32 matmul peak") / 1e9
    return [{"what": name, "seconds": s, "rate": work / s, "gflops": flops / s / 1e9,
             "percent_of_peak": 100 * flops / s / 1e9 / peak, "matmul_peak_gflops": peak} for name, s in seconds.items()]


def _rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def return_freed_memory_to_os():
    """glibc keeps freed blocks for reuse, so a step's peak could hide inside earlier steps' leftovers and RSS
    would under-count it. malloc_trim hands the free pages back first; reusing them then shows in RSS again."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass                                                    # not glibc: RSS peaks may read low


class StepMeter:
    """Per-step wall time and peak extra memory (over the memory at the step's start), also for loops we do not own:
    step_begin() / step_end() around each step, a thread sampling the RSS every millisecond (CUDA: the
    allocator's counters)."""

    def __init__(self, device):
        self.device, self.seconds, self.peak_mb = device, [], []
        self.cuda = str(device).startswith("cuda")

    def step_begin(self):
        sync(self.device)
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
            self.before = torch.cuda.memory_allocated()
        else:
            return_freed_memory_to_os()
            self.before, self.peak, self.done = _rss_bytes(), _rss_bytes(), threading.Event()

            def sample():
                while not self.done.is_set():
                    self.peak = max(self.peak, _rss_bytes())
                    time.sleep(0.001)
            self.thread = threading.Thread(target=sample)
            self.thread.start()
        self.t0 = time.perf_counter()

    def step_end(self):
        sync(self.device)
        self.seconds.append(time.perf_counter() - self.t0)
        if self.cuda:
            self.peak_mb.append((torch.cuda.max_memory_allocated() - self.before) / 2 ** 20)
        else:
            self.done.set()
            self.thread.join()
            self.peak_mb.append((max(self.peak, _rss_bytes()) - self.before) / 2 ** 20)

    def row(self, what, pairs_per_step):
        """Median over the steps after the first (the first allocates the optimizer state)."""
        s, m = statistics.median(self.seconds[1:]), max(self.peak_mb[1:])
        return {"what": what, "seconds_per_step": s, "rate": pairs_per_step / s, "peak_mb": m, "steps": len(self.seconds) - 1}


def peak_extra_memory_mb(fn, device):
    """Peak memory fn() adds on top of what is allocated before it (StepMeter, below, around one call)."""
    meter = StepMeter(device)
    meter.step_begin()
    fn()
    meter.step_end()
    return meter.peak_mb[-1]


# ---------------------------------------------------------------------------------------------------------
# 1. Perplexity scoring.

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
            logps = (token_logps(logits[:, :-1], input_ids[:, 1:]) * mask).sum(-1)
            n = mask.sum(-1)
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
    """-> rows of the perplexity ladder (response tokens/s), after checking every candidate gives the same PPL."""
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
    encoded = [encode(tokenizer, p, r, args.max_length) for p, r in pairs]
    response_tokens = sum(sum(mask) for _, mask in encoded)
    flops = 2 * matmul_params(model) * sum(len(ids) for ids, _ in encoded)
    return ladder_rows(ladder(pairs), ladder(pairs[:args.k_responses]), args.repeats, model.device, response_tokens, flops)


# ---------------------------------------------------------------------------------------------------------
# 2. Generation.

@torch.inference_mode()
def hf_generate(model, tokenizer, prompts, batch_size, max_new_tokens):
    """model.generate over left-padded batches in input order; pure sampling (temperature 1, no top-k/top-p),
    exactly max_new_tokens per row (min_new_tokens bans EOS until then)."""
    tokenizer = copy.copy(tokenizer)
    tokenizer.padding_side = "left"
    out = []
    for s in range(0, len(prompts), batch_size):
        batch = tokenizer(list(prompts[s:s + batch_size]), return_tensors="pt", padding=True).to(model.device)
        new = model.generate(**batch, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                             max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                             pad_token_id=tokenizer.pad_token_id)[:, batch["input_ids"].shape[1]:]
        out += tokenizer.batch_decode(new, skip_special_tokens=True)
    return out


def never_stopping(tokenizer):
    """A copy of the tokenizer whose EOS is a new token, one past the model's vocabulary: the model can never
    sample it, so generate.generate runs every row for max_new_tokens (equal work with min_new_tokens above).
    Prompts tokenize exactly as before (only the BOS is added as a special token)."""
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.add_special_tokens({"eos_token": "<never>"})
    return tokenizer


def bench_generation(model, tokenizer, prompts, args):
    """-> rows of the generation ladder (new tokens/s)."""
    B, N = args.batch_size, args.max_new_tokens
    no_eos = never_stopping(tokenizer)
    assert no_eos.eos_token_id >= model.config.vocab_size
    kw = dict(max_new_tokens=N, temperature=1.0, top_p=1.0, progress=False)

    def ladder(prompts):
        return {
            "naive: model.generate, batches in input order": lambda: hf_generate(model, tokenizer, prompts, B, N),
            # one generate.generate call per input-order batch: its length sort then cannot regroup the prompts
            "generate.generate, batches in input order": lambda: [generate(model, no_eos, prompts[s:s + B], batch_size=B, **kw)
                                                                  for s in range(0, len(prompts), B)],
            "+ length-sorted batches = generate.generate": lambda: generate(model, no_eos, prompts, batch_size=B, **kw),
        }
    new_tokens = len(prompts) * N
    flops = 2 * matmul_params(model) * (sum(len(tokenizer(p)["input_ids"]) for p in prompts) + new_tokens)
    return ladder_rows(ladder(prompts), ladder(prompts[:2]), args.repeats, model.device, new_tokens, flops)


# ---------------------------------------------------------------------------------------------------------
# 3. The preference update.

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
    device = policy.device
    logps_fn = (lambda m, b: full_vocab_logps(m, b, device)) if head_everywhere else \
        (lambda m, b: sequence_logps(m, b["input_ids"].to(device), b["attention_mask"].to(device), b["loss_mask"]))
    if share:                                   # one pass of each prompt, chosen and rejected after it
        rows = pack_rows(chosen + rejected, 2 * max(len(ids) for ids, _ in chosen + rejected))
        logps, n = packed_sequence_logps(ScoredLM(policy), rows, 2 * len(chosen), pad_id, torch.float32, device)
        B = len(chosen)
        policy_chosen, policy_rejected, n_chosen = logps[:B], logps[B:], n[:B]
    elif one_pass:
        logps, n = logps_fn(policy, collate_pairs(chosen, rejected, pad_id))                # [2B]: chosen rows first
        B = len(chosen)
        policy_chosen, policy_rejected, n_chosen = logps[:B], logps[B:], n[:B]
    else:
        (policy_chosen, n_chosen), (policy_rejected, _) = (logps_fn(policy, collate(side, pad_id)) for side in (chosen, rejected))
    if reference is None:
        with torch.no_grad():
            reference = tuple(logps_fn(reference_model, collate(side, pad_id))[0] for side in (chosen, rejected))
    losses, _ = macpo_loss(policy_chosen, policy_rejected, *reference, n_chosen)
    losses.mean().backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def bench_update(policy, tokenizer, pairs, args):
    """-> rows of the update ladder (pairs/s, peak extra memory). The policy trains with a negligible learning
    rate so every candidate sees practically the same weights; the reference is a frozen copy."""
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
    ladder = {
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


# ---------------------------------------------------------------------------------------------------------
# 4. TRL, when installed (it is not a dependency).

def bench_trl(policy, tokenizer, pairs, args):
    """TRL's DPOTrainer (DPO + 0.2 x SFT: loss_type ["sigmoid", "sft"], weights [1, 0.2]; reference log-probs
    precomputed; no padding-free) against train.train's step, back to back in this process on the same pairs,
    batch size, fresh copies of the same weights and learning rate; per-step medians and peaks from StepMeter.
    -> rows, or a string saying why it was skipped."""
    try:
        import trl
        from datasets import Dataset
        from transformers import TrainerCallback
        from trl import DPOConfig, DPOTrainer
    except ImportError:
        return "skipped: trl (with datasets) is not importable; it is not a dependency of macpo. To measure it: " \
               "python -m venv /tmp/trl && /tmp/trl/bin/pip install -r requirements.txt trl && /tmp/trl/bin/python bench.py"
    import tempfile
    from train import reference_logps, train
    B, device = args.train_batch_size, policy.device
    steps = (args.repeats + 1) * (len(pairs) // B)
    rows = [(p, c, r) for p, c, r in pairs][:len(pairs) // B * B]
    trl_meter, ours_meter = StepMeter(device), StepMeter(device)

    class Meter(TrainerCallback):
        def on_step_begin(self, *a, **k):
            trl_meter.step_begin()

        def on_step_end(self, *a, **k):
            trl_meter.step_end()
    with tempfile.TemporaryDirectory() as tmp:
        config = DPOConfig(output_dir=tmp, per_device_train_batch_size=B, gradient_accumulation_steps=1,
                           max_steps=steps, learning_rate=1e-9, beta=0.1, loss_type=["sigmoid", "sft"],
                           loss_weights=[1.0, 0.2], precompute_ref_log_probs=True, max_length=args.train_max_length,
                           report_to="none", save_strategy="no", logging_strategy="no", disable_tqdm=True,
                           use_cpu=not str(device).startswith("cuda"), bf16=False, dataloader_num_workers=0,
                           lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=1.0)
        data = Dataset.from_dict({"prompt": [p for p, _, _ in rows], "chosen": [c for _, c, _ in rows],
                                  "rejected": [r for _, _, r in rows]})
        trainer = DPOTrainer(model=copy.deepcopy(policy).train(), ref_model=copy.deepcopy(policy).eval(), args=config,
                             train_dataset=data, processing_class=tokenizer, callbacks=[Meter()])
        trainer.train()
    # ours: the same pairs and steps through train.train, timed per optimizer step by the same meter
    model = copy.deepcopy(policy)
    reference = reference_logps(model, tokenizer, rows, max_length=args.train_max_length)

    class Timed(torch.optim.AdamW):
        def step(self, *a, **k):
            out = super().step(*a, **k)
            ours_meter.step_end()
            ours_meter.step_begin()
            return out
    ours_meter.step_begin()
    real_adamw, torch.optim.AdamW = torch.optim.AdamW, Timed      # train() builds its own AdamW
    try:
        train(model, tokenizer, rows * (args.repeats + 1), kind="dpo", epochs=1, lr=1e-9, batch_size=B,
              max_length=args.train_max_length, reference=tuple(r.repeat(args.repeats + 1) for r in reference),
              progress=False, grad_clip=1.0, log_every=10 ** 9)
    finally:
        torch.optim.AdamW = real_adamw
    ours_meter.step_end()
    ours_meter.seconds, ours_meter.peak_mb = ours_meter.seconds[:-1], ours_meter.peak_mb[:-1]
    return [trl_meter.row(f"TRL {trl.__version__} DPOTrainer (sigmoid + 0.2 sft, reference precomputed)", B),
            ours_meter.row("macpo train.train (kind='dpo')", B)]


# ---------------------------------------------------------------------------------------------------------

def print_table(title, rows, unit, memory=False):
    print(f"\n{title}  (fp32 matmul peak in the same rounds: {rows[0]['matmul_peak_gflops']:.1f} GFLOP/s)")
    width = max(66, max(len(row["what"]) for row in rows))
    header = f"  {'':<{width}} {unit:>12} {'vs naive':>9} {'vs prev':>8} {'% peak':>7}" + (f" {'peak MB':>8}" if memory else "")
    print(header)
    for i, row in enumerate(rows):
        row["vs_naive"], row["vs_previous"] = row["rate"] / rows[0]["rate"], row["rate"] / rows[max(i - 1, 0)]["rate"]
        line = f"  {row['what']:<{width}} {row['rate']:>12.1f} {row['vs_naive']:>8.2f}x {row['vs_previous']:>7.2f}x {row['percent_of_peak']:>6.1f}%"
        print(line + (f" {row['peak_mb']:>8.1f}" if memory else ""))


def main():
    args = parse_args()
    device = torch.device(args.device)
    t_start = time.perf_counter()
    pairs, source = load_pairs()
    # an 8k BPE trained on the prompts and responses themselves (models are random: only shapes matter)
    tokenizer = toy.train_tokenizer([t for pair in pairs[:2000] for t in pair], vocab_size=8000)
    if not Path(HH_TEST).is_file():
        args.min_prompt_length = 0                      # the toy task's prompts are a few dozen tokens
    print(f"data: {source}; tokenizer: {len(tokenizer)} tokens; device: {device}, {torch.get_num_threads()} threads")
    results = {"source": source, "device": str(device), "threads": torch.get_num_threads(),
               "args": vars(args), "models": {}}
    score_pairs = k_responses_per_prompt(fitting_pairs(tokenizer, pairs, args.n_score, args.max_length,
                                                       args.max_prompt_length, seed=1,
                                                       min_prompt_length=args.min_prompt_length), args.k_responses)
    prompts = [p for p, _, _ in fitting_pairs(tokenizer, pairs, args.n_generate, args.max_length, args.max_prompt_length,
                                              seed=2, min_prompt_length=args.min_prompt_length)]
    train_pairs = fitting_pairs(tokenizer, pairs, args.n_train, args.train_max_length, args.train_max_length // 2, seed=3)
    for name in args.models.split(","):
        hidden, layers = MODELS[name]
        model = build_model(tokenizer, hidden, layers, device)
        print(f"\n=== {name}: hidden {hidden}, {layers} layers, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M "
              f"parameters ({matmul_params(model) / 1e6:.1f}M in matrix products)")
        r = results["models"][name] = {"hidden": hidden, "layers": layers}
        if "perplexity" in args.only:
            r["perplexity"] = bench_perplexity(model, tokenizer, score_pairs, args)
            masks = [encode(tokenizer, p, x, args.max_length)[1] for p, x in score_pairs]
            r["mean_prompt_tokens"] = sum(m.count(0) for m in masks) / len(masks)
            r["mean_response_tokens"] = sum(m.count(1) for m in masks) / len(masks)
            print_table(f"perplexity of {args.k_responses} responses to each of {args.n_score} prompts (mean "
                        f"{r['mean_prompt_tokens']:.0f} + {r['mean_response_tokens']:.0f} tokens), batch {args.batch_size}",
                        r["perplexity"], "resp tok/s")
        if "generation" in args.only:
            r["generation"] = bench_generation(model, tokenizer, prompts, args)
            print_table(f"generation, {len(prompts)} prompts, batch {args.batch_size}, {args.max_new_tokens} new tokens, "
                        f"sampling", r["generation"], "new tok/s")
        if "update" in args.only:
            r["update"], cache = bench_update(model, tokenizer, train_pairs, args)
            r.update(cache)
            print_table(f"MACPO update, {args.n_train} pairs, {args.train_batch_size} per step, max length "
                        f"{args.train_max_length}", r["update"], "pairs/s", memory=True)
            print(f"  (caching the reference once costs {cache['reference_cache_pairs_per_s']:.1f} pairs/s of "
                  f"inference, paid once per round instead of on every step of every epoch)")
    if "trl" in args.only:
        model = build_model(tokenizer, *MODELS[args.models.split(",")[-1]], device)
        results["trl"] = bench_trl(model, tokenizer, train_pairs, args)
        if isinstance(results["trl"], str):
            print(f"\nTRL DPOTrainer: {results['trl']}")
        else:
            print(f"\nMACPO update against TRL's DPOTrainer, {args.models.split(',')[-1]} model, {args.train_batch_size} "
                  f"pairs per step, max length {args.train_max_length}, median of {results['trl'][0]['steps']} steps each")
            for row in results["trl"]:
                row["vs_trl"] = row["rate"] / results["trl"][0]["rate"]
                print(f"  {row['what']:<66} {row['rate']:>8.1f} pairs/s {row['vs_trl']:>6.2f}x {row['peak_mb']:>8.1f} MB peak")
    results["seconds"] = time.perf_counter() - t_start
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))
    print(f"\n{results['seconds']:.0f} s in all; written to {args.out}")


if __name__ == "__main__":
    main()
