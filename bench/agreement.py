"""Does the perplexity pick survive bf16? MACPO's step (b) takes y+ = argmin_k PPL_student(y^k | x), an argmin
over K numbers per prompt, and in bf16 a sequence's log-prob depends on the batch it sits in (the matrix
products' blocking and accumulation order follow the batch's shape). This measures, on a fixed set of prompts x
K candidates, how often the bf16 pick equals the float32 pick, scored packed (generate.packed_logps's layout),
in padded batches, and one pair at a time, and how often packed bf16 equals one-at-a-time bf16.

    .venv/bin/python -m bench.agreement         # CPU: a 2-layer, hidden-256 Llama pre-trained here briefly (4 min
                                                # on a quiet 2-core machine, far longer on a busy one)
    .venv/bin/python -m bench.agreement --pretrain_steps 0 --n_prompts 100      # random weights (10 s)

    from bench.agreement import pick_agreement
    result = pick_agreement(model, tokenizer, prompts, candidates, batch_size=32)    # any causal LM, any device

The float32 pick is the same weights (the model's, rounded to bf16) computed in float32, one pair at a time: the
comparison isolates the arithmetic, not the rounding of the weights. Picks are compared by text, so two
identical candidates never count as a disagreement. The CLI runs the scoring with the LM head in bf16 (the code
before generate.head_logits) and in float32 (now), on the toy task's prompts: each arithmetic prompt's right
answer, its near miss (last digit off by one), and two other prompts' answers; each harmful one's refusal, its
compliance, and two others.
"""
import argparse
import copy
import functools
import json
import time

import torch

import data
import toy
from data import collate, encode_many, render_prompt
from generate import (ScoredLM, activation_dtype, length_sorted_batches, pack_rows, packed_sequence_logps,
                      row_length, sequence_logps)

MODES = ("packed", "batched", "single")


def weights_in(model, dtype):
    """A copy of `model` with its parameters in `dtype`; buffers (Llama's rotary inv_freq) stay as they are,
    float32, as from_pretrained(dtype=...) leaves them (train.load_model)."""
    out = copy.deepcopy(model)
    for p in out.parameters():                  # a tied weight is one Parameter: cast once
        p.data = p.data.to(dtype)
    return out


@torch.inference_mode()
def mean_logps(model, encoded, pad_id, mode, batch_size=32, row_tokens=1024, float32_head=True):
    """Mean log-prob per scored token of each encoded pair [(input_ids, loss_mask)] -> [N] float32 on the CPU,
    scored as `mode` says:
      packed   generate.packed_logps's layout: rows of at most row_tokens tokens, each prompt once before its
               responses (pack_rows), length-sorted batches of batch_size rows cut at 10% padding
      batched  right-padded batches of batch_size pairs, length-sorted (length_sorted_batches)
      single   each pair alone, no padding
    float32_head: the LM head in float32 (generate.head_logits); False: in the weights' dtype."""
    device, dtype = next(model.parameters()).device, activation_dtype(model)
    scorer = functools.partial(ScoredLM(model), float32_head=float32_head)
    logps, n = torch.zeros(len(encoded)), torch.zeros(len(encoded))
    if mode == "packed":
        rows = pack_rows(encoded, row_tokens)
        for idx in length_sorted_batches([row_length(row) for row in rows], batch_size, 0.1):
            # pairs outside this batch get 0 over 0 tokens, so adding the batches up fills every pair once
            lp, k = packed_sequence_logps(scorer, [rows[r] for r in idx], len(encoded), pad_id, dtype, device)
            logps, n = logps + lp.float().cpu(), n + k.cpu()
        return logps / n.clamp(min=1)
    size = batch_size if mode == "batched" else 1
    for idx in length_sorted_batches([len(ids) for ids, _ in encoded], size):
        b = collate([encoded[i] for i in idx], pad_id)
        lp, k = sequence_logps(scorer, b["input_ids"].to(device), b["attention_mask"].to(device), b["loss_mask"])
        logps[idx], n[idx] = lp.float().cpu(), k.cpu().float()
    return logps / n.clamp(min=1)


def picks(scores):
    """[N, K] mean log-probs -> [N] index of the highest (the lowest perplexity), the lowest index on a tie
    (torch.argmax returns the first maximum)."""
    return scores.argmax(-1).tolist()


def margins(scores):
    """[N, K] -> [N]: the best candidate's mean log-prob minus the second best's (nats per token)."""
    top = scores.topk(2, dim=-1).values
    return top[:, 0] - top[:, 1]


def pick_agreement(model, tokenizer, prompts, candidates, batch_size=32, max_length=1024, max_prompt_length=None,
                   float32_head=True, clear_margin=0.05, modes=MODES):
    """How often the bf16 perplexity pick agrees with the float32 one, per way of batching.

    prompts: N rendered prompts; candidates: N lists of K responses each (candidates[i][k] answers prompts[i]).
    The model (any dtype, any device) is copied twice: its weights rounded to bf16, and those same weights in
    float32. The float32 copy scores every pair alone (the reference pick) and packed; the bf16 copy scores in
    each of `modes` (mean_logps), with the LM head in float32 or not (float32_head).
    -> {"prompts", "candidates", "float32_head",
        "agreement": {"bf16 packed vs float32": share of prompts whose picked texts are equal, ...,
                      "bf16 packed vs bf16 single", "bf16 batched vs bf16 single", "float32 packed vs float32"},
        "error": {"bf16 packed": {"mean", "max"}, ...}: |mean log-prob - float32's| per pair, nats per token,
        "margin": quantiles of the float32 margin (best minus second best mean log-prob),
        "clear": {"margin": clear_margin, "prompts": how many have a float32 margin above it, "agreement": the
                  same comparisons on those prompts only},
        "scores": {"float32": [N][K], "bf16 <mode>": [N][K]} mean log-probs}"""
    N, K = len(prompts), len(candidates[0])
    assert len(candidates) == N and all(len(c) == K for c in candidates), "candidates: N lists of K responses"
    encoded = encode_many(tokenizer, [p for p in prompts for _ in range(K)], [c for cs in candidates for c in cs],
                          max_length, max_prompt_length)
    pad_id = data.pad_id(tokenizer)
    bf16 = weights_in(model, torch.bfloat16).eval()
    fp32 = weights_in(bf16, torch.float32)                              # bf16 -> float32 is exact
    kw = dict(batch_size=batch_size, row_tokens=max_length)
    scores = {"float32": mean_logps(fp32, encoded, pad_id, "single", **kw).view(N, K),
              "float32 packed": mean_logps(fp32, encoded, pad_id, "packed", **kw).view(N, K)}
    del fp32
    for mode in modes:
        scores[f"bf16 {mode}"] = mean_logps(bf16, encoded, pad_id, mode, float32_head=float32_head, **kw).view(N, K)
    del bf16
    chosen = {name: [candidates[i][k] for i, k in enumerate(picks(s))] for name, s in scores.items()}
    pairs = [(f"bf16 {m}", "float32") for m in modes] + [(f"bf16 {m}", "bf16 single") for m in modes if m != "single"]
    pairs = [p for p in pairs if p[1] in scores] + [("float32 packed", "float32")]
    clear = (margins(scores["float32"]) > clear_margin).tolist()

    def agreement(where):
        return {f"{a} vs {b}": sum(chosen[a][i] == chosen[b][i] for i in where) / max(1, len(where)) for a, b in pairs}
    m = margins(scores["float32"])
    return {"prompts": N, "candidates": K, "float32_head": float32_head,
            "agreement": agreement(range(N)),
            "error": {name: {"mean": float((s - scores["float32"]).abs().mean()),
                             "max": float((s - scores["float32"]).abs().max())} for name, s in scores.items()
                      if name != "float32"},
            "margin": {f"p{q}": float(m.quantile(q / 100)) for q in (10, 25, 50)},
            "clear": {"margin": clear_margin, "prompts": sum(clear),
                      "agreement": agreement([i for i in range(N) if clear[i]])},
            "scores": {name: s.tolist() for name, s in scores.items()}}


# ---------------------------------------------------------------------------------------------------------
# The command line: the toy task's prompts and candidates, a small Llama.

def toy_prompts_and_candidates(n, k=4, seed=0):
    """n toy prompts (vicuna, no system line, as run.sh's toy preset renders them) and k candidates each: its
    chosen and rejected response (the right answer and its near miss; a refusal and a compliance), then the
    chosen responses of the next prompts (well-formed answers to another question)."""
    _, w2s, _ = toy.make_task(seed, 1, n + k, 0)
    prompts = [render_prompt(e.prompt, "vicuna", system="") for e in w2s[:n]]
    candidates = [([w2s[i].chosen, w2s[i].rejected] + [w2s[i + j].chosen for j in range(1, k - 1)])[:k]
                  for i in range(n)]
    return prompts, candidates


def small_model(tokenizer, hidden, layers, vocab_size, pretrain_steps, seed, device):
    """A Llama (heads of 64, untied head) over `tokenizer`, its vocabulary padded to vocab_size rows (entries no
    text uses, as in a real model's vocabulary: they still count in every logsumexp), random weights, then
    pretrain_steps steps of the toy bases' pre-training (batch 32, lr 3e-3, float32) so that its predictions are
    confident, as a trained student's are."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from train import TrainSettings, train
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=max(vocab_size, len(tokenizer)), hidden_size=hidden, num_hidden_layers=layers,
                         intermediate_size=(8 * hidden // 3 + 63) // 64 * 64, num_attention_heads=max(1, hidden // 64),
                         num_key_value_heads=max(1, hidden // 64), max_position_embeddings=256,
                         tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model = LlamaForCausalLM(config).to(device)
    if pretrain_steps:
        corpus = toy.pretraining_corpus(f"{seed}-agreement", 32 * pretrain_steps)
        train(model, tokenizer, [(c, y, None) for c, y in corpus],
              TrainSettings(kind="sft", lr=3e-3, batch_size=32, max_length=128, warmup_ratio=0.05, seed=seed,
                            length_window=1, progress=False, log_every=10 ** 9, parallel_mode="none"))
    return model.eval()


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.agreement", description=__doc__.split("\n\n")[0])
    parser.add_argument("--n_prompts", type=int, default=300)
    parser.add_argument("--k", type=int, default=4, help="candidates per prompt")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--vocab_size", type=int, default=8192, help="model vocabulary (the toy tokenizer has ~400)")
    parser.add_argument("--pretrain_steps", type=int, default=300, help="0 = random weights")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--clear_margin", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="", help="write the results as JSON here")
    args = parser.parse_args(argv)
    t0 = time.time()
    tokenizer = toy.train_tokenizer(toy.tokenizer_texts(toy.pretraining_corpus(f"{args.seed}-tokenizer", 3000)))
    model = small_model(tokenizer, args.hidden, args.layers, args.vocab_size, args.pretrain_steps, args.seed,
                        args.device)
    prompts, candidates = toy_prompts_and_candidates(args.n_prompts, args.k, args.seed)
    results = {head: pick_agreement(model, tokenizer, prompts, candidates, args.batch_size, 256,
                                    float32_head=head == "float32", clear_margin=args.clear_margin)
               for head in ("bf16", "float32")}
    first = results["float32"]
    print(f"{args.n_prompts} toy prompts x {args.k} candidates; Llama {args.hidden}x{args.layers}, vocabulary "
          f"{max(args.vocab_size, len(tokenizer))}, {args.pretrain_steps} pre-training steps; {args.device}; "
          f"float32 margin (nats/token) p10 {first['margin']['p10']:.4f}, median {first['margin']['p50']:.4f}; "
          f"{first['clear']['prompts']} prompts above {args.clear_margin}")
    print("| LM head | comparison | agreement | on clear margins | bf16 error mean / max (nats/token) |")
    print("|---|---|---|---|---|")
    for head, r in results.items():
        for name, value in r["agreement"].items():
            source = name.split(" vs ")[0]
            err = r["error"].get(source) if name.endswith("vs float32") else None
            print(f"| {head} | {name} | {value:.4f} | {r['clear']['agreement'][name]:.4f} | "
                  + (f"{err['mean']:.2e} / {err['max']:.2e} |" if err else "|"))
    print(f"({time.time() - t0:.0f} s)")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), **{h: {k: v for k, v in r.items() if k != "scores"}
                                              for h, r in results.items()}}, f, indent=1)


if __name__ == "__main__":
    main()
