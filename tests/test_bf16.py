"""--dtype bfloat16: weights loaded in the run's dtype with float32 buffers, float32 master weights for full
fine-tuning (one process and FSDP), the LM head in float32 when scoring, a whole run on CPU in bf16, and the
perplexity pick's agreement between ways of batching (bench/agreement.py). Tiny models only: this CPU runs bf16
matrix products 10-100x slower than float32."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import flags
import lora
import macpo
import parallel
import train
from generate import ScoredLM, packed_logps, sequence_logps
from tiny import SMOKE, encode, make_model, run_or_show


def test_dtype_flag_accepts_auto_float32_bfloat16_and_refuses_the_rest():
    for dtype in ("auto", "float32", "bfloat16"):
        assert not [p for p in flags.validate(macpo.Config(dtype=dtype), macpo.METHODS) if "--dtype" in p]
    for dtype in ("float16", "bf16", ""):
        problems = [p for p in flags.validate(macpo.Config(dtype=dtype), macpo.METHODS) if "--dtype" in p]
        assert len(problems) == 1 and "auto, float32, bfloat16" in problems[0], problems
    assert "loss scaling" in flags.validate(macpo.Config(dtype="float16"), macpo.METHODS)[0]
    with pytest.raises(SystemExit):
        macpo.parse_config(["--dtype", "half"])
    assert parallel.dtype_for("cpu") == torch.float32 and parallel.dtype_for("cuda:1") == torch.bfloat16
    assert parallel.dtype_for("cpu", "bfloat16") == torch.bfloat16 and parallel.dtype_for("cuda", "float32") == torch.float32


@pytest.fixture()
def saved(tokenizer, tmp_path):
    """A tiny float32 Llama saved with save_pretrained -> (folder, the model)."""
    model = make_model(tokenizer, hidden=32, layers=2)
    model.save_pretrained(tmp_path / "fp32")
    tokenizer.save_pretrained(tmp_path / "fp32")
    return tmp_path / "fp32", model


def test_load_model_builds_weights_in_the_dtype_and_keeps_rotary_buffers_float32(saved, tokenizer):
    from transformers import AutoModelForCausalLM
    folder, original = saved
    model, _ = train.load_model(str(folder), "cpu", dtype="bfloat16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    # model.to(bf16) would have cast these too: inv_freq off by up to 2^-9 of itself turns late positions' angles
    assert {b.dtype for b in model.buffers()} == {torch.float32}
    for name, p in model.named_parameters():
        assert torch.equal(p, original.get_parameter(name).to(torch.bfloat16)), name
    ids = torch.tensor([encode(tokenizer, "USER: What is 12 + 30? ASSISTANT:", "12 + 30 = 42.", 64)[0]])
    reference = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)
    auto, _ = train.load_model(str(folder), "cpu")                      # auto on CPU: float32, the saved weights
    assert all(torch.equal(p, original.get_parameter(n)) for n, p in auto.named_parameters())
    # fresh LoRA adapters on a bf16 base are float32
    adapted, _ = train.load_model(str(folder), "cpu", new_lora=(("q_proj", "v_proj"), 4, 8, 0.0, 0), dtype="bfloat16")
    assert {p.dtype for p in adapted.parameters() if p.requires_grad} == {torch.float32}
    # a bf16 checkpoint loaded as float32 is the exact upcast
    model.save_pretrained(folder.parent / "bf16")
    tokenizer.save_pretrained(folder.parent / "bf16")
    up, _ = train.load_model(str(folder.parent / "bf16"), "cpu", dtype="float32")
    assert all(p.dtype == torch.float32 and torch.equal(p, model.get_parameter(n).float()) for n, p in up.named_parameters())


def test_master_weights_take_the_small_steps_plain_bf16_adamw_rounds_away():
    """20 AdamW steps at lr 1e-5 on bf16 weights in [0.01, 0.03] with a fixed gradient: with master weights the
    model's weights are float32 AdamW's trajectory (run here on a float32 copy) rounded to bf16, each step;
    plain bf16 AdamW leaves every weight where it was (each update is below half a bf16 step: 2^-9 |w| >= 2e-5)."""
    g = torch.Generator().manual_seed(0)
    w = (0.01 + 0.02 * torch.rand(64, 16, generator=g)).to(torch.bfloat16)
    grad = torch.randn(64, 16, generator=g).to(torch.bfloat16)
    ours = torch.nn.Parameter(w.clone())
    master = train.MasterWeights([ours])
    opt = torch.optim.AdamW(master.masters, lr=1e-5, weight_decay=0.0)
    reference = torch.nn.Parameter(w.float())
    reference_opt = torch.optim.AdamW([reference], lr=1e-5, weight_decay=0.0)
    plain = torch.nn.Parameter(w.clone())
    plain_opt = torch.optim.AdamW([plain], lr=1e-5, weight_decay=0.0)
    for _ in range(20):
        ours.grad, reference.grad, plain.grad = grad.clone(), grad.float(), grad.clone()
        master.accumulate()
        assert ours.grad is None and master.masters[0].grad.dtype == torch.float32
        opt.step()
        master.write_back()
        reference_opt.step()
        plain_opt.step()
        opt.zero_grad(set_to_none=True)
        assert torch.equal(master.masters[0], reference.detach())
        assert torch.equal(ours.detach(), reference.detach().to(torch.bfloat16))
    assert ours.dtype == torch.bfloat16 and master.masters[0].dtype == torch.float32
    assert torch.equal(plain.detach(), w)                                # every update lost
    assert (ours.detach() != w).float().mean() > 0.9                    # ~20 x 1e-5 moved past the rounding
    # float32 parameters are their own masters
    p = torch.nn.Parameter(torch.ones(3))
    assert train.MasterWeights([p]).masters[0] is p


def test_master_weights_sum_micro_batch_gradients_in_float32():
    p = torch.nn.Parameter(torch.ones(4, dtype=torch.bfloat16))
    master = train.MasterWeights([p])
    parts = [torch.tensor([1.0, 2 ** -9, 3.0, -1.0]), torch.tensor([2 ** -9, 2 ** -9, 0.0, 1.0])]
    for part in parts:
        p.grad = part.to(torch.bfloat16)
        master.accumulate()
    # 1 + 2^-9 is not a bf16 number (8 significant bits): a bf16 sum would have lost the second part
    assert torch.equal(master.masters[0].grad, sum(x.to(torch.bfloat16).float() for x in parts))
    assert master.masters[0].grad[0] == 1.0 + 2 ** -9


def _sft_rows():
    return [(f"USER: What is {a} + {b}? ASSISTANT:", f"{a} + {b} = {a + b}.", None)
            for a, b in [(12, 30), (47, 38), (21, 9), (66, 11), (50, 50), (13, 87), (31, 4), (72, 19)]]


def _train_update(model, tokenizer, lr, steps):
    """The weights' change after `steps` SFT steps of train.train (batch 2, constant order) -> {name: float32 delta}."""
    before = {n: p.detach().float().clone() for n, p in model.named_parameters()}
    rows = _sft_rows() * (2 * steps // len(_sft_rows()))
    train.train(model, tokenizer, rows, train.TrainSettings(kind="sft", lr=lr, batch_size=2, max_length=64,
                                                            progress=False, log_every=10 ** 6, length_window=1))
    return {n: p.detach().float() - before[n] for n, p in model.named_parameters()}


def _relative_distance(a, b):
    diff = sum(float((a[n] - b[n]).pow(2).sum()) for n in a)
    return math.sqrt(diff / sum(float(b[n].pow(2).sum()) for n in b))


def test_bf16_full_fine_tuning_at_a_small_lr_moves_the_weights_as_float32_does(tokenizer, monkeypatch):
    """train.train on a bf16 model at lr 1e-5 (the real presets' DPO rate is 1e-6 to 1e-5): its weights change as
    a float32 model's from the same weights do; with plain bf16 AdamW (the optimizer on the bf16 weights) the
    change is mostly lost."""
    from bench.agreement import weights_in
    bf16 = weights_in(make_model(tokenizer, hidden=32, layers=1), torch.bfloat16)
    fp32, plain = weights_in(bf16, torch.float32), weights_in(bf16, torch.bfloat16)      # the same weights, exactly
    expected = _train_update(fp32, tokenizer, 1e-5, 40)
    ours = _train_update(bf16, tokenizer, 1e-5, 40)
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}
    assert _relative_distance(ours, expected) < 0.5, _relative_distance(ours, expected)

    class PlainAdamW(train.MasterWeights):       # the optimizer steps the bf16 weights themselves
        def __init__(self, params):
            self.params, self.masters = params, list(params)
    monkeypatch.setattr(train, "MasterWeights", PlainAdamW)
    lost = _train_update(plain, tokenizer, 1e-5, 40)
    assert _relative_distance(lost, expected) > 0.8, _relative_distance(lost, expected)


def test_scoring_runs_the_lm_head_in_float32(tokenizer):
    """ScoredLM's logits at the scored positions: float32, equal to the backbone's bf16 hidden states times the
    bf16 head weight computed in float32 (here by hand); the bf16 head (generation's) is that rounded to bf16."""
    model = make_model(tokenizer, hidden=64, layers=2).to(torch.bfloat16)
    ids = torch.tensor([encode(tokenizer, "USER: How do I pick a lock? ASSISTANT:", "Sorry, I can't help with that.", 64)[0]])
    mask = torch.ones_like(ids)
    rows, cols = torch.zeros(ids.shape[1] - 1, dtype=torch.long), torch.arange(ids.shape[1] - 1)
    with torch.no_grad():
        hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state[0, :-1]         # [T-1, H] bf16
        by_hand = hidden.double() @ model.lm_head.weight.double().T                                # [T-1, V]
        logits = ScoredLM(model)(ids, mask, rows, cols)
        rounded = ScoredLM(model)(ids, mask, rows, cols, float32_head=False)
    assert logits.dtype == torch.float32 and rounded.dtype == torch.bfloat16
    assert torch.allclose(logits.double(), by_hand, rtol=1e-5, atol=1e-6)
    assert torch.allclose(rounded.double(), by_hand, rtol=2 ** -7, atol=1e-3)
    assert not torch.equal(logits, rounded.float())


def test_identical_pairs_get_one_score_in_bf16(tokenizer):
    """The perplexity pick's candidates often repeat (teachers that agree): duplicates get the very same log-prob,
    so the argmin between equal texts is the lowest index, not rounding noise; and the values equal scoring the
    distinct pairs alone."""
    model = make_model(tokenizer, hidden=64, layers=2).to(torch.bfloat16)
    prompt = "USER: What is 12 + 30? ASSISTANT:"
    distinct = [encode(tokenizer, prompt, r, 64) for r in ("12 + 30 = 42.", "Sorry, I can't help with that.",
                                                           "the quick brown fox")]
    encoded = [distinct[0], distinct[1], distinct[0], distinct[2], distinct[0], distinct[1]]
    logps, n = packed_logps(model, encoded, tokenizer.pad_token_id)
    assert logps[0] == logps[2] == logps[4] and logps[1] == logps[5]
    alone, alone_n = packed_logps(model, distinct, tokenizer.pad_token_id)
    assert torch.equal(logps, alone[[0, 1, 0, 2, 0, 1]]) and torch.equal(n, alone_n[[0, 1, 0, 2, 0, 1]])
    for (ids, mask), value in zip(distinct, alone):        # and each is its one-pair forward pass, to bf16 accuracy
        with torch.no_grad():
            lp, _ = sequence_logps(model, torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long),
                                   torch.tensor([mask]))
        assert abs(float(lp[0]) - float(value)) < 0.02 * sum(mask)


# ---------------------------------------------------------------------------------------------------------
# The perplexity pick in bf16 (bench/agreement.py).

@pytest.fixture(scope="module")
def agreement():
    """pick_agreement on 32 toy prompts x 4 candidates under a random 64x2 Llama whose weights are drawn with std
    0.1 (5x the usual 0.02), so that its predictions are far from uniform and most prompts have a clear best
    candidate, as under a trained student (pre-training one here would take minutes)."""
    import toy
    from transformers import LlamaConfig, LlamaForCausalLM

    from bench.agreement import pick_agreement, toy_prompts_and_candidates
    tokenizer = toy.train_tokenizer(toy.tokenizer_texts(toy.pretraining_corpus("0-tokenizer", 1000)))
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=128, tie_word_embeddings=False,
                                         initializer_range=0.1, pad_token_id=tokenizer.pad_token_id)).eval()
    prompts, candidates = toy_prompts_and_candidates(32, 4)
    return pick_agreement(model, tokenizer, prompts, candidates, batch_size=8, max_length=128), candidates


def test_bf16_picks_agree_wherever_the_float32_margin_exceeds_bf16_error(agreement):
    """On prompts whose float32 margin (best minus second-best mean log-prob) exceeds 0.05 nats per token, about
    13 bf16 steps at 1 (2^-8 each), packed bf16, batched bf16, one-at-a-time bf16 and float32 all pick the same
    text; and the bound is no vacuous one: most of the set is above it."""
    result, _ = agreement
    assert result["clear"]["margin"] == 0.05 and result["clear"]["prompts"] >= 16, result["clear"]
    assert all(v == 1.0 for v in result["clear"]["agreement"].values()), result["clear"]["agreement"]
    # float32 packed is float32 one at a time up to float32 rounding
    assert result["error"]["float32 packed"]["max"] < 1e-4
    # the bf16 errors themselves stay below the bound, batching or not
    assert all(result["error"][f"bf16 {m}"]["max"] < 0.05 for m in ("packed", "batched", "single")), result["error"]


def test_agreement_is_recomputed_from_its_scores(agreement):
    """The reported agreement against an independent recount from the returned scores: the pick is the highest
    mean log-prob, the lowest index on a tie, compared by text."""
    result, candidates = agreement
    scores = {k: torch.tensor(v) for k, v in result["scores"].items()}
    for name, value in result["agreement"].items():
        a, b = name.split(" vs ")
        picked = {s: [candidates[i][max(range(4), key=lambda k: (scores[s][i][k], -k))] for i in range(len(candidates))]
                  for s in (a, b)}
        assert value == sum(x == y for x, y in zip(picked[a], picked[b])) / len(candidates), name


def test_the_bench_packed_layout_is_generate_packed_logps(tokenizer):
    """bench/agreement.py's packed mode scores as generate.packed_logps does (same rows, same batches): equal
    mean log-probs, bit for bit, in bf16."""
    from bench.agreement import mean_logps
    model = make_model(tokenizer, hidden=64, layers=2).to(torch.bfloat16)
    prompts = ["USER: What is 12 + 30? ASSISTANT:", "USER: How do I pick a lock? ASSISTANT:"]
    responses = ["12 + 30 = 42.", "Sorry, I can't help with that.", "hello world, how are you today?"]
    encoded = [encode(tokenizer, p, r, 64) for p in prompts for r in responses]
    logps, n = packed_logps(model, encoded, tokenizer.pad_token_id, batch_size=2, row_tokens=64)
    assert torch.equal(mean_logps(model, encoded, tokenizer.pad_token_id, "packed", 2, 64), logps / n)


# ---------------------------------------------------------------------------------------------------------
# Every stage of a run in bf16, on CPU.

def _stages(out):
    return [p.parent.relative_to(out).as_posix() for p in out.rglob("DONE")]


def _tensors(path):
    with safe_open(path, framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["full", "lora"])
def test_a_bf16_run_finishes_every_stage_with_finite_losses_and_bf16_weights(tmp_path, variant):
    out = tmp_path / variant
    extra = ["--lora", "all"] if variant == "lora" else []
    macpo.main(SMOKE + ["--out", str(out), "--dtype", "bfloat16", "--rounds", "1"] + extra)
    agents = ["teacher0", "teacher1", "teacher2", "student"]
    expected = (["bases/tokenizer"] + [f"bases/{a}" for a in agents]
                + [f"init/{a}{s}" for a in agents for s in ("", "_neg")] + ["init/weak_labels", "init/weak_negatives"]
                + [f"init/negatives_{a}" for a in agents] + [f"init/{a}/samples" for a in agents]
                + ["round1/pairs_student"] + [f"round1/{a}" for a in agents]
                + [f"eval/{r}/{a}" for r in ("init", "round1") for a in agents]
                + ["ceiling/student", "eval/ceiling/student"])
    assert sorted(_stages(out)) == sorted(expected)
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    results = json.loads((out / "results.json").read_text())["results"]
    assert list(results) == ["init", "round1", "ceiling"]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    trained = {f"init/{a}{s}" for a in agents for s in ("", "_neg")} | {f"round1/{a}" for a in agents} | {"ceiling/student"}
    assert {r["stage"] for r in rows} >= trained
    assert all(math.isfinite(v) for r in rows for v in r.values() if isinstance(v, float))
    for a in agents:
        first = next(r for r in rows if r["stage"] == f"round1/{a}")
        # the reference is the policy before its update, scored packed in bf16 with the float32 head: ln 2 up to
        # the bf16 difference between two batch layouts
        assert first["step"] == 1 and abs(first["dpo"] - math.log(2)) < 0.005, (a, first)
    for stage in [s for s in expected if s in trained]:
        folder = out / stage
        if variant == "lora":
            adapters = _tensors(folder / lora.WEIGHTS_NAME)
            assert adapters and {t.dtype for t in adapters.values()} == {torch.float32}, stage
            assert not (folder / "model.safetensors").exists()
        else:
            weights = _tensors(folder / "model.safetensors")
            assert {t.dtype for t in weights.values()} == {torch.bfloat16}, stage
            config = json.loads((folder / "config.json").read_text())
            assert config.get("dtype", config.get("torch_dtype")) == "bfloat16", stage   # torch_dtype before 4.56
    # the toy bases are pre-trained in float32 (cached and shared like released models) and loaded in bf16
    assert {t.dtype for t in _tensors(out / "bases" / "student" / "model.safetensors").values()} == {torch.float32}
    if variant == "full":       # anyone's from_pretrained reads the bf16 checkpoint (in its own default dtype)
        from transformers import AutoModelForCausalLM
        student = AutoModelForCausalLM.from_pretrained(out / "round1" / "student")
        saved = _tensors(out / "round1" / "student" / "model.safetensors")
        state = student.state_dict()
        assert all(torch.equal(state[k], v.to(state[k].dtype)) for k, v in saved.items())


@pytest.mark.slow
def test_bf16_training_under_fsdp_matches_one_process(tmp_path, tokenizer):
    """Two processes (torchrun, FSDP on gloo): bf16 full fine-tuning with float32 master weights sharded like
    the weights, and float32 LoRA adapters on a sharded bf16 base, end where one process does (up to the bf16
    rounding of gradients reduced across ranks), and save bf16 weights / float32 adapters."""
    model = make_model(tokenizer, hidden=32, layers=2)
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    worker = Path(__file__).resolve().parent / "helpers" / "bf16_fsdp_worker.py"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run([sys.executable, str(worker), str(tmp_path / "model"), str(tmp_path / "one")], env=env,
                   check=True, capture_output=True, timeout=300)
    run_or_show([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                 str(worker), str(tmp_path / "model"), str(tmp_path / "two")], env=env, timeout=300)
    base = {k: v.to(torch.bfloat16) for k, v in _tensors(tmp_path / "model" / "model.safetensors").items()}
    one, two = _tensors(tmp_path / "one" / "full" / "model.safetensors"), _tensors(tmp_path / "two" / "full" / "model.safetensors")
    assert one.keys() == two.keys() == base.keys()
    assert {t.dtype for t in one.values()} == {t.dtype for t in two.values()} == {torch.bfloat16}
    moved = sum(int((one[k] != base[k]).sum()) for k in one) / sum(t.numel() for t in one.values())
    assert moved > 0.5, moved                                   # 4 steps of ~1e-4 crossed bf16's rounding
    # the two runs' updates: the same up to a bf16 step here and there (AdamW turns a gradient of either sign near
    # 0 into +-lr, and two ranks reduce bf16 gradients in another order than one process sums them)
    update_one = {k: one[k].float() - base[k].float() for k in one}
    update_two = {k: two[k].float() - base[k].float() for k in one}
    assert _relative_distance(update_two, update_one) < 0.1, _relative_distance(update_two, update_one)
    assert sum(int((one[k] != two[k]).sum()) for k in one) / sum(t.numel() for t in one.values()) < 0.01
    one, two = (_tensors(tmp_path / d / "lora" / lora.WEIGHTS_NAME) for d in ("one", "two"))
    assert one.keys() == two.keys() and {t.dtype for t in one.values()} == {t.dtype for t in two.values()} == {torch.float32}
    assert any(k.endswith("lora_B") and t.abs().max() > 0 for k, t in one.items())     # the adapters trained
    for k in one:
        assert torch.allclose(one[k], two[k], rtol=1e-2, atol=1e-5), k
