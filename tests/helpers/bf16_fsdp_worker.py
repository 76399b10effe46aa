"""Not a test: run by tests/test_bf16.py, once as a plain process and once under torchrun (2 processes, FSDP):
MODEL loaded in bf16 (sharding.load_sharded; one process: train.load_model), four SFT steps of full fine-tuning
(float32 master weights, sharded like the weights), saved to OUT/full; then the same with fresh float32 LoRA
adapters on the bf16 base, saved to OUT/lora."""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))          # the project
import parallel  # noqa: E402
from sharding import load_sharded  # noqa: E402
from train import TrainSettings, load_model, save_model, train  # noqa: E402

model_folder, out = sys.argv[1], Path(sys.argv[2])
torch.set_num_threads(1)
parallel.setup("cpu")
load = load_sharded if parallel.world_size() > 1 else load_model       # one process: the plain loader
rows = [(f"USER: What is {a} + 1? ASSISTANT:", f"{a} + 1 = {a + 1}.", None) for a in range(8)]
for name, new_lora in (("full", None), ("lora", (("q_proj", "v_proj"), 4, 8, 0.0, 7))):
    model, tokenizer = load(model_folder, "cpu", new_lora=new_lora, dtype="bfloat16")
    train(model, tokenizer, rows, TrainSettings(kind="sft", epochs=2, lr=1e-4, batch_size=4, max_length=32,
                                                log_every=1, progress=False, parallel_mode="fsdp"))
    save_model(model, tokenizer, out / name)
