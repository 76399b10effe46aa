"""bench's inputs: real (prompt, chosen, rejected) triples that fit untruncated, and randomly initialised Llamas.

    pairs, source = load_pairs()
    model = build_model(tokenizer, *MODELS["tiny"], device="cpu")
"""
import random
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import toy
from data import collate, encode_many, read_hh, render_prompt

HH_TEST = "../shared/data/hh-rlhf/helpful-base/test.jsonl.gz"
MODELS = {"tiny": (256, 4), "small": (512, 8)}          # name: (hidden size, layers)


def load_pairs():
    """-> [(rendered prompt, chosen, rejected)] in file order, and where they came from."""
    if Path(HH_TEST).is_file():
        return [(render_prompt(e.prompt, "vicuna"), e.chosen, e.rejected) for e in read_hh(HH_TEST)], \
            "HH-RLHF helpful-base test"
    init, w2s, _ = toy.make_task(0, 1000, 1000, 0)
    return [(render_prompt(e.prompt, "vicuna", system=""), e.chosen, e.rejected) for e in init + w2s], \
        "toy task (HH file absent)"


def fitting_pairs(tokenizer, pairs, n, max_length, max_prompt_length, seed, min_prompt_length=0):
    """n pairs drawn at random (seeded) among those whose prompt and both responses fit untruncated, so that
    every candidate sees exactly the same tokens whichever way it encodes them."""
    def fits(p, c, r):
        P = len(tokenizer(p)["input_ids"])
        return min_prompt_length <= P <= max_prompt_length and all(len(encode(tokenizer, p, x, 10 ** 6)[0]) <= max_length for x in (c, r))
    out = []
    for pair in random.Random(seed).sample(pairs, len(pairs)):
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
    """A Llama-shaped model from its config (heads of 64, SwiGLU MLP ~8/3 wide, untied head), random weights.
    (toy.model_config's toy Llamas are shaped otherwise: tied head, 4x MLP.)"""
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


def encode(tokenizer, prompt, response, max_length, max_prompt_length=None):
    """One (rendered prompt, response) pair -> (input_ids, loss_mask): data.encode_many for one pair."""
    return encode_many(tokenizer, [prompt], [response], max_length, max_prompt_length)[0]


def collate_pairs(chosen_rows, rejected_rows, pad_id):
    """B chosen and B rejected encodings -> one [2B, T] batch, chosen rows first (rows i and B + i are a pair);
    the former data.collate_pairs."""
    assert len(chosen_rows) == len(rejected_rows)
    return collate(list(chosen_rows) + list(rejected_rows), pad_id)
