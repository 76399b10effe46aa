"""How much faster macpo's scoring, generation and preference step are than the naive scripts, measured side by
side in one run, each technique switched on one at a time.

    bash run.sh bench                      # = python -m bench: CPU, under 10 minutes, writes runs/bench/bench.json
    python -m bench --models tiny --repeats 3          # from the repository root

Two randomly initialised Llamas (tiny: hidden 256 / 4 layers, small: hidden 512 / 8 layers, vocabulary 8k, a
BPE tokenizer trained on the spot on the prompts) run over real HH-Helpful test prompts (the toy task's when
../shared/data is absent; bench/common.py). Every number is the median of --repeats timed runs after one warm-up,
and the candidates of one comparison run interleaved (A, B, C, A, B, C, ...) so that other jobs on a shared
machine slow them alike (bench/timing.py). Each table is a ladder: the naive script first, then one technique
added per row.

  1. perplexity of K responses per prompt (MACPO's filter: the student scores each weak teacher's answer): one
     pair at a time through model(input_ids, labels=...) and exp(loss), as most scripts do, up to
     generate.perplexity (the LM head only at scored positions, rows packed without padding, each prompt run
     once for its K responses). Response tokens/s. bench/perplexity.py
  2. generation: model.generate over prompts in input order, up to generate.generate (length-sorted batches,
     KV cache, its own sampling loop). Same prompts, batch size, sampling, and number of new tokens for all:
     neither may stop early (min_new_tokens for model.generate; an EOS id the model cannot emit for ours).
     bench/generation.py
  3. the MACPO update (DPO + 0.2 SFT, AdamW): two forward passes with full-vocabulary log_softmax at every
     position and the reference model run every step, up to train.train's step (reference log-probs cached, one
     pass, the head only at scored positions, chosen and rejected after one pass of their shared prompt).
     Pairs/s and the step's peak extra memory. bench/update.py; against TRL's DPOTrainer: bench/framework.py
  4. every row's share of the machine's fp32 matmul peak (a 2048 x 2048 torch.matmul timed in the same rounds),
     counting 2 x parameters x tokens FLOPs forward and 6 x for forward + backward (the input embedding, a
     lookup, is not counted). The count is the full model's, whatever a row skips, so rows compare directly.
"""
import argparse
import json
import time
from pathlib import Path

import torch

import toy
from bench.common import HH_TEST, MODELS, build_model, fitting_pairs, k_responses_per_prompt, load_pairs, matmul_params
from bench.framework import bench_trl
from bench.generation import bench_generation
from bench.perplexity import bench_perplexity
from bench.update import bench_update


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


def print_table(title, rows, unit, memory=False):
    """Print a ladder; adds vs_naive and vs_previous (rate ratios) to each row, so they reach bench.json too."""
    print(f"\n{title}  (fp32 matmul peak in the same rounds: {rows[0]['matmul_peak_gflops']:.1f} GFLOP/s)")
    width = max(66, max(len(row["what"]) for row in rows))
    print(f"  {'':<{width}} {unit:>12} {'vs naive':>9} {'vs prev':>8} {'% peak':>7}" + (f" {'peak MB':>8}" if memory else ""))
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
            r["perplexity"], tokens = bench_perplexity(model, tokenizer, score_pairs, args)
            r.update(tokens)
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
        name = args.models.split(",")[-1]
        results["trl"] = bench_trl(build_model(tokenizer, *MODELS[name], device), tokenizer, train_pairs, args)
        if isinstance(results["trl"], str):
            print(f"\nTRL DPOTrainer: {results['trl']}")
        else:
            print(f"\nMACPO update against TRL's DPOTrainer, {name} model, {args.train_batch_size} pairs per step, max "
                  f"length {args.train_max_length}, median of {results['trl'][0]['steps']} steps each")
            for row in results["trl"]:
                row["vs_trl"] = row["rate"] / results["trl"][0]["rate"]
                print(f"  {row['what']:<66} {row['rate']:>8.1f} pairs/s {row['vs_trl']:>6.2f}x {row['peak_mb']:>8.1f} MB peak")
    results["seconds"] = time.perf_counter() - t_start
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))
    print(f"\n{results['seconds']:.0f} s in all; written to {args.out}")


if __name__ == "__main__":
    main()
