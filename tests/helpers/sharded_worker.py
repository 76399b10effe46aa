"""Not a test: run by tests/test_sharded.py under torchrun (2 processes, gloo, CPU). For every model folder under
MODELS: load it sharded (sharding.load_sharded), write what each rank holds and computes, and save it back with
the streaming save, so the test can compare all of it with the original folder and one process.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/helpers/sharded_worker.py MODELS OUT
    ... sharded_worker.py MODEL OUT --rss     # only load and save one larger model, print peak RSS per rank

OUT/<model>/: rank<r>.json (local and total numels, tied or not), gathered.safetensors (every parameter and
buffer gathered whole), rank<r>.safetensors (logits of a forward, of a cached last step, generated ids),
saved/ (train.save_model), saved_small/ (sharding.save_sharded with files of at most 1 kB). A folder named
broken* must fail to load; its error message goes to OUT/<model>/error.txt. OUT/trained/: MODELS/even trained
with parallel_mode="fsdp", saved by save_model (saved/) and gathered by full_state_dict (full.safetensors).
"""
import json
import resource
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))          # the project
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))          # tests/, for tiny.py
import parallel  # noqa: E402
from generate import scorer_for  # noqa: E402
from data import ModelLoadError  # noqa: E402
from sharding import load_sharded, save_sharded  # noqa: E402
from tiny import full_state_dict  # noqa: E402
from train import TrainSettings, load_model, save_model, train  # noqa: E402


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024          # Linux: kB


def inputs(vocab_size):
    """[2, 9] ids, the second row left-padded by 3 (its attention mask 0 there): the same on every rank."""
    ids = torch.randint(3, vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    return ids, mask


def run(folder, out):
    r = parallel.rank()
    if folder.name.startswith("broken"):
        try:
            load_sharded(folder, "cpu")
        except ModelLoadError as e:
            if parallel.is_main():
                out.mkdir(parents=True, exist_ok=True)
                (out / "error.txt").write_text(str(e))
        return
    model, tokenizer = load_sharded(folder, "cpu")
    params = list(model.parameters())
    info = {"local": sum(p.to_local().numel() for p in params), "total": sum(p.numel() for p in params),
            "all_dtensors": all(hasattr(p, "full_tensor") for p in params),
            "tied": model.lm_head.weight is model.model.embed_tokens.weight,
            "local_rows": {n: p.to_local().shape[0] for n, p in model.named_parameters()}}
    with torch.no_grad():
        # every parameter and buffer whole (full_tensor is an all-gather: every rank, the same order)
        whole = {n: p.full_tensor().clone() for n, p in model.named_parameters(remove_duplicate=False)}
        whole |= {n: b.clone() for n, b in model.named_buffers()}
        ids, mask = inputs(model.config.vocab_size)
        # every forward pass goes through the sharded root (generate.scorer_for), the head where asked: here
        # at every position, [2 * 9, V] -> [2, 9, V]
        scorer, (B, T) = scorer_for(model), ids.shape
        logits = scorer(ids, mask, torch.arange(B).repeat_interleave(T), torch.arange(T).repeat(B)).reshape(B, T, -1)
    with torch.inference_mode():                       # as generate.py runs: KV cache through the sharded model
        last = torch.arange(B)
        _, cache = scorer(ids[:, :-1], mask[:, :-1], last, torch.full((B,), T - 2), use_cache=True)
        step, _ = scorer(ids[:, -1:], mask, last, torch.zeros(B, dtype=torch.long), cache=cache, use_cache=True)
        step = step[:, None]                                                             # [2, 1, V]
        generated, step_ids, m, cache = ids[:1, :5], ids[:1, :5], mask[:1, :5], None    # greedy, 6 new tokens
        for _ in range(6):
            next_logits, cache = scorer(step_ids, m, torch.zeros(1, dtype=torch.long),
                                        torch.full((1,), step_ids.shape[1] - 1), cache=cache, use_cache=True)
            step_ids = next_logits.argmax(-1)[:, None]
            generated, m = torch.cat([generated, step_ids], 1), torch.cat([m, torch.ones_like(step_ids)], 1)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{r}.json").write_text(json.dumps(info))
    save_file({"logits": logits.contiguous(), "step": step.contiguous(), "generated": generated.contiguous()},
              out / f"rank{r}.safetensors")
    if parallel.is_main():
        save_file(whole, out / "gathered.safetensors")
    save_model(model, tokenizer, out / "saved")
    save_sharded(model, out / "saved_small", max_shard_bytes=1024)


def trained(folder, out):
    """The other way a model gets sharded: loaded whole on every rank (load_model), trained with
    parallel_mode="fsdp" (wrap shards it under a ScoredLM root), then saved with save_model (streamed) and
    gathered at once with full_state_dict (the old way) to compare."""
    model, tokenizer = load_model(folder, "cpu")
    rows = [(f"USER: What is {a} + 1? ASSISTANT:", f"{a + 1}.", None) for a in range(8)]
    train(model, tokenizer, rows, TrainSettings(kind="sft", lr=1e-2, batch_size=4, max_length=32, progress=False,
                                                parallel_mode="fsdp"))
    save_model(model, tokenizer, out / "saved")
    full = full_state_dict(model)
    if parallel.is_main():
        save_file({k: v.contiguous() for k, v in full.items()}, out / "full.safetensors")


def resident_mb():
    """(anonymous, file-backed) resident MB now: the weights a rank holds are anonymous memory; the safetensors
    pages it has read through mmap are file-backed (the page cache, shared, dropped under pressure)."""
    status = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return tuple(int(status[k].split()[0]) / 1024 for k in ("RssAnon", "RssFile"))


def rss(folder, out):
    """Peak RSS after the imports, after loading sharded, after a streamed save in 64 MB files and after
    save_model (5 GB files, so here one file: the whole model on rank 0 before it is written): a line per rank."""
    before = peak_rss_mb()
    model, tokenizer = load_sharded(folder, "cpu")
    loaded, (anon, file) = peak_rss_mb(), resident_mb()
    local = sum(p.to_local().numel() * p.element_size() for p in model.parameters()) / 2**20
    total = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    save_sharded(model, out / "saved_64MB", max_shard_bytes=64 * 2**20)
    streamed = peak_rss_mb()
    save_model(model, tokenizer, out / "saved")
    line = (f"rank {parallel.rank()}: weights {total:.0f} MB, my shards {local:.0f} MB; peak RSS: imports "
            f"{before:.0f} MB, load_sharded {loaded:.0f} MB (resident then {anon:.0f} anonymous + {file:.0f} "
            f"file-backed), save_sharded 64 MB files {streamed:.0f} MB, save_model {peak_rss_mb():.0f} MB")
    lines = [None] * parallel.world_size()
    dist.all_gather_object(lines, line)
    if parallel.is_main():
        print("\n".join(lines), flush=True)


if __name__ == "__main__":
    torch.set_num_threads(1)
    parallel.setup("cpu")
    source, out = Path(sys.argv[1]), Path(sys.argv[2])
    if "--rss" in sys.argv:
        rss(source, out)
    else:
        for folder in sorted(p for p in source.iterdir() if p.is_dir()):
            run(folder, out / folder.name)
        trained(source / "even", out / "trained")
    parallel.barrier()
    dist.destroy_process_group()
