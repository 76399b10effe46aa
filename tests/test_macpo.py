"""End to end: the whole MACPO pipeline on the toy task at a very small size, resume after a kill, and the
algorithm's choices recomputed independently."""
import json
import math
import os
import signal
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest
import torch

import macpo
from tiny import SMALL, SMOKE

ROOT = Path(__file__).resolve().parents[1]
ROUNDS = ["round1", "round2", "round3"]
AGENTS = ["teacher0", "teacher1", "teacher2", "student"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("smoke") / "run"
    macpo.main(SMOKE + ["--out", str(out)])
    return out


def start_of(r):
    """The folder of the checkpoints round r starts from: round1 -> init, round2 -> round1."""
    return "init" if r == "round1" else f"round{int(r[5:]) - 1}"


def expected_stages():
    names = ["bases/tokenizer"] + [f"bases/{a}" for a in AGENTS]
    names += [f"init/teacher{k}{s}" for k in range(3) for s in ("", "_neg")]
    names += ["init/weak_labels", "init/student", "init/weak_negatives", "init/student_neg"]
    names += [f"init/negatives_{a}" for a in AGENTS] + [f"eval/init/{a}" for a in AGENTS]
    for r in ROUNDS:
        # each round samples the agents it starts from; the samples sit beside their checkpoint
        names += [f"{start_of(r)}/{a}/samples" for a in AGENTS] + [f"{r}/pairs_student"]
        names += [f"{r}/{a}" for a in AGENTS] + [f"eval/{r}/{a}" for a in AGENTS]
    return names + ["ceiling/student", "eval/ceiling/student"]


def test_every_stage_ran_and_wrote_its_files(run_dir):
    for name in expected_stages():
        assert (run_dir / name / "DONE").exists(), name
    assert not list(run_dir.rglob("*.partial")) and not list(run_dir.rglob("*.tmp"))
    for r in ["init"] + ROUNDS:
        for a in AGENTS:
            # checkpoints anyone can load: save_pretrained with safetensors
            ckpt = run_dir / ("init" if r == "init" else r) / a
            assert (ckpt / "model.safetensors").exists() and (ckpt / "config.json").exists()
    results = json.loads((run_dir / "results.json").read_text())["results"]
    assert list(results) == ["init"] + ROUNDS + ["ceiling"]
    assert all(0.0 <= v <= 1.0 for row in results.values() for v in row.values())
    config = json.loads((run_dir / "config.json").read_text())
    assert config["n_w2s"] == 32 and config["out"] == str(run_dir)
    n_pairs = [len((run_dir / r / f"teacher{k}" / "pairs.jsonl").read_text().splitlines())
               for r in ROUNDS for k in range(3)]
    assert n_pairs == [32] * 9


def test_losses_finite_and_first_dpo_step_is_ln2(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows and all(math.isfinite(r["loss"]) for r in rows)
    for a in AGENTS:
        first = next(r for r in rows if r["stage"] == f"round1/{a}")
        assert first["step"] == 1
        # the reference is the policy at the round's start (--reference previous): DPO loss = ln 2 exactly
        assert first["dpo"] == pytest.approx(math.log(2), abs=1e-4), a
        assert first["loss"] == pytest.approx(first["dpo"] + 0.2 * first["sft"], abs=1e-4)


def hand_perplexity(model, tokenizer, prompt, response):
    """Independent of generate.perplexity: one unpadded sequence, full log_softmax, mean NLL of the response."""
    p = tokenizer(prompt)["input_ids"]
    r = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([p + r])).logits[0].double(), -1)
    nll = -sum(logp[len(p) + j - 1, tok].item() for j, tok in enumerate(r))
    return math.exp(nll / len(r))


def test_selected_positive_is_the_argmin_perplexity_teacher_response(run_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    for r in ("round1", "round2"):
        rows = [json.loads(line) for line in (run_dir / r / "pairs_student" / "pairs.jsonl").read_text().splitlines()]
        pairs = [json.loads(line) for line in (run_dir / r / "student" / "pairs.jsonl").read_text().splitlines()]
        scorer = run_dir / rows[0]["scored_by"]
        assert rows[0]["scored_by"] == ("init/student" if r == "round1" else "round1/student")
        model, tokenizer = AutoModelForCausalLM.from_pretrained(scorer).eval(), AutoTokenizer.from_pretrained(scorer)
        teacher = {k: [json.loads(line)["response"] for line in
                       (run_dir / start_of(r) / f"teacher{k}" / "samples" / "generations.jsonl").read_text().splitlines()]
                   for k in range(3)}
        negatives = [json.loads(line)["response"] for line in
                     (run_dir / "init" / "negatives_student" / "generations.jsonl").read_text().splitlines()]
        for row in rows[:12]:
            prompt = f"USER: {row['prompt'][-1]['content']} ASSISTANT:"
            ppl = {f"teacher{k}": hand_perplexity(model, tokenizer, prompt, teacher[k][row["i"]]) for k in range(3)}
            for k, v in ppl.items():
                assert row["perplexities"][k] == pytest.approx(v, rel=1e-4)
            best = min(ppl, key=ppl.get)
            if sorted(ppl.values())[1] - ppl[best] > 1e-6 * ppl[best]:       # skip exact ties
                assert row["chosen_by"] == best
            assert row["chosen"] == teacher[int(row["chosen_by"][-1])][row["i"]]
            # the pair it trained on: the pick against the hard negative, reused every round
            trained = pairs[row["i"]]
            assert trained["chosen"] == row["chosen"] and trained["rejected"] == negatives[row["i"]]


def test_teachers_positive_is_the_students_response(run_dir):
    student = [json.loads(line)["response"] for line in
               (run_dir / "round1" / "student" / "samples" / "generations.jsonl").read_text().splitlines()]
    for k in range(3):
        rows = [json.loads(line) for line in
                (run_dir / "round2" / f"teacher{k}" / "pairs.jsonl").read_text().splitlines()]
        own_negatives = [json.loads(line)["response"] for line in
                         (run_dir / "init" / f"negatives_teacher{k}" / "generations.jsonl").read_text().splitlines()]
        assert [r["chosen"] for r in rows] == student
        assert [r["rejected"] for r in rows] == own_negatives



def test_signal_block_equals_a_rescoring_of_the_pair_files(run_dir):
    """results.json["signal"] against the pair files on disk, re-scored here with toy.reward and counted by
    hand; the negative twins and the weak labels against their generation files."""
    import toy
    res = json.loads((run_dir / "results.json").read_text())
    assert res["signal_scorer"] == "gold" and list(res["signal_by_scorer"]) == ["gold"]
    assert list(res["signal"]) == ROUNDS

    def gen(stage):
        return [json.loads(line) for line in (run_dir / stage / "generations.jsonl").read_text().splitlines()]
    for r in ROUNDS:
        assert list(res["signal"][r]) == AGENTS
        for a in AGENTS:
            rows = [json.loads(line) for line in (run_dir / r / a / "pairs.jsonl").read_text().splitlines()]
            assert len(rows) == 32
            c = [toy.reward(x["prompt"], x["chosen"]) for x in rows if x["trained"]]
            j = [toy.reward(x["prompt"], x["rejected"]) for x in rows if x["trained"]]
            assert [x["chosen_score"]["gold"] for x in rows if x["trained"]] == c     # the file keeps its scores
            assert all(x["trained"] == (x["chosen"] != x["rejected"]) for x in rows)  # --identical_pairs drop
            s, n = res["signal"][r][a], len(c)
            assert s["n"] == n and s["dropped_identical"] == 32 - n
            assert s["chosen_better"] == pytest.approx(sum(x > y for x, y in zip(c, j)) / n)
            assert s["rejected_better"] == pytest.approx(sum(x < y for x, y in zip(c, j)) / n)
            assert s["chosen_score"] == pytest.approx(sum(c) / n)
            assert s["identical"] == pytest.approx(sum(x["chosen"] == x["rejected"] for x in rows) / 32)
        # the student's selection: every teacher's response to every prompt, re-scored
        teacher = {k: gen(f"{start_of(r)}/teacher{k}/samples") for k in range(3)}
        picks = [json.loads(line) for line in (run_dir / r / "pairs_student" / "pairs.jsonl").read_text().splitlines()]
        cand = [[toy.reward(t[i]["prompt"], t[i]["response"]) for t in teacher.values()] for i in range(32)]
        s = res["signal"][r]["student"]
        assert s["oracle"] == pytest.approx(sum(map(max, cand)) / 32)
        assert s["random"] == pytest.approx(sum(sum(v) / 3 for v in cand) / 32)
        assert s["pick"] == pytest.approx(sum(cand[p["i"]][int(p["chosen_by"][-1])] for p in picks) / 32)
        assert sum(s["picked_from"].values()) == 32
        assert s["picked_from"]["teacher1"] == sum(p["chosen_by"] == "teacher1" for p in picks)
    for a in AGENTS:
        rows = gen(f"init/negatives_{a}")
        assert res["negatives"][a] == pytest.approx(sum(toy.reward(x["prompt"], x["response"]) for x in rows) / 32)
    rows = gen("init/weak_labels")
    assert res["weak_labels"] == pytest.approx(sum(toy.reward(x["prompt"], x["response"]) for x in rows) / 32)
    assert (run_dir / "signal.png").read_bytes()[:4] == b"\x89PNG"
    # per prompt kind: the student's round-2 pairs and every eval stage, grouped here by toy.kind
    rows = [json.loads(line) for line in (run_dir / "round2" / "student" / "pairs.jsonl").read_text().splitlines()]
    for k, s in res["signal"]["round2"]["student"]["by_kind"].items():
        mine = [x for x in rows if x["trained"] and toy.kind(x["prompt"]) == k]
        assert s["n"] == len(mine)
        if mine:
            assert s["chosen_score"] == pytest.approx(sum(toy.reward(x["prompt"], x["chosen"]) for x in mine) / len(mine))
    assert sum(s["n"] for s in res["signal"]["round2"]["student"]["by_kind"].values()) == res["signal"]["round2"]["student"]["n"]
    # the final student against the naive-SFT student and the weak supervisor, prompt by prompt
    final = [toy.reward(x["prompt"], x["response"]) for x in gen("eval/round3/student")]
    for against, agent in (("vs_naive_sft", "student"), ("vs_weak", "teacher0")):
        other = [toy.reward(x["prompt"], x["response"]) for x in gen(f"eval/init/{agent}")]
        w = res["win_rates"]["gold"][against]
        assert (w["win"], w["lose"], w["n"]) == (sum(a > b for a, b in zip(final, other)) / 16,
                                                 sum(a < b for a, b in zip(final, other)) / 16, 16)
    assert res["results_by_scorer"]["gold"] == res["results"]
    assert "## The final strong student's win / tie / lose" in (run_dir / "results.md").read_text()
    assert (run_dir / "results.png").read_bytes()[:4] == b"\x89PNG"
    for stage, agent in (("init", "teacher1"), ("round3", "student"), ("ceiling", "student")):
        rows = gen(f"eval/{stage}/{agent}")
        expected = {}
        for x in rows:
            expected.setdefault(toy.kind(x["prompt"]), []).append(toy.reward(x["prompt"], x["response"]))
        assert res["results_by_kind"][stage][agent] == pytest.approx({k: sum(v) / len(v) for k, v in expected.items()})


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["drop", "keep"])
def test_identical_pairs_are_dropped_or_kept(run_dir, tmp_path, mode):
    """Only identical pairs: dropped, the agent goes on unchanged (weights equal); kept, the SFT term moves it."""
    from safetensors.torch import load_file
    from stages import Run, dpo_stage
    cfg = macpo.parse_config(SMOKE + ["--out", str(tmp_path / mode), "--identical_pairs", mode])
    start = run_dir / "init" / "student"
    rows = [([{"role": "user", "content": "What is 12 + 30?"}], "12 + 30 = 42.", "12 + 30 = 42.")] * 4
    folder = dpo_stage(cfg, Run(cfg), "round1/student", start, rows, "start", use_lora=False)
    written = [json.loads(line) for line in (folder / "pairs.jsonl").read_text().splitlines()]
    assert [w["trained"] for w in written] == [mode == "keep"] * 4
    assert all(w["chosen_score"] == {"gold": 1.0} for w in written)
    before, after = load_file(start / "model.safetensors"), load_file(folder / "model.safetensors")
    same = all(torch.equal(before[k], after[k]) for k in before)
    assert same == (mode == "drop")

def snapshot(out):
    """Everything a run produced that must not depend on how it was run: results, pairs, generations, weights."""
    files = {}
    for f in sorted(out.rglob("*")):
        if f.is_file() and f.suffix in (".json", ".jsonl", ".safetensors") and f.name not in ("config.json",) \
                and "metrics" not in f.name:
            files[str(f.relative_to(out))] = f.read_bytes()
    return files


def test_second_invocation_is_a_no_op(run_dir):
    before = {str(f): f.stat().st_mtime_ns for f in run_dir.rglob("DONE")}
    results = (run_dir / "results.json").read_text()
    macpo.main(SMOKE + ["--out", str(run_dir)])
    assert {str(f): f.stat().st_mtime_ns for f in run_dir.rglob("DONE")} == before
    assert (run_dir / "results.json").read_text() == results


def test_changed_flags_on_an_existing_run_are_refused(run_dir):
    with pytest.raises(SystemExit, match="different configuration.*beta"):
        macpo.main(SMOKE + ["--out", str(run_dir), "--beta", "0.5"])


@pytest.mark.slow
def test_killed_run_resumes_to_identical_results(run_dir, tmp_path):
    out = tmp_path / "killed"
    cmd = [sys.executable, str(ROOT / "macpo.py")] + SMOKE + ["--out", str(out)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    marker = out / "round1" / "pairs_student" / "DONE"         # kill in the middle of round 1
    deadline = time.time() + 600
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "results.json").exists()
    subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    a, b = snapshot(run_dir), snapshot(out)
    assert a.keys() == b.keys()
    assert [k for k in a if a[k] != b[k]] == []


@pytest.mark.slow
def test_lora_run_trains_only_adapters_and_merges(tmp_path):
    """--lora all: every stage saves adapters only (the base is untouched), the DPO reference is the base with
    adapters off, and a merged checkpoint differs from its base exactly in the wrapped q_proj / v_proj weights."""
    from safetensors.torch import load_file
    out = tmp_path / "lora"
    macpo.main(SMOKE + ["--out", str(out), "--n_teachers", "1", "--lora", "all", "--reference", "base",
                        "--merge_lora", "--no-ceiling"])
    for stage in ("init/teacher0", "init/teacher0_neg", "init/student", "round1/student", "round1/teacher0"):
        assert (out / stage / "adapter_model.safetensors").exists() and not (out / stage / "model.safetensors").exists()
    base = load_file(out / "bases" / "student" / "model.safetensors")
    merged = load_file(out / "round1" / "student" / "merged" / "model.safetensors")
    assert base.keys() == merged.keys()
    changed = {k for k in base if not torch.equal(base[k], merged[k])}
    assert changed and all(k.endswith(("q_proj.weight", "v_proj.weight")) for k in changed), changed
    # the merged plain checkpoint equals base + adapters, loaded back through train.load_model
    from transformers import AutoModelForCausalLM
    from train import load_model
    adapted, tokenizer = load_model(str(out / "round1" / "student"))
    plain = AutoModelForCausalLM.from_pretrained(out / "round1" / "student" / "merged").eval()
    ids = torch.tensor([tokenizer("USER: What is 123 + 456? ASSISTANT:")["input_ids"]])
    with torch.no_grad():
        assert torch.allclose(adapted.eval()(ids).logits, plain(ids).logits, atol=1e-5)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["loss"]) for r in rows)


@pytest.mark.slow
def test_a_lora_run_is_a_function_of_its_flags(tmp_path, monkeypatch):
    """Two --lora all runs of one command, with torch's global generator left in different states before each,
    write the same adapters, generations and pairs byte for byte: fresh adapters start from the stage's seed
    (lora.initial_A), not from whatever the process drew before. (The global generator once decided them, and
    two runs of `bash run.sh toy` were two different runs.)"""
    def run(name, global_seed):
        torch.manual_seed(global_seed)
        torch.rand(global_seed)                                        # a different global state each time
        out = tmp_path / name
        macpo.main(SMOKE + ["--out", str(out), "--n_teachers", "1", "--lora", "all", "--no-ceiling"])
        return {k: v for k, v in snapshot(out).items() if k.endswith((".safetensors", ".jsonl"))}
    import lora
    seeds, initial_A = {}, lora.initial_A
    def recording(seed, name, rank, in_features):
        if seed != 0:                    # 0: lora.load_adapters' placeholders, overwritten by a checkpoint's
            seeds.setdefault(name, []).append(seed)
        return initial_A(seed, name, rank, in_features)
    monkeypatch.setattr(lora, "initial_A", recording)
    a, b = run("a", 1), run("b", 2)
    # each fresh stage draws its adapters from its own seed, Run.seed(stage) = crc32("{--seed}/{stage}"):
    # init/teacher0 and init/student, the two stages that add adapters, in both runs
    expected = [zlib.crc32(f"0/init/{stage}".encode()) for stage in ("teacher0", "student")] * 2
    assert seeds and all(v == expected for v in seeds.values()), seeds
    assert any(k.endswith("adapter_model.safetensors") for k in a) and any("generations" in k for k in a), list(a)
    assert a.keys() == b.keys()
    assert [k for k in a if a[k] != b[k]] == []


@pytest.mark.slow
def test_negative_temperature_0_gives_each_twins_greedy_answers(tmp_path):
    """--negative_temperature 0: the hard negatives (init/negatives_teacher0) and the weak twin's answers the
    student's twin learns from (init/weak_negatives, the weak teacher being teacher0) are the twin's greedy
    answers, recomputed here one prompt at a time with transformers' own generate."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from data import render_prompt
    out = tmp_path / "greedy"
    macpo.main(SMOKE + ["--out", str(out), "--n_teachers", "1", "--rounds", "1", "--no-ceiling",
                        "--negative_temperature", "0"])
    twin = AutoModelForCausalLM.from_pretrained(out / "init" / "teacher0_neg").eval()
    tokenizer = AutoTokenizer.from_pretrained(out / "init" / "teacher0_neg")
    for stage in ("negatives_teacher0", "weak_negatives"):
        rows = [json.loads(line) for line in (out / "init" / stage / "generations.jsonl").read_text().splitlines()]
        assert len(rows) == 32
        for row in rows[:6]:
            ids = torch.tensor([tokenizer(render_prompt(row["prompt"], "vicuna", None, ""))["input_ids"]])
            with torch.no_grad():
                new = twin.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False,
                                    pad_token_id=tokenizer.pad_token_id)[0, ids.shape[1]:].tolist()
            if tokenizer.eos_token_id in new:
                new = new[:new.index(tokenizer.eos_token_id)]
            assert row["response"] == tokenizer.decode(new, skip_special_tokens=True).strip(), (stage, row)


@pytest.mark.slow
def test_toy_bases_are_cached_by_recipe_and_shared_across_seeds(tmp_path):
    """Pre-trained once into OUT/../toy_bases/NAME-HASH; a second run (another seed too) copies them; a changed
    recipe adds a base; --toy_rebuild_bases trains again."""
    import toy
    from stages import Run

    def bases(name, *flags):
        cfg = macpo.parse_config(SMALL + ["--out", str(tmp_path / name), *flags])
        return [Path(folder) for folder in toy.bases(cfg, Run(cfg)).values()]
    cache = tmp_path / "toy_bases"
    first = bases("a", "--toy_pretrain_workers", "2")
    entries = sorted(p.name for p in cache.iterdir() if not p.name.startswith("."))
    assert [e.split("-")[0] for e in entries] == ["student", "teacher", "teacher", "tokenizer"]
    stamp = {e: (cache / e / "DONE").stat().st_mtime_ns for e in entries}
    second = bases("b", "--seed", "7")                          # another seed, the same bases
    assert sorted(p.name for p in cache.iterdir() if not p.name.startswith(".")) == entries
    assert {e: (cache / e / "DONE").stat().st_mtime_ns for e in entries} == stamp
    for x, y in zip(first, second):
        assert (x / "model.safetensors").read_bytes() == (y / "model.safetensors").read_bytes()
    bases("c", "--toy_student_pretrain_steps", "9")             # one recipe changed: one more base
    now = sorted(p.name for p in cache.iterdir() if not p.name.startswith("."))
    assert len(now) == 5 and set(entries) < set(now) and sum(e.startswith("student") for e in now) == 2
    bases("d", "--toy_rebuild_bases", "--toy_pretrain_workers", "1")
    student = next(e for e in entries if e.startswith("student"))
    assert (cache / student / "DONE").stat().st_mtime_ns != stamp[student]
    assert json.loads((cache / student / "recipe.json").read_text())["steps"] == 8


def test_every_flag_has_its_comment_as_help(capsys):
    """--help is generated from Config's comments: every field is a flag in a group, with its comment as help."""
    import dataclasses
    with pytest.raises(SystemExit):
        macpo.main(["--help"])
    out = " ".join(capsys.readouterr().out.split())              # argparse wraps lines
    for f in dataclasses.fields(macpo.Config):
        assert f"--{f.name}" in out, f.name
    assert "--no-hard_negatives: the -HN ablation (deranged_negatives)" in out
    assert "DPO temperature (LLaMA-Factory's default; the paper's value not found) (default: 0.1)" in out
    assert "contrastive update: DPO + sft_weight x SFT on the positive, every round (step 2 (f)):" in out
    helped = [name for _, flags in macpo.flags.flag_help(macpo.Config) for name, text in flags if text.strip()]
    assert sorted(helped) == sorted(f.name for f in dataclasses.fields(macpo.Config))
