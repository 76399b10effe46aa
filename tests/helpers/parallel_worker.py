"""Not a test: run by tests/test_parallel.py under torchrun (and once as a plain process): trains a tiny Llama with
train.train and writes the logged losses and final weights, so one process and two can be compared."""
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))          # the project
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))          # tests/, for conftest's tiny models
import parallel  # noqa: E402
from tiny import make_model, make_tokenizer  # noqa: E402
from generate import reference_logps  # noqa: E402
from tiny import full_state_dict  # noqa: E402
from train import TrainSettings, train  # noqa: E402

out, kind, mode = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
torch.set_num_threads(1)
parallel.setup("cpu")
tokenizer = make_tokenizer()
model = make_model(tokenizer, hidden=32, layers=2, seed=0)
rows = [(f"USER: What is {a} + {b}? ASSISTANT:", f"{a} + {b} = {a + b}.", f"{a} + {b} = {a + b + 1}.")
        for a, b in zip(range(10, 46), range(50, 86))]                                     # 36 pairs
settings = TrainSettings(kind=kind, epochs=2, lr=1e-2, batch_size=12, max_length=64, seed=3, log_every=1,
                         progress=False, parallel_mode=mode)
reference = reference_logps(model, tokenizer, rows, batch_size=5, max_length=64) if kind == "dpo" else None
logged = train(model, tokenizer, rows, settings, reference=reference)
state = {k: v.contiguous() for k, v in (full_state_dict(model) or model.state_dict()).items()}
if parallel.is_main():
    out.mkdir(parents=True, exist_ok=True)
    sharded = any(hasattr(p, "full_tensor") for p in model.parameters())
    (out / "losses.json").write_text(json.dumps({"losses": [r["loss"] for r in logged], "sharded": sharded}))
    save_file({k: v for k, v in state.items() if k != "lm_head.weight" or "model.embed_tokens.weight" not in state or
               not torch.equal(v, state["model.embed_tokens.weight"])}, out / "weights.safetensors")
