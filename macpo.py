"""MACPO: weak-to-strong alignment by multi-agent contrastive preference optimization (Lyu et al., ICLR 2025).

K weak teachers and one strong student learn from each other for T rounds. Each agent has a negative twin,
fine-tuned on negative data, whose outputs are the agent's familiar (hard) negatives; each round the student
takes, per prompt, the teacher response it finds most familiar (lowest perplexity) as its positive, the
teachers take the student's response as theirs, and every agent is updated with DPO + 0.2 x SFT.

    bash run.sh toy                                   # the built-in offline task (K = 3, T = 3), CPU, minutes
    python macpo.py --out runs/toy                    # the same, without run.sh's venv set-up
    python macpo.py --task hh-helpful --teachers A,B,C --student S --data_dir ../shared/data/hh-rlhf ...

Every stage writes into its own folder under --out and is marked done last; running the same command again
skips finished stages, so a killed run continues where it stopped. Algorithm 1 is `macpo` below.
"""
import argparse
import dataclasses
import math
import os
import random
import re
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import data
import evaluate
import lora
import parallel
import report
from generate import generate, perplexity
from stages import (Run, dpo_stage, evaluate_stage, generate_stage, load_agent, load_task, read_jsonl, render,
                    scored, select_positives_stage, sft_stage, teacher_pairs_stage, toy_base_cache, toy_bases,
                    write_json, write_jsonl, write_text)
from train import ModelLoadError, NonFiniteError, check_model, default_device


# ---------------------------------------------------------------------------------------------------------
# Configuration: one flat dataclass, every field a command-line flag (--name value). run.sh's presets are
# visible sets of these flags. Defaults run the built-in toy task; comments say where a value comes from.

@dataclass
class Config:
    # run
    out: str = "runs/toy"               # run folder: checkpoints, generations, pairs, metrics.jsonl, results.json
    seed: int = 0                       # every stage derives its own seed from this and its name
    device: str = "auto"                # auto = cuda if available, else cpu (bf16 on cuda, float32 on cpu)
    trust_remote_code: bool = False     # let transformers run code shipped with a hub model; off unless asked
    parallel: str = "ddp"               # under torchrun: ddp (full copies, gradients averaged) | fsdp (sharded)
    # task and data
    task: str = "toy"                   # toy | hh-helpful | hh-harmless | pku | file
    data_dir: str = ""                  # local dataset folder (hh: {subset}/{split}.jsonl.gz; pku: {split}.jsonl)
    data_file: str = ""                 # task=file: your own JSONL (prompt/chosen/rejected) or LLaMA-Factory JSON
    cache_dir: str = str(data.DEFAULT_CACHE_DIR)   # where hh / pku files are downloaded when not in --data_dir
    train_split: str = "train"          # split the init and weak-to-strong prompts come from; "test" splits the
                                        # test file three ways (offline runs on ../shared/data)
    pku_order: str = "safer"            # PKU-SafeRLHF pair order: safer (default) or better (more helpful)
    n_init: int = 1500                  # weak-teacher initialisation pairs (paper: 5,000)
    n_w2s: int = 1500                   # weak-to-strong prompts Q_w2s (paper: 5,000)
    n_test: int = 400                   # test prompts (paper: 2,000 HH, 1,000 PKU)
    template: str = "vicuna"            # prompt template: vicuna (release, HH) | alpaca (release, PKU) | chat | hh
    system: str = "default"             # system line: "default" = the template's own, "" = none
    max_length: int = 1024              # prompt + response tokens (release: LLaMA-Factory's cutoff_len 1024)
    max_prompt_length: int = 512        # prompt tokens kept (from the end) when a pair is too long
    # agents
    teachers: str = "toy"               # comma-separated model names or folders, one per weak teacher (K of them);
                                        # "toy" = n_teachers tiny Llamas pre-trained here
    n_teachers: int = 3                 # K for --teachers toy (paper: 3)
    student: str = "toy"                # strong student model name or folder; "toy" = a tiny Llama pre-trained here
    rounds: int = 0                     # T; 0 means T = K, as released (3 stages for 3 teachers)
    weak_label_teacher: int = 0         # the teacher whose generations are the weak labels and whose negative twin
                                        # writes the student twin's data (release: apparently Llama2-7b, the first)
    reference: str = "previous"         # DPO reference: previous (the agent at the round's start, so the first
                                        # step's DPO loss is ln 2) | init (after SFT) | base (the release: LoRA
                                        # with adapters off = the raw base model). The paper is silent.
    student_positive_from: str = "before"   # the teachers' positive is the student's response from before its
                                            # update this round, or after it. The paper is silent.
    # supervised fine-tuning (initialisation)
    sft_lr: float = 5e-5                # release: 5e-5 (strong pos/neg init)
    teacher_sft_epochs: int = 3         # weak teachers on ground-truth chosen (release scripts missing; = student's)
    student_sft_epochs: int = 3         # strong student on weak labels (release: 3)
    neg_sft_epochs: int = 1             # negative twins, continued from the positive agent (release: 1)
    neg_sft_lr: float = 0.0             # the twins' SFT rate; 0 = --sft_lr (the release: the same 5e-5)
    # contrastive update (each round)
    dpo_lr: float = 1e-5                # release: 1e-5, 1 epoch
    dpo_epochs: int = 1
    beta: float = 0.1                   # DPO temperature (LLaMA-Factory default; the paper's value not found)
    sft_weight: float = 0.2             # weight of the SFT term on the positive (release: --dpo_ftx 0.2)
    loss_type: str = "sigmoid"          # sigmoid (DPO) | ipo
    label_smoothing: float = 0.0        # > 0: conservative DPO
    identical_pairs: str = "drop"       # pairs whose chosen and rejected are the same string: drop (their DPO
                                        # term is exactly zero; kept, they add only SFT on a response the agent's
                                        # own negative twin wrote) | keep (as the release, which does not filter).
                                        # The paper is silent.
    batch_size: int = 16                # sequences (SFT) or pairs (DPO) per micro-batch
    grad_accum: int = 1                 # micro-batches per optimizer step
    warmup_ratio: float = 0.0           # linear warm-up share of the steps, then cosine (release: 0, cosine)
    grad_clip: float = 1.0              # max gradient norm; 0 turns clipping off
    length_window: int = 16             # batches are cut from windows of this many batches sorted by length (less
                                        # padding); 1 = uniform batches. Toy: 1 (measured: sorted, the batches each
                                        # held mostly one kind of prompt, and teacher0's SFT ended at loss 2.1)
    log_every: int = 10                 # optimizer steps between metrics lines (and the only host syncs)
    # generation and scoring
    max_new_tokens: int = 256           # per response
    temperature: float = 0.7            # sampling for training data (teacher, student, negative generations);
    top_p: float = 0.9                  #   the release's generation settings are not known
    eval_temperature: float = 0.0       # test generations: 0 = greedy, so evaluation is exact and repeatable
    gen_batch_size: int = 32
    score_batch_size: int = 32          # perplexity and reference log-prob batches
    # the toy task (task=toy): tiny Llamas whose bases are pre-trained here, each on its own share of the
    # knowledge (toy.py), to convergence; cached by a hash of their recipe, independent of --seed
    toy_teacher_ops: str = "+,-,*"                   # the operations each weak teacher's base sees (the student: all)
    toy_teacher_sizes: str = "64x2,64x2,64x2"       # hidden x layers per weak teacher
    toy_student_size: str = "80x2"                   # hidden x layers of the strong student
    toy_teacher_pretrain_steps: str = "1200,1200,1200"   # pre-training steps per weak teacher (measured: one
                                                     # operation at ~0.95 after 900-1,200 steps of 64, 64x2)
    toy_student_pretrain_steps: int = 1500           # the student sees three operations: 3x the batch
    toy_pretrain_lr: float = 3e-3
    toy_pretrain_batch_size: int = 64                # the teachers'
    toy_student_pretrain_batch_size: int = 192
    toy_base_seed: int = 0                           # the bases' seed (released models are the same in every seed)
    toy_base_cache: str = ""                         # where pre-trained bases are kept by recipe; "" = OUT/../toy_bases
    toy_rebuild_bases: bool = False                  # pre-train this run's bases again, replacing the cached ones
    toy_pretrain_workers: int = 2                    # bases pre-trained at once, one process each
    # LoRA (lora.py, hand-written): the release trains rank-8 adapters on q_proj and v_proj, alpha 16
    lora: str = "none"                  # agents that train adapters instead of all weights: none | all | student | teachers
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: str = "q_proj,v_proj"     # module names (the last part) to wrap
    merge_lora: bool = False            # also write each LoRA checkpoint merged into its base, as STAGE/merged
    # evaluation
    evaluate: bool = True               # generate on the test prompts after init and each round (toy: gold reward)
    signal: bool = True                 # training-signal report (report.py): score both sides of every pair each
                                        # agent trains on and every candidate of the student's selection
    reward_models: str = ""             # comma-separated reward models (hub names or folders) that judge the
                                        # training signal on real data; the toy task also uses its gold reward
    rm_format: str = "pair"             # how a reward model reads (prompt, response): pair (OpenAssistant's
                                        # DeBERTa) or a template name (beaver-7b: vicuna); evaluate.rm_inputs
    ceiling: bool = True                # also train the strong student by SFT on ground truth (the ceiling)
    # method: MACPO or a baseline (../shared/paper.md section 5), from the same initial agents and data
    method: str = "macpo"               # macpo | sft (naive SFT on weak labels) | confident (Burns et al. 2023) |
                                        # spin (Chen et al. 2024) | self_reward (Yuan et al. 2024)
    mutual_positives: bool = True       # --no-mutual_positives: the -MP ablation (see macpo_rounds)
    hard_negatives: bool = True         # --no-hard_negatives: the -HN ablation (see macpo_rounds)
    confident_weight: float = 0.75      # confident: the final weight alpha of the student's own hardened
                                        # predictions (Burns et al.: 0.75 for their largest students)
    confident_warmup: float = 0.2       # confident: share of the steps over which alpha rises from 0 (Burns: 20%)
    n_samples: int = 4                  # self_reward: samples per prompt the student ranks (Yuan et al.: 4)
    self_judge: str = "likelihood"      # self_reward: llm (the student answers a judge prompt, real models) |
                                        # likelihood (its own length-normalised log-likelihood; the toy task)

    @property
    def K(self):
        return self.n_teachers if self.teachers == "toy" else len(self.teachers.split(","))

    @property
    def T(self):
        return self.rounds or self.K


def parse_config(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in dataclasses.fields(Config):
        if f.type in (bool, "bool"):
            parser.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, default=f.default)
        else:
            parser.add_argument(f"--{f.name}", type=type(f.default), default=f.default)
    cfg = Config(**vars(parser.parse_args(argv)))
    problems = validate(cfg)
    if problems:
        parser.error("\n  ".join(problems))
    return cfg


def validate(cfg):
    """Flags that cannot work together, refused before any compute, each with what to change."""
    p = []
    choices = {"task": ("toy", "hh-helpful", "hh-harmless", "pku", "file"), "template": data.TEMPLATES,
               "reference": ("previous", "init", "base"), "student_positive_from": ("before", "after"),
               "loss_type": ("sigmoid", "ipo"), "pku_order": ("safer", "better"),
               "identical_pairs": ("drop", "keep"), "rm_format": ("pair",) + tuple(data.TEMPLATES),
               "lora": ("none", "all", "student", "teachers"),
               "parallel": ("ddp", "fsdp"), "method": tuple(METHODS),
               "self_judge": ("likelihood", "llm")}
    for name, allowed in choices.items():
        if getattr(cfg, name) not in allowed:
            p.append(f"--{name} {getattr(cfg, name)!r} is not one of {', '.join(allowed)}")
    if cfg.K < 1:
        p.append("--n_teachers must be at least 1")
    if not 0 <= cfg.weak_label_teacher < cfg.K:
        p.append(f"--weak_label_teacher {cfg.weak_label_teacher} must name one of the {cfg.K} teachers (0..{cfg.K - 1})")
    if cfg.n_init < 1 or cfg.n_w2s < 1 or cfg.n_test < 0:
        p.append("--n_init and --n_w2s must be at least 1, --n_test at least 0")
    if not 0 < cfg.max_prompt_length < cfg.max_length:
        p.append(f"--max_prompt_length {cfg.max_prompt_length} must be positive and below --max_length {cfg.max_length}")
    if cfg.task == "file" and not cfg.data_file:
        p.append("--task file needs --data_file PATH")
    if (cfg.teachers == "toy") != (cfg.student == "toy"):
        p.append("--teachers toy and --student toy go together (tiny models built here share the toy tokenizer)")
    if cfg.teachers == "toy" and cfg.task != "toy":
        p.append(f"--task {cfg.task} needs real models: pass --teachers A,B,C and --student S (names or folders)")
    if cfg.teachers == "toy":
        sizes, steps = cfg.toy_teacher_sizes.split(","), cfg.toy_teacher_pretrain_steps.split(",")
        ops = cfg.toy_teacher_ops.split(",")
        if len(sizes) < cfg.K or len(steps) < cfg.K or len(ops) < cfg.K:
            p.append(f"--toy_teacher_sizes, --toy_teacher_pretrain_steps and --toy_teacher_ops need {cfg.K} "
                     f"entries (one per teacher)")
        if any(not o or set(o) - set("+-*") for o in ops):
            p.append(f"--toy_teacher_ops {cfg.toy_teacher_ops!r}: each teacher's entry is one or more of + - *")
    for name in ("batch_size", "gen_batch_size", "score_batch_size", "grad_accum", "max_new_tokens", "log_every",
                 "length_window"):
        if getattr(cfg, name) < 1:
            p.append(f"--{name} must be at least 1")
    if not 0 <= cfg.neg_sft_lr < float("inf"):
        p.append(f"--neg_sft_lr must be 0 (= --sft_lr) or a positive finite number, got {cfg.neg_sft_lr}")
    for name in ("sft_lr", "dpo_lr", "toy_pretrain_lr"):
        if not 0 < getattr(cfg, name) < float("inf"):        # argparse takes "nan" and "inf" as floats
            p.append(f"--{name} must be a positive finite number, got {getattr(cfg, name)}")
    if cfg.beta <= 0 or cfg.sft_weight < 0 or not 0 <= cfg.label_smoothing < 0.5:
        p.append("--beta must be > 0, --sft_weight >= 0, --label_smoothing in [0, 0.5)")
    return p


# ---------------------------------------------------------------------------------------------------------
# Algorithm 1 (paper section 2; ../shared/paper.md sections 2 and 9).

def check_models(cfg):
    """Every teacher and the student exist (config and tokenizer load) and the prompt template fits in
    --max_prompt_length with each one's tokenizer: checked before any training, not when the stage comes."""
    for name in cfg.teachers.split(",") + [cfg.student]:
        tokenizer = check_model(name, cfg.trust_remote_code)
        n = len(tokenizer(render(cfg, [{"role": "user", "content": ""}], tokenizer))["input_ids"])
        if n >= cfg.max_prompt_length:
            raise data.DataError(f"--max_prompt_length {cfg.max_prompt_length} leaves no room for a prompt: the "
                                 f"{cfg.template} template alone is {n} tokens with {name}'s tokenizer; raise "
                                 f"--max_prompt_length (and --max_length) above {n}, or pass --system ''")


def initialise(cfg, run):
    """Algorithm 1, step 1 (and the data): every agent initialised, the weak labels and the hard negatives.
    -> dict with the splits, the agents' checkpoints and the init evaluations. Shared by every method: the
    baselines start from the same weak teachers, weak labels and naive-SFT student."""
    init, w2s, test = load_task(cfg)                           # D_init (gold pairs), Q_w2s, test prompts
    if cfg.teachers != "toy":
        check_models(cfg)                                      # every model, before the first one trains
    Q = [ex.prompt for ex in w2s]
    if cfg.task == "toy":
        teacher_bases, student_base = toy_bases(cfg, run)
    else:
        teacher_bases, student_base = cfg.teachers.split(","), cfg.student
    names = [f"teacher{k}" for k in range(cfg.K)]
    w = cfg.weak_label_teacher

    # Initialise the weak teachers: positive by SFT on gold chosen, negative twin by SFT on gold rejected
    # continued from the positive teacher.
    pos = {n: sft_stage(cfg, run, f"init/{n}", teacher_bases[k], [(e.prompt, e.chosen, None) for e in init],
                        cfg.teacher_sft_epochs) for k, n in enumerate(names)}
    neg = {n: sft_stage(cfg, run, f"init/{n}_neg", pos[n], [(e.prompt, e.rejected, None) for e in init],
                        cfg.neg_sft_epochs, lr=cfg.neg_sft_lr) for n in names}
    # Weak labels, and the strong student: SFT on them (alone, this is the "naive SFT" baseline); its negative
    # twin: continued SFT on a weak negative twin's generations.
    weak_labels = generate_stage(cfg, run, "init/weak_labels", pos[names[w]], Q)
    pos["student"] = sft_stage(cfg, run, "init/student", student_base, list(zip(Q, weak_labels, [None] * len(Q))),
                               cfg.student_sft_epochs)
    weak_negatives = generate_stage(cfg, run, "init/weak_negatives", neg[names[w]], Q)
    neg["student"] = sft_stage(cfg, run, "init/student_neg", pos["student"],
                               list(zip(Q, weak_negatives, [None] * len(Q))), cfg.neg_sft_epochs, lr=cfg.neg_sft_lr)
    # Hard negative behaviour: each negative twin generates once; the release reuses them every round.
    negatives = {a: generate_stage(cfg, run, f"init/negatives_{a}", neg[a], Q) for a in ["student"] + names}
    evals = {"init": {a: evaluate_stage(cfg, run, f"eval/init/{a}", pos[a], test) for a in names + ["student"]}}
    return dict(w2s=w2s, test=test, Q=Q, names=names, pos=pos, teacher_bases=teacher_bases,
                student_base=student_base, weak_labels=weak_labels, negatives=negatives, evals=evals)


def _references(cfg, s, pos, initial):
    """Each agent's DPO reference this round (--reference)."""
    return {a: {"previous": pos[a], "init": initial[a],
                "base": s["student_base"] if a == "student" else s["teacher_bases"][s["names"].index(a)]}[cfg.reference]
            for a in pos}


def macpo_rounds(cfg, run, s, prefix=""):
    """Algorithm 1, step 2: T rounds of mutual positive behaviour augmentation, hard negatives and the
    contrastive update of every agent. -> {round: {agent: eval stage}}. `prefix` names a variant's stages.

    Ablations (paper section 6 names "-MP"; "-HN" inferred), each changing one ingredient:
      --no-mutual_positives  (-MP) every agent's positive is its own response to the prompt (the student's own
                             sample, teacher k's own sample) instead of the other side's; negatives unchanged.
      --no-hard_negatives    (-HN) the negative for prompt i is the negative twin's response to another prompt
                             (a fixed random derangement of the same negatives): the same negative behaviour, no
                             longer a familiar near-miss for this prompt."""
    Q, names, test = s["Q"], s["names"], s["test"]
    pos, initial, negatives = dict(s["pos"]), dict(s["pos"]), s["negatives"]
    if not cfg.hard_negatives:
        order = list(range(len(Q)))
        random.Random(run.seed(f"{prefix}derangement")).shuffle(order)
        other = {order[i]: order[(i + 1) % len(order)] for i in range(len(order))}     # never i itself (N > 1)
        negatives = {a: [v[other[i]] for i in range(len(Q))] for a, v in negatives.items()}
    evals = {"init": s["evals"]["init"]}
    for t in range(1, cfg.T + 1):
        r = f"{prefix}round{t}"
        # round 1's samples come from the initial agents, identical for every variant: share them
        g = f"round{t}" if t == 1 else r
        reference = _references(cfg, s, pos, initial)
        # (a) each weak teacher writes one response per weak-to-strong prompt
        teacher_responses = [generate_stage(cfg, run, f"{g}/generations_{n}", pos[n], Q) for n in names]
        # (c) the teachers' positive: the student's response, from before (default) or after its update
        if cfg.student_positive_from == "before" or not cfg.mutual_positives:
            student_responses = generate_stage(cfg, run, f"{g}/generations_student", pos["student"], Q)
        # (b) + (d) the student's positive: the teacher response it finds most familiar; its own twin's negative
        if cfg.mutual_positives:
            student_pairs = select_positives_stage(cfg, run, f"{r}/pairs_student", pos["student"], Q,
                                                   teacher_responses, negatives["student"], names)
        else:   # -MP
            student_pairs = list(zip(Q, student_responses, negatives["student"]))
        # (f) contrastive update of the strong student, continuing from its previous round
        pos["student"] = dpo_stage(cfg, run, f"{r}/student", pos["student"], reference["student"], student_pairs)
        if cfg.mutual_positives:
            if cfg.student_positive_from == "after":
                student_responses = generate_stage(cfg, run, f"{r}/generations_student", pos["student"], Q)
            teacher_pairs = teacher_pairs_stage(run, f"{r}/pairs_teachers", Q, student_responses, negatives, names)
        else:   # -MP
            teacher_pairs = {n: list(zip(Q, teacher_responses[k], negatives[n])) for k, n in enumerate(names)}
        # (f) contrastive update of every weak teacher
        for n in names:
            pos[n] = dpo_stage(cfg, run, f"{r}/{n}", pos[n], reference[n], teacher_pairs[n])
        evals[r] = {a: evaluate_stage(cfg, run, f"eval/{r}/{a}", pos[a], test) for a in names + ["student"]}
        print_signal(run, r, names + ["student"])
    return evals, pos


# ---------------------------------------------------------------------------------------------------------
# Baselines (../shared/paper.md section 5): same data, same initial models, the same number of rounds and the
# same update (macpo_loss: DPO + sft_weight x SFT on the chosen side) where they are iterative, so only the
# choice of training signal differs. They train the strong student only; the weak teachers stay as initialised.

def naive_sft(cfg, run, s, prefix):
    """The strong student SFT on the weak labels: Algorithm 1's initial student, evaluated alone."""
    return {"init": s["evals"]["init"]}, s["pos"]


def confident(cfg, run, s, prefix):
    """Burns et al. (2023)'s auxiliary confidence loss instead of plain SFT on the weak labels, from the same
    strong base for the same epochs (losses.confident_loss: token-level, the hardened prediction = argmax)."""
    student = sft_stage(cfg, run, f"{prefix}init/student", s["student_base"],
                        list(zip(s["Q"], s["weak_labels"], [None] * len(s["Q"]))), cfg.student_sft_epochs,
                        kind="confident")
    evals = {"init": dict(s["evals"]["init"], student=evaluate_stage(cfg, run, f"eval/{prefix}init/student",
                                                                     student, s["test"]))}
    return evals, dict(s["pos"], student=student)


def spin(cfg, run, s, prefix):
    """SPIN (Chen et al. 2024), iterated for T rounds: chosen = the weak label, rejected = the student's own
    sample from the previous round's model, which is also the DPO reference (--reference previous)."""
    Q, pos, initial = s["Q"], dict(s["pos"]), s["pos"]
    evals = {"init": s["evals"]["init"]}
    for t in range(1, cfg.T + 1):
        r = f"{prefix}round{t}"
        own = generate_stage(cfg, run, f"round{t}/generations_student" if t == 1 else f"{r}/generations_student",
                             pos["student"], Q)          # round 1: the initial student's samples, shared
        pos["student"] = dpo_stage(cfg, run, f"{r}/student", pos["student"],
                                   _references(cfg, s, pos, initial)["student"], list(zip(Q, s["weak_labels"], own)))
        evals[r] = {"student": evaluate_stage(cfg, run, f"eval/{r}/student", pos["student"], s["test"])}
        print_signal(run, r, ["student"])
    return evals, pos


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
    def build(folder):
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
    return [(r["prompt"], r["chosen"], r["rejected"]) for r in read_jsonl(run.stage(name, build) / "pairs.jsonl")]


def self_rewarding(cfg, run, s, prefix):
    """Self-Rewarding (Yuan et al. 2024), iterated for T rounds: --n_samples samples per prompt from the
    student, ranked by the student itself (self_judge_stage), best vs worst as a DPO pair."""
    Q, pos, initial = s["Q"], dict(s["pos"]), s["pos"]
    evals = {"init": s["evals"]["init"]}
    for t in range(1, cfg.T + 1):
        r = f"{prefix}round{t}"
        samples = [generate_stage(cfg, run, f"{r}/samples{j}", pos["student"], Q) for j in range(cfg.n_samples)]
        pairs = self_judge_stage(cfg, run, f"{r}/pairs_student", pos["student"], Q, samples)
        pos["student"] = dpo_stage(cfg, run, f"{r}/student", pos["student"],
                                   _references(cfg, s, pos, initial)["student"], pairs)
        evals[r] = {"student": evaluate_stage(cfg, run, f"eval/{r}/student", pos["student"], s["test"])}
        print_signal(run, r, ["student"])
    return evals, pos


METHODS = {"macpo": macpo_rounds, "sft": naive_sft, "confident": confident, "spin": spin,
           "self_reward": self_rewarding}


def variant(cfg):
    """The method's name with its ablations ("macpo", "macpo-mp", "spin", ...): its stages' folder prefix."""
    return cfg.method + ("-mp" if not cfg.mutual_positives else "") + ("-hn" if not cfg.hard_negatives else "")


def ceiling_stage(cfg, run, s):
    """The ceiling: the same strong base trained by SFT on the ground-truth responses of Q_w2s -> eval stage."""
    ceiling = sft_stage(cfg, run, "ceiling/student", s["student_base"], [(e.prompt, e.chosen, None) for e in s["w2s"]],
                        cfg.student_sft_epochs)
    return evaluate_stage(cfg, run, "eval/ceiling/student", ceiling, s["test"])


def scores(run, stage, scorer):
    """Per-prompt scores of an eval stage's generations (None when not evaluated or nothing scores them)."""
    if stage is None or scorer is None:
        return None
    rows = read_jsonl(run.out / stage / "generations.jsonl")
    return scorer([r["prompt"] for r in rows], [r["response"] for r in rows])


def mean_scores(run, evals, scorer):
    """{round: {agent: eval stage}} -> {round: {agent: mean score or None}}."""
    return {r: {a: (lambda v: None if v is None else sum(v) / len(v))(scores(run, stage, scorer))
                for a, stage in row.items()} for r, row in evals.items()}


def kind_of(cfg):
    """prompt turns -> its kind, by which every score is also reported (toy.kind on the toy task), or None."""
    if cfg.task != "toy":
        return None
    import toy
    return toy.kind


def kind_means(values, prompts, kind):
    """Per-prompt scores -> {prompt kind: mean score}, kinds sorted (None without scores or kinds)."""
    if values is None or kind is None:
        return None
    groups = {}
    for p, v in zip(prompts, values):
        groups.setdefault(kind(p), []).append(v)
    return {k: statistics.fmean(groups[k]) for k in sorted(groups)}


# ---------------------------------------------------------------------------------------------------------
# The training-signal report (report.py): what each agent was trained on, judged by the run's scorers.

def print_signal(run, r, agents):
    """After round r: one line per agent and scorer (chosen better than rejected, the student's pick)."""
    for scorer in run.score.scorers:
        row = report.run_signal(run.out, {r: agents}, scorer).get(r)
        if row and parallel.is_main():
            print("\n".join(report.format_lines(r, row, scorer)), flush=True)


def signal_blocks(cfg, run, s, evals):
    """{scorer: {"signal": {round: {agent: ...}}, "negatives": {agent: mean score of its negative twin's
    outputs}, "weak_labels": mean score}} for every scorer of the run ({} without one)."""
    rounds = {r: list(row) for r, row in evals.items() if r not in ("init", "ceiling")}
    negatives = {a: run.score(s["Q"], v) for a, v in s["negatives"].items()}
    weak = run.score(s["Q"], s["weak_labels"])
    return {scorer: {"signal": report.run_signal(run.out, rounds, scorer, kind_of(cfg)),
                     "negatives": {a: statistics.fmean(v[scorer]) for a, v in negatives.items()},
                     "weak_labels": statistics.fmean(weak[scorer])} for scorer in run.score.scorers}


def check_premises(cfg, run, s):
    """The toy test bed's premises (toy.premises: partial, complementary teachers, a strong student, a reachable
    ceiling, real hard negatives), measured on this seed's agents after initialisation and printed before
    round 1 -> toy.premises' list, or None off the toy task or without evaluation. Runs the ceiling's stages."""
    if cfg.task != "toy" or not cfg.evaluate or not s["test"]:
        return None
    import toy
    measured = {a: scores(run, stage, evaluate.gold_scores) for a, stage in s["evals"]["init"].items()}
    if cfg.ceiling:
        measured["ceiling"] = scores(run, ceiling_stage(cfg, run, s), evaluate.gold_scores)
    premises = toy.premises([ex.prompt for ex in s["test"]], measured,
                            {a: (s["Q"], v) for a, v in s["negatives"].items()}, cfg.weak_label_teacher)
    if parallel.is_main():
        failed = [p["premise"] for p in premises if not p["pass"]]
        print(f"test-bed premises (toy.premises, {len(s['test'])} test prompts): "
              + ("all hold" if not failed else f"{len(failed)} of {len(premises)} fail: {', '.join(failed)}"))
        for p in premises:
            print(f"  {'ok  ' if p['pass'] else 'FAIL'} {p['premise']:<24} {p['value']:.3f}  ({p['op']} {p['threshold']})")
    return premises


def macpo(cfg):
    """One method (--method, default MACPO's Algorithm 1) on one run folder -> ({round: {agent: mean score}},
    {round: {agent: {prompt kind: mean score}}}); both, and the training signal, go to results.json."""
    run = Run(cfg)
    s = initialise(cfg, run)
    premises = check_premises(cfg, run, s)          # before round 1: is the toy bed a weak-to-strong setting?
    name = variant(cfg)
    evals, pos = METHODS[cfg.method](cfg, run, s, "" if name == "macpo" else f"{name}/")
    if cfg.ceiling:
        evals["ceiling"] = {"student": ceiling_stage(cfg, run, s)}
    gold = evaluate.gold_scores if cfg.task == "toy" else None
    per_prompt = {r: {a: scores(run, stage, gold) for a, stage in row.items()} for r, row in evals.items()}
    results = {r: {a: None if v is None else statistics.fmean(v) for a, v in row.items()}
               for r, row in per_prompt.items()}
    test_prompts = [ex.prompt for ex in s["test"]]             # the order of every eval stage's generations
    by_kind = {r: {a: kind_means(v, test_prompts, kind_of(cfg)) for a, v in row.items()}
               for r, row in per_prompt.items()}
    blocks = signal_blocks(cfg, run, s, evals)
    first = next(iter(blocks), None)         # the first scorer's block also sits at the top level
    write_json(run.out / "results.json", {"metric": "gold reward" if cfg.task == "toy" else None, "method": name,
                                          "results": results, "results_by_kind": by_kind, "premises": premises,
                                          "final": {a: run.name(p) for a, p in pos.items()},
                                          "signal_scorer": first, **(blocks[first] if first else {}),
                                          "signal_by_scorer": blocks})
    if first and blocks[first]["signal"] and parallel.is_main():
        try:
            report.plot_signal(blocks[first]["signal"], run.out / "signal.png", first, f"training signal: {name}")
        except ImportError:
            print("matplotlib is not installed: no signal.png (pip install matplotlib)", file=sys.stderr)
    return results, by_kind


# ---------------------------------------------------------------------------------------------------------
# The table: every method and ablation on the same seeds, each seed one run folder (out/seed{S}) whose bases,
# init stages and round-1 samples are computed once and shared by every method.

TABLE_METHODS = {        # name: the flags that differ from MACPO's
    "macpo": {}, "sft": {"method": "sft"}, "confident": {"method": "confident"}, "spin": {"method": "spin"},
    "self_reward": {"method": "self_reward"}, "macpo-mp": {"mutual_positives": False},
    "macpo-hn": {"hard_negatives": False}, "macpo-k1": {"n_teachers": 1}, "macpo-k2": {"n_teachers": 2},
    "macpo-base": {"reference": "base"}}        # MACPO with the release's DPO reference, the raw base model


def table(cfg, seeds, methods, scorer_name="gold", tie_margin=0.0):
    """Run `methods` (TABLE_METHODS names) for every seed; write out/results.md, out/rounds.png, out/table.json."""
    t0 = time.time()
    scorer = evaluate.make_scorer(scorer_name, cfg.device, cfg.score_batch_size, cfg.max_length)
    per_seed, reference = {m: {} for m in methods}, {}
    cache = str(toy_base_cache(cfg))     # every seed's folder is OUT/seed{S}; the toy bases sit beside OUT
    for seed in seeds:
        scfg = dataclasses.replace(cfg, seed=seed, out=str(Path(cfg.out) / f"seed{seed}"), toy_base_cache=cache)
        run = Run(scfg)
        # the seed's shared agents first: the weak supervisor, the ceiling, the bed's premises (printed)
        s = initialise(scfg, run)
        premises = check_premises(scfg, run, s)
        test_prompts = [ex.prompt for ex in s["test"]]
        blocks = signal_blocks(scfg, run, s, {})
        weak = scores(run, s["evals"]["init"][s["names"][cfg.weak_label_teacher]], scorer)
        ceiling = scores(run, ceiling_stage(scfg, run, s), scorer)
        reference[seed] = {"weak": statistics.fmean(weak), "ceiling": statistics.fmean(ceiling),
                           "weak_kinds": kind_means(weak, test_prompts, kind_of(cfg)),
                           "ceiling_kinds": kind_means(ceiling, test_prompts, kind_of(cfg)),
                           "negatives": {name: b["negatives"] for name, b in blocks.items()},
                           "weak_labels": {name: b["weak_labels"] for name, b in blocks.items()},
                           "premises": premises}
        for m in methods:
            mcfg = dataclasses.replace(scfg, **TABLE_METHODS[m])
            s = initialise(mcfg, run)
            evals, _ = METHODS[mcfg.method](mcfg, run, s, "" if m == "macpo" else f"{m}/")
            means = mean_scores(run, evals, scorer)
            blocks = signal_blocks(mcfg, run, s, evals)
            per_seed[m][seed] = {
                "rounds": [{"student": row["student"], "teachers": statistics.fmean(
                    row.get(n, means["init"][n]) for n in s["names"])} for row in means.values()],
                "scores": (final := scores(run, evals[list(evals)[-1]]["student"], scorer)),
                "kinds": kind_means(final, test_prompts, kind_of(mcfg)),
                "signal": {name: b["signal"] for name, b in blocks.items()}}
        del run
    summary = evaluate.summarise(per_seed, reference, "macpo", tie_margin)
    out = Path(cfg.out)
    write_json(out / "table.json", {"per_seed": per_seed, "reference": reference, "summary": summary})
    header = (f"# Weak-to-strong results: {cfg.task}, {len(seeds)} seed(s) ({', '.join(map(str, seeds))}), "
              f"K = {cfg.K} teachers, T = {cfg.T} rounds, scorer: {scorer_name}\n\n"
              f"Sizes: {cfg.n_init} init / {cfg.n_w2s} weak-to-strong / {cfg.n_test} test prompts. "
              f"Wall time {time.time() - t0:.0f} s. Written by `python macpo.py table` (run.sh table); "
              f"per-seed numbers in table.json, the plot in rounds.png.")
    text = evaluate.results_markdown(summary, header, tie_margin)
    if all(reference[sd]["premises"] for sd in seeds):
        text += "\n" + evaluate.premises_markdown({sd: reference[sd]["premises"] for sd in seeds},
                                                  summary["weak"], summary["ceiling"], cfg.n_test)
    if kind_of(cfg):
        text += "\n" + evaluate.kinds_markdown({m: [per_seed[m][sd]["kinds"] for sd in seeds] for m in methods},
                                               [reference[sd]["weak_kinds"] for sd in seeds],
                                               [reference[sd]["ceiling_kinds"] for sd in seeds])
    signal_name = next(iter(per_seed[methods[0]][seeds[0]]["signal"]), None)    # none on ranks that do not write
    if signal_name:                 # what each method trained on, mean over seeds (report.py)
        signal = {m: report.mean_over_seeds([per_seed[m][sd]["signal"][signal_name] for sd in seeds])
                  for m in methods}
        twins = {a: statistics.fmean(reference[sd]["negatives"][signal_name][a] for sd in seeds)
                 for a in reference[seeds[0]]["negatives"][signal_name]}
        text += ("\n" + report.table_markdown(signal, signal_name) + "\nWeak labels' mean score: "
                 f"{statistics.fmean(reference[sd]['weak_labels'][signal_name] for sd in seeds):.3f}; the negative "
                 "twins' outputs (the hard negatives): " + ", ".join(f"{a} {v:.3f}" for a, v in twins.items())
                 + " (mean over seeds).\n")
        if "macpo" in signal and signal["macpo"] and parallel.is_main():
            try:
                report.plot_signal(signal["macpo"], out / "signal.png", signal_name,
                                   "training signal: MACPO, mean over seeds")
            except ImportError:
                pass                # said once below, for rounds.png
    write_text(out / "results.md", text)
    try:
        evaluate.plot_rounds(summary, out / "rounds.png", "gold reward" if scorer_name == "gold" else scorer_name)
    except ImportError:
        print("matplotlib is not installed: no rounds.png (pip install matplotlib)", file=sys.stderr)
    return text


def format_table(results, teachers):
    """Gold reward per agent (columns) after init, each round and the ceiling (rows), as a Markdown table."""
    cols = teachers + ["student"]
    lines = ["| stage | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for stage, row in results.items():
        lines.append(f"| {stage} | " + " | ".join("-" if row.get(c) is None else f"{row[c]:.3f}" for c in cols) + " |")
    return "\n".join(lines)


def format_kind_table(by_kind):
    """{stage: {agent: {kind: mean}}} -> a Markdown table, one row per stage and agent, one column per kind."""
    kinds = list(dict.fromkeys(k for row in by_kind.values() for v in row.values() if v for k in v))
    lines = ["| stage | agent | " + " | ".join(kinds) + " |", "|---" * (len(kinds) + 2) + "|"]
    for stage, row in by_kind.items():
        for agent, v in row.items():
            if v:
                lines.append(f"| {stage} | {agent} | " + " | ".join(f"{v[k]:.3f}" if k in v else "-" for k in kinds)
                             + " |")
    return "\n".join(lines)


def main(argv=None):
    """python macpo.py [flags]: one run (--method); `eval FOLDER ...`: score saved generations (evaluate.py);
    `table --seeds 0,1,2 --methods macpo,sft,... [flags]`: every method and ablation, results.md + rounds.png."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["eval"]:
        return evaluate.main(argv[1:])
    sub = argv[:1] == ["table"]
    if sub:
        extra = argparse.ArgumentParser(prog="macpo.py table", add_help=False)
        extra.add_argument("--seeds", default="0,1,2", help="one run folder per seed: OUT/seed{S}")
        extra.add_argument("--methods", default=",".join(TABLE_METHODS), help=f"of {', '.join(TABLE_METHODS)}")
        extra.add_argument("--scorer", default="gold", help="gold (toy task) or a reward model name or folder")
        extra.add_argument("--tie_margin", type=float, default=0.0, help="win-rate score differences up to this tie")
        table_args, argv = extra.parse_known_args(argv[1:])
        unknown = [m for m in table_args.methods.split(",") if m not in TABLE_METHODS]
        if unknown:
            sys.exit(f"error: unknown --methods {', '.join(unknown)}; choose from {', '.join(TABLE_METHODS)}")
    cfg = parse_config(argv)
    if cfg.device == "auto":
        cfg.device = default_device()
    cfg.device = parallel.setup(cfg.device)          # torchrun: join the process group, one GPU per rank
    if cfg.device == "cpu" and parallel.world_size() == 1:
        torch.set_num_threads(os.cpu_count() or 1)
    t0 = time.time()
    try:
        if sub:
            print(table(cfg, [int(x) for x in table_args.seeds.split(",")], table_args.methods.split(","),
                        table_args.scorer, table_args.tie_margin))
            print(f"{cfg.out}: results.md, rounds.png, table.json ({time.time() - t0:.0f} s)")
            return
        results, by_kind = macpo(cfg)
    except (data.DataError, ModelLoadError, NonFiniteError) as e:
        sys.exit(f"error: {e}")
    except OSError as e:       # a full disk or a lost mount: the stage being written stays *.partial, never DONE
        sys.exit(f"error: {e} (while writing under {cfg.out}). Every finished stage is intact; fix the cause "
                 f"(free disk space) and run the same command again to resume.")
    print(format_table(results, [f"teacher{k}" for k in range(cfg.K)]))
    if any(v for row in by_kind.values() for v in row.values()):
        print("\nper prompt kind:\n" + format_kind_table(by_kind))
    print(f"\n{cfg.out}: results.json, metrics.jsonl, checkpoints and generations per stage "
          f"({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
