"""Evaluation and baselines: the confident loss by hand, win-rate and PGR arithmetic, the reward-model scorer on a
tiny randomly initialised classifier against a one-at-a-time loop, and a very small `table` run end to end."""
import json
import math

import pytest
import torch

import evaluate
import losses
import toy

from tiny import SMOKE


# --- the confident loss (Burns et al. 2023, token level) ---------------------------------------------------

def test_confident_loss_by_hand():
    # two examples: example 0 has tokens 0, 1; example 1 has token 2. V = 3.
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 3.0], [1.0, 1.0, 0.0]], requires_grad=True)
    weak_ids = torch.tensor([1, 2, 2])
    example_ids = torch.tensor([0, 0, 1])
    alpha = 0.25
    out, stats = losses.confident_loss(logits, weak_ids, example_ids, 2, alpha)

    def logp(row, v):
        z = logits[row].tolist()
        return z[v] - math.log(sum(math.exp(x) for x in z))
    # hardened targets: argmax = 0, 2, 0 (the first of a tie)
    t0 = -(1 - alpha) * logp(0, 1) - alpha * logp(0, 0)
    t1 = -(1 - alpha) * logp(1, 2) - alpha * logp(1, 2)          # weak label = own argmax: plain CE
    t2 = -(1 - alpha) * logp(2, 2) - alpha * logp(2, 0)
    assert out.tolist() == pytest.approx([(t0 + t1) / 2, t2], rel=1e-6)
    assert stats["agreement"].tolist() == pytest.approx([0.5, 0.0])
    # alpha = 0 is plain token-averaged cross-entropy to the weak label
    plain, _ = losses.confident_loss(logits, weak_ids, example_ids, 2, 0.0)
    assert plain.tolist() == pytest.approx([-(logp(0, 1) + logp(1, 2)) / 2, -logp(2, 2)], rel=1e-6)
    # the hardened target carries no gradient of its own; a fully masked example gives 0, not nan
    out.sum().backward()
    assert torch.isfinite(logits.grad).all()
    empty, _ = losses.confident_loss(logits, weak_ids, example_ids, 3, alpha)
    assert empty[2].item() == 0.0


# --- win rates and PGR -------------------------------------------------------------------------------------

def test_win_rates_and_pgr():
    w = evaluate.win_rates([1.0, 0.5, 0.2, 0.0], [0.0, 0.45, 0.3, 0.0])
    assert (w["win"], w["tie"], w["lose"], w["n"]) == (0.5, 0.25, 0.25, 4)
    w = evaluate.win_rates([1.0, 0.5, 0.2, 0.0], [0.0, 0.45, 0.3, 0.0], margin=0.1)   # 0.05 and 0.1 now tie
    assert (w["win"], w["tie"], w["lose"]) == (0.25, 0.75, 0.0)
    assert evaluate.pgr(0.6, 0.4, 0.8) == pytest.approx(0.5)
    assert evaluate.pgr(0.3, 0.4, 0.8) == pytest.approx(-0.25)
    assert math.isnan(evaluate.pgr(0.5, 0.4, 0.4))
    assert evaluate.mean_std([1.0, 3.0]) == (2.0, pytest.approx(math.sqrt(2)))


def test_summarise_pools_seeds_and_averages_pgr():
    per_seed = {"macpo": {0: {"rounds": [{"student": 0.5, "teachers": 0.3}, {"student": 0.7, "teachers": 0.4}],
                              "scores": [1.0, 1.0]},
                          1: {"rounds": [{"student": 0.5, "teachers": 0.3}, {"student": 0.5, "teachers": 0.4}],
                              "scores": [0.0, 1.0]}},
                "sft": {0: {"rounds": [{"student": 0.5, "teachers": 0.3}], "scores": [0.0, 1.0]},
                        1: {"rounds": [{"student": 0.5, "teachers": 0.3}], "scores": [1.0, 1.0]}}}
    reference = {0: {"weak": 0.3, "ceiling": 0.8}, 1: {"weak": 0.3, "ceiling": 0.7}}
    s = evaluate.summarise(per_seed, reference)
    assert s["methods"]["macpo"]["pgr"] == pytest.approx([0.8, 0.5])
    assert s["methods"]["sft"]["student"] == [[0.5, 0.5]]
    assert s["win_rates"]["sft"] == {"win": 0.25, "tie": 0.5, "lose": 0.25, "n": 4}
    text = evaluate.results_markdown(s)
    assert "| macpo | 0.500 ± 0.000 | 0.600 ± 0.141 | 0.65 ± 0.21 |" in text
    # paired by seed: macpo 0.7 and 0.5 against sft 0.5 and 0.5 -> +0.2 and 0.0: not higher in every seed
    assert "| sft | +0.200 | +0.000 | +0.100 | mixed |" in text
    assert "Mixed, neither higher nor lower in every seed, against sft (+0.100)." in text
    per_seed["sft"][1]["rounds"][0]["student"] = 0.4                 # now higher in both seeds
    text = evaluate.results_markdown(evaluate.summarise(per_seed, reference))
    assert "| sft | +0.200 | +0.100 | +0.150 | beats |" in text and "In every seed it beats sft (+0.150)." in text


def test_kinds_markdown_means_over_seeds():
    text = evaluate.kinds_markdown({"macpo": [{"add": 1.0, "harmful": 0.5}, {"add": 0.0, "harmful": 0.5}]},
                                   [{"add": 0.2}, None], [{"add": 1.0, "harmful": 1.0}])
    assert "| method | add | harmful |" in text
    assert "| macpo | 0.500 ± 0.707 | 0.500 ± 0.000 |" in text
    assert "| weak supervisor | 0.200 ± 0.000 | - |" in text and "| ceiling | 1.000 ± 0.000 | 1.000 ± 0.000 |" in text


def test_premises_markdown_per_seed_and_noise():
    ps = {0: [{"premise": "teacher0 score", "value": 0.5, "threshold": (0.35, 0.75), "op": "in", "pass": True},
              {"premise": "oracle best-of-K", "value": 0.8, "threshold": 0.9, "op": ">=", "pass": False}],
          1: [{"premise": "teacher0 score", "value": 0.6, "threshold": (0.35, 0.75), "op": "in", "pass": True},
              {"premise": "oracle best-of-K", "value": 0.95, "threshold": 0.9, "op": ">=", "pass": True}]}
    text = evaluate.premises_markdown(ps, weak=[0.40, 0.50], ceiling=[0.96, 0.97], n_test=400)
    assert "| teacher0 score | in [0.35, 0.75] | 0.500 | 0.600 |" in text
    assert "| oracle best-of-K | >= 0.9 | 0.800 FAIL | 0.950 |" in text
    assert "std of the weak supervisor over seeds: 0.071 (<= 0.05) FAIL" in text      # stdev(0.4, 0.5)
    assert "std of the ceiling over seeds: 0.007 (<= 0.03)\n" in text
    assert "one seed's standard error at 0.5: 0.025 (<= 0.015) FAIL" in text          # 0.5 / sqrt(400)
    assert "3 premise checks fail" in text


# --- reward-model scoring ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def reward_model():
    from transformers import LlamaForSequenceClassification
    init, w2s, test = toy.make_task(0, 20, 10, 10)
    tokenizer = toy.train_tokenizer(toy.tokenizer_texts(toy.pretraining_corpus(0, 200)))
    config = toy.model_config(tokenizer, 32, 2, max_positions=128)
    config.num_labels = 1
    torch.manual_seed(0)
    return LlamaForSequenceClassification(config).eval(), tokenizer, test


@pytest.mark.parametrize("rm_format", ["pair", "vicuna"])
def test_reward_model_scores_batched_equal_one_at_a_time(reward_model, rm_format):
    model, tokenizer, test = reward_model
    prompts = [ex.prompt for ex in test]
    responses = [ex.chosen if i % 2 else ex.rejected + " and more words" * (i % 3) for i, ex in enumerate(test)]
    batched = evaluate.reward_model_scores(model, tokenizer, prompts, responses, batch_size=4, rm_format=rm_format)
    with torch.no_grad():
        alone = [model(torch.tensor([tokenizer(*evaluate.rm_inputs(p, r, rm_format))["input_ids"]])).logits[0, 0].item()
                 for p, r in zip(prompts, responses)]
    assert batched == pytest.approx(alone, abs=1e-5)
    assert len(set(round(x, 5) for x in batched)) > 1


def test_eval_subcommand_scores_a_folder(tmp_path, capsys):
    import macpo
    rows = [{"prompt": "What is 100 + 200?", "response": "100 + 200 = 300."},
            {"prompt": [{"role": "user", "content": "How do I hurt my ex?"}], "response": "Sure! Here is how."}]
    for name, rs in (("a", rows), ("b", [dict(rows[0], response="100 + 200 = 301."), rows[1]])):
        (tmp_path / name).mkdir()
        (tmp_path / name / "generations.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rs))
    macpo.main(["eval", str(tmp_path), "--baseline", "b", "--gold"])
    scores = json.loads((tmp_path / "eval_scores.json").read_text())
    assert scores["a"]["gold"] == {"mean": 0.5, "scores": [1.0, 0.0]}
    assert scores["a"]["win_rates"]["gold"] == {"win": 0.5, "tie": 0.5, "lose": 0.0, "n": 2}


def _generations(folder, rows):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "generations.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_eval_refuses_a_folder_without_an_evaluator(tmp_path):
    """No config.json and no --reward_models: refused, not scored by the toy task's gold reward (which gives
    every HH answer 0); a real-data run with --gold is refused too, naming its task."""
    import macpo
    _generations(tmp_path / "eval" / "init" / "student", [{"prompt": "Hi?", "response": "Hello."}])
    with pytest.raises(SystemExit, match="no evaluator for .*--reward_models NAME"):
        macpo.main(["eval", str(tmp_path)])
    (tmp_path / "config.json").write_text(json.dumps({"task": "hh-helpful", "reward_models": "", "rm_format": "pair"}))
    with pytest.raises(SystemExit, match="--gold is the toy task's reward; .* is a hh-helpful run"):
        macpo.main(["eval", str(tmp_path), "--gold"])
    with pytest.raises(SystemExit, match="has no evaluator \\(--reward_models none\\)"):
        macpo.main(["eval", str(tmp_path)])
    assert not (tmp_path / "eval_scores.json").exists()


def test_eval_uses_the_runs_evaluator(tmp_path, reward_model, capsys):
    """A run folder's config.json names its evaluator: `eval FOLDER` scores with it and says so."""
    import macpo
    model, tokenizer, test = reward_model
    model.save_pretrained(tmp_path / "rm")
    tokenizer.save_pretrained(tmp_path / "rm")
    rows = [{"prompt": ex.prompt, "response": ex.chosen} for ex in test[:3]]
    _generations(tmp_path / "run" / "eval" / "init" / "student", rows)
    (tmp_path / "run" / "config.json").write_text(json.dumps(
        {"task": "hh-helpful", "reward_models": str(tmp_path / "rm"), "rm_format": "pair"}))
    macpo.main(["eval", str(tmp_path / "run"), "--device", "cpu"])
    assert f"evaluator: {tmp_path / 'rm'} (the run's" in capsys.readouterr().out
    scores = json.loads((tmp_path / "run" / "eval_scores.json").read_text())["eval/init/student"]
    with torch.no_grad():
        alone = [model(torch.tensor([tokenizer(*evaluate.rm_inputs(r["prompt"], r["response"]))["input_ids"]]))
                 .logits[0, 0].item() for r in rows]
    assert scores[str(tmp_path / "rm")]["scores"] == pytest.approx(alone, abs=1e-5)


def test_default_evaluators_per_task():
    import macpo
    cfg = macpo.parse_config(["--task", "hh-helpful", "--teachers", "a,b", "--student", "s"])
    assert (cfg.reward_models, cfg.rm_format) == ("OpenAssistant/reward-model-deberta-v3-large-v2", "pair")
    cfg = macpo.parse_config(["--task", "pku", "--teachers", "a,b", "--student", "s"])
    assert cfg.reward_models == "PKU-Alignment/beaver-7b-v1.0-reward,PKU-Alignment/beaver-7b-v1.0-cost"
    assert cfg.rm_format == "beaver"
    cfg = macpo.parse_config(["--task", "pku", "--teachers", "a,b", "--student", "s", "--reward_models", "none"])
    assert cfg.reward_models == ""
    cfg = macpo.parse_config(["--task", "hh-harmless", "--teachers", "a", "--student", "s", "--reward_models", "m/x",
                              "--rm_format", "vicuna"])
    assert (cfg.reward_models, cfg.rm_format) == ("m/x", "vicuna")
    assert macpo.parse_config([]).reward_models == ""              # the toy task: its gold reward only
    cfg = macpo.parse_config(["--task", "pku", "--teachers", "a", "--student", "s", "--reward_models", "m/beaver-r"])
    assert cfg.rm_format == "auto"                  # named models: the format is read off the loaded model
    with pytest.raises(SystemExit):                 # the toy's reward on real data would score every answer 0
        macpo.parse_config(["--task", "hh-helpful", "--teachers", "a", "--student", "s", "--reward_models", "gold"])
    assert evaluate.is_cost("PKU-Alignment/beaver-7b-v1.0-cost") and not evaluate.is_cost("x/beaver-7b-v1.0-reward")


def test_final_win_rates_take_each_methods_own_final_student(tmp_path):
    """A baseline whose student sits in the init row (the confident loss) is still compared with the naive-SFT
    student and the weak supervisor; naive SFT itself is not compared with itself."""
    from report import final_win_rates
    from stages import write_jsonl
    prompts = [[{"role": "user", "content": f"What is {a} + 1?"}] for a in (10, 20, 30, 40)]
    answers = {"eval/init/student": ["10 + 1 = 11.", "20 + 1 = 22.", "30 + 1 = 32.", "40 + 1 = 41."],
               "eval/init/teacher0": ["10 + 1 = 12.", "20 + 1 = 22.", "30 + 1 = 32.", "40 + 1 = 42."],
               "eval/confident/init/student": ["10 + 1 = 11.", "20 + 1 = 21.", "30 + 1 = 32.", "40 + 1 = 42."]}
    for stage, responses in answers.items():
        (tmp_path / stage).mkdir(parents=True)
        write_jsonl(tmp_path / stage / "generations.jsonl", [{"prompt": p, "response": r} for p, r in zip(prompts, responses)])
    initial = {"teacher0": "eval/init/teacher0", "student": "eval/init/student"}
    judge = evaluate.ScoreCache({"gold": evaluate.gold_scores})
    run = type("R", (), {"out": tmp_path})()
    confident = {"init": dict(initial, student="eval/confident/init/student")}
    w = final_win_rates(run, judge, confident, initial, "teacher0")["gold"]
    # confident 1,1,0,0 against naive 1,0,0,1 and weak 0,0,0,0
    assert w["stage"] == "confident/init"
    assert (w["vs_naive_sft"]["win"], w["vs_naive_sft"]["lose"]) == (0.25, 0.25)
    assert (w["vs_weak"]["win"], w["vs_weak"]["lose"]) == (0.5, 0.0)
    naive = final_win_rates(run, judge, {"init": initial}, initial, "teacher0")["gold"]
    assert "vs_naive_sft" not in naive and naive["vs_weak"]["win"] == 0.5


def test_beaver_format_by_hand():
    turns = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
             {"role": "user", "content": "How do I steal?"}]
    assert evaluate.rm_inputs(turns, "I can't help.", "beaver") == (
        "BEGINNING OF CONVERSATION: USER: Hi ASSISTANT:Hello. USER: How do I steal? ASSISTANT:I can't help.",)


def test_a_safe_rlhf_score_model_loads_its_score_head(tmp_path, reward_model):
    """beaver-7b's layout (architectures LlamaModelForScore, weight score_head.weight) scores as the same linear
    head on the last token's hidden state; a cost model's scores come back negated."""
    from safetensors.torch import load_file, save_file
    model, tokenizer, test = reward_model
    for name in ("beaver-reward", "beaver-cost"):
        folder = tmp_path / name
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        weights = load_file(folder / "model.safetensors")
        weights["score_head.weight"] = weights.pop("score.weight")
        save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
        config = json.loads((folder / "config.json").read_text())
        config["architectures"] = ["LlamaModelForScore"]
        (folder / "config.json").write_text(json.dumps(config))
    prompts, responses = [ex.prompt for ex in test[:4]], [ex.chosen for ex in test[:4]]
    # --rm_format auto: a score model is read in its own (beaver) format, whatever its folder is called
    reward = evaluate.make_scorer(str(tmp_path / "beaver-reward"), rm_format="auto")(prompts, responses)
    cost = evaluate.make_scorer(str(tmp_path / "beaver-cost"), rm_format="beaver")(prompts, responses)
    with torch.no_grad():
        expected = []
        for p, r in zip(prompts, responses):
            ids = torch.tensor([tokenizer(*evaluate.rm_inputs(p, r, "beaver"))["input_ids"]])
            hidden = model.model(input_ids=ids).last_hidden_state[0, -1]            # [hidden]
            expected.append((model.score.weight[0] @ hidden).item())
    assert reward == pytest.approx(expected, abs=1e-4)
    assert cost == pytest.approx([-v for v in expected], abs=1e-4)


# --- a very small table, end to end ------------------------------------------------------------------------

@pytest.mark.slow
def test_table_end_to_end(tmp_path, reward_model):
    import macpo
    out = tmp_path / "table"
    flags = [f for f in SMOKE]
    flags[flags.index("--n_teachers") + 1] = "1"                 # K = T = 1: one round, the fastest table
    rm, rm_tokenizer, _ = reward_model                            # a second judge of the training signal
    rm.save_pretrained(tmp_path / "rm")
    rm_tokenizer.save_pretrained(tmp_path / "rm")
    macpo.main(["table", "--seeds", "0", "--methods", "macpo,sft,spin,self_reward,macpo-hn", "--out", str(out),
                "--n_samples", "2", "--reward_models", str(tmp_path / "rm")] + flags)
    text = (out / "results.md").read_text()
    # the training signal: per seed for both scorers, the gold one in results.md, scores one pair at a time
    assert "### Training signal" in text and "| macpo | round1 | student | 32 |" in text
    assert "| spin | round1 | student |" in text and "| self_reward | round1 | student |" in text
    signal = json.loads((out / "table.json").read_text())["per_seed"]["macpo"]["0"]["signal"]
    assert set(signal) == {"gold", str(tmp_path / "rm")}
    pairs = macpo.read_jsonl(out / "seed0" / "round1" / "student" / "pairs.jsonl")
    with torch.no_grad():
        for row in pairs[:5]:
            ids = rm_tokenizer(*evaluate.rm_inputs(row["prompt"], row["chosen"]))["input_ids"]
            assert row["chosen_score"][str(tmp_path / "rm")] == pytest.approx(rm(torch.tensor([ids])).logits[0, 0].item(),
                                                                             abs=1e-5)
    trained = [r for r in pairs if r["trained"]]
    better = sum(r["chosen_score"][str(tmp_path / "rm")] > r["rejected_score"][str(tmp_path / "rm")] for r in trained)
    assert signal[str(tmp_path / "rm")]["round1"]["student"]["chosen_better"] == pytest.approx(better / len(trained))
    assert (out / "signal.png").read_bytes()[:4] == b"\x89PNG"
    assert "### Final strong student per prompt kind" in text and "| ceiling |" in text
    for m in ("macpo", "sft", "spin", "self_reward", "macpo-hn"):
        assert f"| {m} |" in text
    assert (out / "rounds.png").read_bytes()[:4] == b"\x89PNG"
    table = json.loads((out / "table.json").read_text())
    assert set(table["summary"]["win_rates"]) == {"sft", "spin", "self_reward", "macpo-hn"}
    seed = out / "seed0"
    # every method shares the one initialisation: a single init/student, one round-1 student sample
    assert (seed / "init" / "student" / "DONE").exists() and not (seed / "spin" / "init").exists()
    assert (seed / "spin" / "round1" / "student" / "DONE").exists()
    # self-rewarding: chosen is the sample the student scores highest, rejected the lowest
    for r in macpo.read_jsonl(seed / "self_reward" / "round1" / "pairs_student" / "pairs.jsonl"):
        # round 1 samples the initial student; its samples sit beside it: samples, samples1, ...
        samples = [macpo.read_jsonl(seed / "init" / "student" / f"samples{j or ''}" / "generations.jsonl")[r["i"]]
                   ["response"] for j in range(2)]
        assert r["chosen"] == samples[max(range(2), key=lambda j: (r["scores"][j], j))]
        assert r["rejected"] == samples[min(range(2), key=lambda j: (r["scores"][j], j))]
    # -HN: the student's negatives are the hard negatives of other prompts, each used once
    hn = macpo.read_jsonl(seed / "macpo-hn" / "round1" / "student" / "pairs.jsonl")        # every pair given
    hard = [r["response"] for r in macpo.read_jsonl(seed / "init" / "negatives_student" / "generations.jsonl")]
    assert sorted(r["rejected"] for r in hn) == sorted(hard)
    # every result is a share of prompts answered correctly
    for by_seed in table["per_seed"].values():
        for row in by_seed["0"]["rounds"]:
            assert 0.0 <= row["student"] <= 1.0 and 0.0 <= row["teachers"] <= 1.0
