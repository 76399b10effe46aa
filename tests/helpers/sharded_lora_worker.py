"""Not a test: run by tests/test_sharded.py, once as a plain process and once under torchrun (2 processes): a
LoRA checkpoint (MODEL/adapters, on MODEL/base) loaded with sharding.load_sharded (one process: train.load_model), its logits with adapters on and
off, two DPO + SFT steps continuing the adapters, and the adapters saved back (train.save_model); then fresh
adapters (seed 7) added to MODEL/base as it loads, saved untrained to OUT/fresh."""
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))          # the project
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))          # tests/, for tiny.py
import lora  # noqa: E402
import parallel  # noqa: E402
from generate import reference_logps, scorer_for  # noqa: E402
from sharding import load_sharded  # noqa: E402
from tiny import lora_parameters  # noqa: E402
from train import TrainSettings, load_model, save_model, train  # noqa: E402

models, out = Path(sys.argv[1]), Path(sys.argv[2])
torch.set_num_threads(1)
parallel.setup("cpu")
load = load_sharded if parallel.world_size() > 1 else load_model       # one process: the plain loader
model, tokenizer = load(str(models / "adapters"), "cpu")
ids = torch.randint(3, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
mask = torch.ones_like(ids)
B, T = ids.shape
rows, cols = torch.arange(B).repeat_interleave(T), torch.arange(T).repeat(B)
with torch.no_grad():
    on = scorer_for(model)(ids, mask, rows, cols)                                      # [B * T, V]
    with lora.adapters_disabled(model):
        off = scorer_for(model)(ids, mask, rows, cols)
pairs = [(f"USER: What is {a} + 1? ASSISTANT:", f"{a + 1}.", f"{a + 2}.") for a in range(8)]
reference = reference_logps(model, tokenizer, pairs, batch_size=4, max_length=32)
log = train(model, tokenizer, pairs, TrainSettings(kind="dpo", lr=1e-2, batch_size=4, max_length=32, log_every=1,
                                                   progress=False, parallel_mode="fsdp"), reference=reference)
save_model(model, tokenizer, out / "saved")
fresh, _ = load(str(models / "base"), "cpu", new_lora=(("q_proj", "v_proj", "down_proj"), 4, 8, 0.0, 7))
save_model(fresh, tokenizer, out / "fresh")
local = sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in lora_parameters(model))
if parallel.is_main():
    save_file({"on": on.contiguous(), "off": off.contiguous()}, out / "logits.safetensors")
    (out / "result.json").write_text(json.dumps({"losses": [r["loss"] for r in log], "adapter_local": local,
                                                 "adapter_total": sum(p.numel() for p in lora_parameters(model))}))
