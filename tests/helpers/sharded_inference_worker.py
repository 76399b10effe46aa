"""Not a test: run by tests/test_sharded_inference.py, once as a plain process and once under torchrun with 2
processes whose model is sharded with FSDP2 (fully_shard on every decoder layer, then on the ScoredLM root, as
sharding.wrap does). Writes greedy generations, perplexities and reference log-probs, so the two can be compared."""
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))          # the project
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))          # tests/, for conftest's tiny models
import parallel  # noqa: E402
from tiny import make_model, make_tokenizer  # noqa: E402
from generate import ScoredLM, generate, perplexity  # noqa: E402
from generate import reference_logps  # noqa: E402

out, mode = Path(sys.argv[1]), sys.argv[2]
torch.set_num_threads(1)
parallel.setup("cpu")
tokenizer = make_tokenizer()
model = make_model(tokenizer, hidden=32, layers=2, seed=0)
# 9 prompts in batches of 2: 5 batches, so under 2 processes one rank has 3 and the other 2 (and a padding one)
prompts = [f"USER: What is {a} + {b}? ASSISTANT:" for a, b in zip(range(11, 20), range(31, 40 * 3, 9))]
# EOS = the 12th token the model writes after prompt 0 (greedy), so that some prompts stop there and the
# others later or never: batches finish at different steps on different ranks
with torch.no_grad():
    ids = tokenizer([prompts[0]], return_tensors="pt")["input_ids"]
    for _ in range(12):
        ids = torch.cat([ids, model(ids).logits[:, -1:].argmax(-1)], dim=1)
first = ids[0, -1].item()
tokenizer.eos_token = tokenizer.convert_ids_to_tokens(first)
if mode == "fsdp":
    from torch.distributed.fsdp import fully_shard
    scorer = ScoredLM(model)
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(scorer)
    object.__setattr__(model, "_macpo_scorer", scorer)      # generate.scorer_for: every pass through the root
texts = generate(model, tokenizer, prompts, max_new_tokens=20, temperature=0.0, batch_size=2, progress=False)
responses = [f" {a + b}." for a, b in zip(range(11, 20), range(31, 40 * 3, 9))]
ppl = perplexity(model, tokenizer, prompts, responses, batch_size=2, max_length=64)
rows = list(zip(prompts, responses, [t or "x" for t in texts]))
chosen, rejected = reference_logps(model, tokenizer, rows, batch_size=2, max_length=64)
local = sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in model.parameters())
if parallel.is_main():
    out.mkdir(parents=True, exist_ok=True)
    (out / "result.json").write_text(json.dumps({
        "texts": texts, "perplexity": ppl, "chosen": chosen.tolist(), "rejected": rejected.tolist(),
        "eos": first, "local_params": local, "total_params": sum(p.numel() for p in model.parameters())}))
