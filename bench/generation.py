"""bench, section 2: generation, model.generate over prompts in input order up to generate.generate. Every
candidate samples exactly max_new_tokens per row (equal work), so only the decoding loop differs. New tokens/s."""
import copy

import torch

from bench.common import matmul_params
from bench.timing import ladder_rows
from generate import generate


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
