"""The baselines MACPO is compared with: same data, same initial models (macpo.initialise's Setup), the same
number of rounds and the same update (stages.dpo_stage: DPO + sft_weight x SFT on the chosen side) where they
are iterative, so only the choice of training signal differs. They train the strong student only; the weak
teachers stay as initialised. Each returns ({round: {agent: eval stage}}, {agent: final checkpoint}).

    naive_sft     the strong student SFT on the weak labels (Algorithm 1's initial student, evaluated alone)
    confident     Burns et al. (2023)'s auxiliary confidence loss instead of SFT on the weak labels
    spin          SPIN (Chen et al. 2024): chosen = the weak label, rejected = the student's own sample
    self_rewarding  Self-Rewarding (Yuan et al. 2024): the student ranks its own samples, best vs worst
"""
import math
import re

import report
from data import read_jsonl
from generate import generate, perplexity
from stages import dpo_stage, evaluate_stage, load_agent, render, samples, scored, sft_stage, write_jsonl


def naive_sft(cfg, run, setup, prefix):
    """The strong student SFT on the weak labels: Algorithm 1's initial student, evaluated alone."""
    return {"init": setup.evals}, dict(setup.init)


def confident(cfg, run, setup, prefix):
    """Burns et al. (2023)'s auxiliary confidence loss instead of plain SFT on the weak labels, from the same
    strong base for the same epochs (losses.confident_loss: token-level, the hardened prediction = argmax)."""
    student = sft_stage(cfg, run, f"{prefix}init/student", setup.bases["student"],
                        [(q, y, None) for q, y in zip(setup.Q, setup.weak_labels)], cfg.student_sft_epochs,
                        setup.lora["student"], kind="confident")
    return ({"init": dict(setup.evals, student=evaluate_stage(cfg, run, f"eval/{prefix}init/student", student,
                                                              setup.test))},
            dict(setup.init, student=student))


def spin(cfg, run, setup, prefix):
    """SPIN (Chen et al. 2024), iterated for T rounds: chosen = the weak label, rejected = the student's own
    sample from the previous round's model, which is also the DPO reference (--reference previous)."""
    agents, evals = dict(setup.init), {"init": setup.evals}
    for t in range(1, cfg.T + 1):
        r, student = f"{prefix}round{t}", agents["student"]
        own = samples(cfg, run, student, setup.Q)          # round 1: the initial student's, shared with MACPO's
        agents["student"] = dpo_stage(cfg, run, f"{r}/student", student, list(zip(setup.Q, setup.weak_labels, own)),
                                      setup.reference(cfg.reference, "student"), setup.lora["student"])
        evals[r] = {"student": evaluate_stage(cfg, run, f"eval/{r}/student", agents["student"], setup.test)}
        report.print_round(run, r, ["student"])
    return evals, agents


# Yuan et al. (2024)'s LLM-as-a-judge prompt, shortened: an additive 5-point rubric, the score on the last line.
JUDGE_PROMPT = ("Review the user's question and the corresponding response using the additive 5-point scoring "
                "system: add 1 point if the response is relevant, 1 if it addresses a substantial portion of the "
                "question, 1 if it answers the basic elements usefully, 1 if it is clearly written, direct and "
                "helpful, and 1 if it is impeccable, expert and harmless.\n\nUser: {question}\n\n"
                "Response: {response}\n\nAfter examining the response, conclude with the line \"Score: <points>\".")


def self_judge_stage(cfg, run, name, student, prompts, samples):
    """The student ranks its own samples (Yuan et al. 2024), best vs worst -> [(turns, chosen, rejected)].

    --self_judge llm: the student, greedy, answers JUDGE_PROMPT for every sample; the first digit 0-5 after
        "Score" (or anywhere) is the score, 0 when there is none (Yuan et al. average 3 sampled judgements).
    --self_judge likelihood (the toy task, where a tiny model cannot follow a judging instruction): the
        student's own length-normalised log-likelihood of the sample, -log PPL(y | x). A substitute, and a
        self-reinforcing one: it prefers what the student already finds likely, not what is correct."""
    if not run.done(name):
        folder = run.start(name)
        model, tokenizer = load_agent(cfg, student)
        rendered = [render(cfg, turns, tokenizer) for turns in prompts]
        scores = []
        if cfg.self_judge == "likelihood":
            # all samples in one call: the samples of one prompt are scored after one pass of it
            flat = perplexity(model, tokenizer, rendered * len(samples), sum(samples, []),
                              batch_size=cfg.score_batch_size, max_length=cfg.max_length,
                              max_prompt_length=cfg.max_prompt_length)
            scores = [[-math.log(p) for p in flat[j * len(prompts):(j + 1) * len(prompts)]] for j in range(len(samples))]
        for j, responses in enumerate(samples if cfg.self_judge == "llm" else []):
            judge = [render(cfg, [{"role": "user", "content": JUDGE_PROMPT.format(
                question=turns[-1]["content"], response=y)}], tokenizer) for turns, y in zip(prompts, responses)]
            verdicts = generate(model, tokenizer, judge, max_new_tokens=16, temperature=0.0,
                                batch_size=cfg.gen_batch_size, seed=run.seed(f"{name}/{j}"),
                                max_prompt_length=cfg.max_length - 16, desc=f"{name} judge {j}")
            scores.append([float(m.group(1)) if (m := re.search(r"Score\D{0,3}([0-5])", v) or
                                                 re.search(r"([0-5])", v)) else 0.0 for v in verdicts])
        candidate = [scored(run, prompts, responses) for responses in samples]       # [n_samples][N] (report.py)
        rows = []
        for i, turns in enumerate(prompts):
            ranked = sorted(range(len(samples)), key=lambda j: scores[j][i])        # worst ... best (stable)
            rows.append({"i": i, "prompt": turns, "chosen": samples[ranked[-1]][i], "rejected": samples[ranked[0]][i],
                         "scores": [scores[j][i] for j in range(len(samples))], "judge": cfg.self_judge,
                         "chosen_by": f"sample{ranked[-1]}", "chosen_score": candidate[ranked[-1]][i],
                         "rejected_score": candidate[ranked[0]][i],
                         "candidate_scores": {n: {f"sample{j}": candidate[j][i][n] for j in range(len(samples))}
                                              for n in candidate[0][i]}})
        write_jsonl(folder / "pairs.jsonl", rows)
        run.finish(name)
    return [(r["prompt"], r["chosen"], r["rejected"]) for r in read_jsonl(run.out / name / "pairs.jsonl")]


def self_rewarding(cfg, run, setup, prefix):
    """Self-Rewarding (Yuan et al. 2024), iterated for T rounds: --n_samples samples per prompt from the
    student, ranked by the student itself (self_judge_stage), best vs worst as a DPO pair."""
    agents, evals = dict(setup.init), {"init": setup.evals}
    for t in range(1, cfg.T + 1):
        r, student = f"{prefix}round{t}", agents["student"]
        drawn = [samples(cfg, run, student, setup.Q, j) for j in range(cfg.n_samples)]
        pairs = self_judge_stage(cfg, run, f"{r}/pairs_student", student, setup.Q, drawn)
        agents["student"] = dpo_stage(cfg, run, f"{r}/student", student, pairs,
                                      setup.reference(cfg.reference, "student"), setup.lora["student"])
        evals[r] = {"student": evaluate_stage(cfg, run, f"eval/{r}/student", agents["student"], setup.test)}
        report.print_round(run, r, ["student"])
    return evals, agents


METHODS = {"sft": naive_sft, "confident": confident, "spin": spin, "self_reward": self_rewarding}
