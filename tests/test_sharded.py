"""Sharded from loading to saving (sharding.load_sharded, sharding.save_sharded) under torchrun --nproc_per_node 2 on
CPU (gloo), against the original safetensors folder and one process (train.load_model) on the same inputs."""
import inspect
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "helpers" / "sharded_worker.py"
sys.path.insert(0, str(WORKER.parent))                               # the worker's inputs(), for one process
import parallel  # noqa: E402
from tiny import make_model, make_tokenizer, run_or_show  # noqa: E402
from sharded_worker import inputs  # noqa: E402
from train import load_model  # noqa: E402

pytestmark = pytest.mark.slow           # left out of `bash run.sh test fast`

torch.set_num_threads(1)                    # this machine's other core runs someone else's experiment


def torchrun(*args, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(WORKER), *args]
    return run_or_show(cmd, cwd=ROOT, env=env, timeout=timeout)


def llama(tokenizer, seed, **sizes):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=64, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **sizes)
    return LlamaForCausalLM(config).eval()


def checkpoint(folder):
    """Every tensor in a folder's safetensors files, in float32."""
    return {k: v.float() for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}


def max_relative(a, b):
    return float((a - b).abs().max() / b.abs().max())


# Three models, each saved with save_pretrained and loaded sharded over 2 ranks:
#   even:  make_model's untied Llama, hidden 32: every weight's dim 0 splits evenly (half the parameters each)
#   tied:  lm_head tied to embed_tokens (saved once), hidden 35 / intermediate 45, so norms, o_proj, the MLP
#          split 18/17 and 23/22 rows; saved in bf16 across several files with model.safetensors.index.json
#   empty: hidden 1, so every [1] norm and [1, in] o_proj / down_proj lives on rank 0 and rank 1's shard is empty
#   broken: `even` without model.norm.weight: loading must fail, naming it
@pytest.fixture(scope="module")
def run(tmp_path_factory):
    models, out = tmp_path_factory.mktemp("models"), tmp_path_factory.mktemp("out")
    tokenizer = make_tokenizer()
    folders = {"even": (make_model(tokenizer, hidden=32, layers=2, seed=0), {}),
               "tied": (llama(tokenizer, 1, hidden_size=35, intermediate_size=45, num_hidden_layers=3,
                              num_attention_heads=5, num_key_value_heads=1, head_dim=8, tie_word_embeddings=True)
                        .to(torch.bfloat16), {"max_shard_size": "20KB"}),
               "empty": (llama(tokenizer, 2, hidden_size=1, intermediate_size=3, num_hidden_layers=2,
                               num_attention_heads=1, num_key_value_heads=1, head_dim=2,
                               tie_word_embeddings=False), {})}
    for name, (model, kwargs) in folders.items():
        model.save_pretrained(models / name, **kwargs)
        tokenizer.save_pretrained(models / name)
    assert len(list((models / "tied").glob("model-*.safetensors"))) > 1      # loading reads through the index
    broken = models / "broken"
    model, _ = folders["even"]
    model.save_pretrained(broken)
    tokenizer.save_pretrained(broken)
    state = load_file(broken / "model.safetensors")
    del state["model.norm.weight"]
    save_file(state, broken / "model.safetensors", metadata={"format": "pt"})
    torchrun(str(models), str(out))
    return models, out


def test_chunk_bounds_cut_like_torch_chunk():
    for n in range(12):
        for parts in range(1, 6):
            chunks = list(torch.arange(n).chunk(parts)) if n else []
            expected = [(int(c[0]), int(c[-1]) + 1) for c in chunks] + [(n, n)] * (parts - len(chunks))
            assert [parallel.chunk_bounds(n, r, parts) for r in range(parts)] == expected, (n, parts)


def test_each_rank_holds_its_share(run):
    _, out = run
    for name in ("even", "tied", "empty"):
        ranks = [json.loads((out / name / f"rank{r}.json").read_text()) for r in range(2)]
        assert all(r["all_dtensors"] for r in ranks), name
        assert ranks[0]["total"] == ranks[1]["total"]
        assert ranks[0]["local"] + ranks[1]["local"] == ranks[0]["total"], name        # nothing held twice
        if name == "even":
            assert all(0.4 <= r["local"] / r["total"] <= 0.6 for r in ranks), ranks
    tied = [json.loads((out / "tied" / f"rank{r}.json").read_text()) for r in range(2)]
    assert all(r["tied"] for r in tied)                              # one Parameter, not two copies
    assert [r["local_rows"]["model.norm.weight"] for r in tied] == [18, 17]
    assert [r["local_rows"]["model.layers.0.mlp.up_proj.weight"] for r in tied] == [23, 22]
    empty = [json.loads((out / "empty" / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["local_rows"]["model.layers.1.self_attn.o_proj.weight"] for r in empty] == [1, 0]


def test_gathered_weights_equal_the_checkpoint(run):
    models, out = run
    for name in ("even", "tied", "empty"):
        original = checkpoint(models / name)
        gathered = load_file(out / name / "gathered.safetensors")
        if name == "tied":                                           # the checkpoint holds the pair once
            assert "lm_head.weight" not in original
            original["lm_head.weight"] = original["model.embed_tokens.weight"]
        params = {k: v for k, v in gathered.items() if "rotary_emb" not in k}
        assert params.keys() == original.keys(), name
        for k in original:
            assert params[k].dtype == torch.float32 and torch.equal(params[k], original[k]), (name, k)
        # the rotary frequencies, not in any checkpoint, recomputed as one process has them
        single, _ = load_model(models / name, "cpu")
        for k, b in single.named_buffers():
            assert torch.equal(gathered[k], b), (name, k)


def test_sharded_forward_matches_one_process(run):
    models, out = run
    for name in ("even", "tied", "empty"):
        single, _ = load_model(models / name, "cpu")
        ids, mask = inputs(single.config.vocab_size)
        with torch.no_grad():
            expected = single(input_ids=ids, attention_mask=mask).logits                    # [2, 9, V]
            prefix = single(input_ids=ids[:, :-1], attention_mask=mask[:, :-1], use_cache=True)
            kv = "cache" if "cache" in inspect.signature(single.forward).parameters else "past_key_values"
            step = single(input_ids=ids[:, -1:], attention_mask=mask, **{kv: prefix.past_key_values}).logits
            generated = single.generate(ids[:1, :5], attention_mask=mask[:1, :5], max_new_tokens=6, do_sample=False,
                                        pad_token_id=single.config.pad_token_id)
        for r in range(2):                          # every rank ran the same input through the same model
            got = load_file(out / name / f"rank{r}.safetensors")
            assert got["logits"].shape == expected.shape
            assert max_relative(got["logits"], expected) <= 1e-5, (name, r)
            # a forward continuing from the KV cache, and greedy generate, through the sharded model
            assert max_relative(got["step"], step) <= 1e-5, (name, r)
            assert torch.equal(got["generated"], generated), (name, r)


def test_streamed_save_loads_with_from_pretrained(run):
    from transformers import AutoModelForCausalLM
    models, out = run
    for name in ("even", "tied", "empty"):
        original = checkpoint(models / name)
        for saved in ("saved", "saved_small"):
            folder = out / name / saved
            files = sorted(f.name for f in folder.glob("*.safetensors"))
            if saved == "saved":                    # small models: one file, as save_pretrained writes it
                assert files == ["model.safetensors"]
            else:                                   # at most 1 kB per file: several, and the index names them all
                index = json.loads((folder / "model.safetensors.index.json").read_text())
                assert len(files) > 1 and sorted(set(index["weight_map"].values())) == files
                assert index["weight_map"].keys() == checkpoint(folder).keys()
            assert json.loads((folder / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
            model = AutoModelForCausalLM.from_pretrained(folder, use_safetensors=True)
            assert type(model).__name__ == "LlamaForCausalLM"
            assert checkpoint(folder).keys() == original.keys(), (name, saved)           # tied: written once
            state = model.state_dict()
            for k in original:
                assert torch.equal(state[k].float(), original[k]), (name, saved, k)
            if name == "tied":
                assert model.lm_head.weight is model.model.embed_tokens.weight
            assert (folder / "tokenizer.json").is_file() == (saved == "saved")    # save_model adds it


def test_streamed_save_of_a_model_trained_with_fsdp(run):
    """save_model on a model that wrap sharded for training (--parallel fsdp) writes what full_state_dict
    gathers, and training moved the weights (so the comparison is not with the untrained model)."""
    from transformers import AutoModelForCausalLM
    models, out = run
    full = load_file(out / "trained" / "full.safetensors")
    state = AutoModelForCausalLM.from_pretrained(out / "trained" / "saved", use_safetensors=True).state_dict()
    assert full.keys() == state.keys()
    assert all(torch.equal(state[k], full[k]) for k in full)
    original = checkpoint(models / "even")
    assert not torch.equal(full["model.layers.0.mlp.up_proj.weight"], original["model.layers.0.mlp.up_proj.weight"])


def test_missing_weight_is_an_error(run):
    _, out = run
    assert "model.norm.weight" in (out / "broken" / "error.txt").read_text()


def test_peak_memory_per_rank(tmp_path):
    """Each rank's memory for a ~400 MB float32 model (printed with -s): each rank holds about half the weights
    (at most 0.6 of them), and the streamed save (64 MB files) raises no rank's peak RSS by half the model."""
    from transformers import LlamaConfig, LlamaForCausalLM
    t0 = time.time()
    tokenizer = make_tokenizer()
    config = LlamaConfig(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=8,
                         num_attention_heads=12, num_key_value_heads=4, tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "model")                # ~99 M parameters, 397 MB
    tokenizer.save_pretrained(tmp_path / "model")
    if time.time() - t0 > 30:
        pytest.skip("building the model took too long here")
    result = torchrun(str(tmp_path / "model"), str(tmp_path / "out"), "--rss", timeout=300)
    print("\n" + result.stdout.strip())
    assert (tmp_path / "out" / "saved" / "model.safetensors").is_file()
    lines = [line for line in result.stdout.splitlines() if line.startswith("rank ")]
    assert len(lines) == 2
    for line in lines:
        mb = {key: float(v) for key, v in re.findall(r"(weights|my shards|load_sharded|64 MB files) (\d+) MB", line)}
        assert mb["my shards"] <= 0.6 * mb["weights"], line
        assert mb["64 MB files"] - mb["load_sharded"] < 0.5 * mb["weights"], line


def test_a_lora_checkpoint_loads_trains_and_saves_sharded(tmp_path):
    """A LoRA checkpoint on a sharded base: adapters loaded into their shards (B nonzero, so they matter), the
    logits equal one process's with adapters on and the base's with them off, two DPO steps continuing the
    adapters give one process's losses, and the adapters saved from 2 processes load and equal them. Fresh
    adapters added while loading sharded start where one process's do (rows cut on each rank from the same A,
    against LoRALinear's own initialisation), and differ from the base checkpoint's seed-0 ones."""
    import lora
    tokenizer = make_tokenizer()
    base = make_model(tokenizer, hidden=32, layers=2, seed=0)
    base.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    lora.add_lora(base, ("q_proj", "v_proj", "down_proj"), rank=4, alpha=8)
    with torch.no_grad():
        for _, m in lora.lora_modules(base):
            m.lora_B.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
    lora.save_adapters(base, tmp_path / "adapters", {"base_model": str(tmp_path / "base")})
    tokenizer.save_pretrained(tmp_path / "adapters")
    worker = ROOT / "tests" / "helpers" / "sharded_lora_worker.py"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run([sys.executable, str(worker), str(tmp_path), str(tmp_path / "one")], cwd=ROOT, env=env,
                   check=True, capture_output=True, timeout=300)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                    str(worker), str(tmp_path), str(tmp_path / "two")], cwd=ROOT, env=env, check=True,
                   capture_output=True, timeout=300)
    one, two = load_file(tmp_path / "one" / "logits.safetensors"), load_file(tmp_path / "two" / "logits.safetensors")
    assert max_relative(two["on"], one["on"]) <= 1e-5 and max_relative(two["off"], one["off"]) <= 1e-5
    assert not torch.allclose(one["on"], one["off"], atol=1e-3)        # the adapters change the logits
    base_logits = make_model(tokenizer, hidden=32, layers=2, seed=0)(torch.randint(
        3, len(tokenizer), (2, 9), generator=torch.Generator().manual_seed(0))).logits.reshape(18, -1)
    assert max_relative(one["off"], base_logits.detach()) <= 1e-5      # adapters off = the base model
    r1, r2 = (json.loads((tmp_path / d / "result.json").read_text()) for d in ("one", "two"))
    assert len(r1["losses"]) == 2 and r2["losses"] == pytest.approx(r1["losses"], rel=1e-5)
    assert r2["adapter_local"] / r2["adapter_total"] == pytest.approx(0.5, abs=0.1)
    a, b = load_file(tmp_path / "one" / "saved" / "adapter_model.safetensors"), \
        load_file(tmp_path / "two" / "saved" / "adapter_model.safetensors")
    assert a.keys() == b.keys() == load_file(tmp_path / "adapters" / "adapter_model.safetensors").keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5), k
    fresh1, fresh2 = (load_file(tmp_path / d / "fresh" / "adapter_model.safetensors") for d in ("one", "two"))
    assert fresh1.keys() == fresh2.keys() == a.keys()
    for k in fresh1:
        assert torch.equal(fresh1[k], fresh2[k]), k
        if k.endswith("lora_B"):
            assert not fresh1[k].any(), k                                   # B = 0: the model starts as its base
    seed0 = load_file(tmp_path / "adapters" / "adapter_model.safetensors")
    assert not torch.equal(fresh1["model.layers.0.self_attn.q_proj.lora_A"],
                           seed0["model.layers.0.self_attn.q_proj.lora_A"])  # seed 7 is not seed 0
