"""MACPO: weak-to-strong alignment by multi-agent contrastive preference optimization (Lyu et al., ICLR 2025).

K weak teachers and one strong student learn from each other for T rounds. Each agent has a negative twin,
fine-tuned on negative data, whose outputs are the agent's familiar (hard) negatives; each round the student
takes, per prompt, the teacher response it finds most familiar (lowest perplexity) as its positive, the
teachers take the student's response as theirs, and every agent is updated with DPO + 0.2 x SFT.

    bash run.sh toy                                   # the built-in offline task (K = 3, T = 3), CPU, minutes
    python macpo.py --out runs/toy                    # the same, without run.sh's venv set-up
    python macpo.py --task hh-helpful --teachers A,B,C --student S --data_dir ../shared/data/hh-rlhf ...

Every stage writes into its own folder under --out and is marked done last; running the same command again
skips finished stages, so a killed run continues where it stopped. Algorithm 1 is `initialise` (step 1) and
`macpo_round` (step 2) below; the baselines are in baselines.py.
"""
import argparse
import dataclasses
import os
import random
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import baselines
import data
import evaluate
import lora
import parallel
import report
from stages import (Run, RunError, dataset_requests, dpo_stage, evaluate_stage, generate_stage, load_task, read_jsonl, render, samples,
                    select_positives_stage, sft_stage, toy_base_cache, toy_bases, write_json, write_text)
from train import ModelLoadError, NonFiniteError, check_model


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
    data_dir: str = ""                  # local dataset folder (hh: {subset}/{split}.jsonl.gz; pku:
                                        # data/Alpaca-7B/{split}.jsonl)
    data_file: str = ""                 # task=file: your own JSONL (prompt/chosen/rejected) or LLaMA-Factory JSON
    cache_dir: str = ""                 # the hub cache hh / pku files are downloaded into when not in --data_dir;
                                        # "" = huggingface_hub's own (HF_HUB_CACHE, else HF_HOME/hub)
    train_split: str = "train"          # split the init and weak-to-strong prompts come from; "test" splits the
                                        # test file three ways (for a --data_dir holding test files only)
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
    negative_temperature: float = -1.0  # the negative twins' generations (hard negatives, and the weak twin's
                                        # answers the student's twin learns from); -1: --temperature. Not in the
                                        # paper. Toy: 0, the twin's most familiar answer (measured: sampled at 0.3,
                                        # teacher0's twin was well formed on 59% of Q_w2s, greedy on 97%, and the
                                        # student's twin, trained on those samples, copied their malformed forms)
    gen_batch_size: int = 32
    score_batch_size: int = 32          # perplexity and reference log-prob batches
    # the toy task (task=toy): tiny Llamas whose bases are pre-trained here, each on its own share of the
    # knowledge (toy.py), to convergence; cached by a hash of their recipe, independent of --seed
    toy_teacher_ops: str = "+,-,*"                   # the operations each weak teacher's base sees (the student: all)
    toy_teacher_sizes: str = "64x2,64x2,64x2"       # hidden x layers per weak teacher
    toy_student_size: str = "80x2"                   # hidden x layers of the strong student
    toy_teacher_pretrain_steps: str = "1200,1200,1200"   # pre-training steps per weak teacher (measured: one
                                                     # operation at ~0.95 after 900-1,200 steps of 64, 64x2)
    toy_student_pretrain_steps: int = 1200           # the student sees three operations: 3x the batch (measured:
                                                     # final loss 0.021 at 1,200 steps, 0.015 at 1,500; every premise holds)
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
    # method: MACPO or a baseline (baselines.py), from the same initial agents and data
    method: str = "macpo"               # macpo | sft (naive SFT on weak labels) | confident (Burns et al. 2023) |
                                        # spin (Chen et al. 2024) | self_reward (Yuan et al. 2024)
    mutual_positives: bool = True       # --no-mutual_positives: the -MP ablation (OWN_POSITIVES)
    hard_negatives: bool = True         # --no-hard_negatives: the -HN ablation (deranged_negatives)
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
        # --data_dir and --data-dir alike, as HfArgumentParser accepts
        names = dict.fromkeys([f"--{f.name}", f"--{f.name.replace('_', '-')}"])
        if f.type in (bool, "bool"):
            parser.add_argument(*names, dest=f.name, action=argparse.BooleanOptionalAction, default=f.default)
        else:
            parser.add_argument(*names, dest=f.name, type=type(f.default), default=f.default)
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
    for name in ("temperature", "eval_temperature"):
        if not 0 <= getattr(cfg, name) < float("inf"):
            p.append(f"--{name} must be 0 (greedy) or a positive finite number, got {getattr(cfg, name)}")
    if not (cfg.negative_temperature == -1 or 0 <= cfg.negative_temperature < float("inf")):
        p.append(f"--negative_temperature must be -1 (= --temperature), 0 (greedy) or a positive finite number, "
                 f"got {cfg.negative_temperature}")
    if cfg.beta <= 0 or cfg.sft_weight < 0 or not 0 <= cfg.label_smoothing < 0.5:
        p.append("--beta must be > 0, --sft_weight >= 0, --label_smoothing in [0, 0.5)")
    return p


# ---------------------------------------------------------------------------------------------------------
# Algorithm 1 (Lyu et al. 2025, section 2). Step 1 initialises every agent; step 2 is T rounds of
# macpo_round. README, "Algorithm 1", maps each line to the release's scripts and files.

def check_models(cfg):
    """Every teacher and the student exist (config and tokenizer load) and the prompt template fits in
    --max_prompt_length with each one's tokenizer: checked before any training, not when the stage comes.
    Every model that cannot be found is named in one error, with the dataset files still missing."""
    missing = []
    for name in cfg.teachers.split(",") + [cfg.student]:
        try:
            tokenizer = check_model(name, cfg.trust_remote_code)
        except ModelLoadError as e:
            missing.append(str(e))
            continue
        n = len(tokenizer(render(cfg, [{"role": "user", "content": ""}], tokenizer))["input_ids"])
        if n >= cfg.max_prompt_length:
            raise data.DataError(f"--max_prompt_length {cfg.max_prompt_length} leaves no room for a prompt: the "
                                 f"{cfg.template} template alone is {n} tokens with {name}'s tokenizer; raise "
                                 f"--max_prompt_length (and --max_length) above {n}, or pass --system ''")
    return missing


@dataclass
class Setup:
    """What Algorithm 1's step 1 leaves, and every method (MACPO, its ablations, the baselines) starts from."""
    w2s: list           # the weak-to-strong split (data.Example; the ceiling trains on its gold responses)
    test: list          # the test split
    Q: list             # Q_w2s: its prompts (turn lists), in the order of every response list below
    teachers: list      # ["teacher0", ..., "teacher{K-1}"]
    init: dict          # agent -> checkpoint of its positive model after initialisation
    bases: dict         # agent -> its base model
    weak_labels: list   # the weak-label teacher's responses to Q: the naive-SFT student's data
    negatives: dict     # agent -> its negative twin's responses to Q: the hard negatives, generated once
    evals: dict         # agent -> eval stage of its initial model

    def reference(self, mode, agent, previous):
        """The agent's DPO reference (--reference): the model at the round's start, its initial model, or its
        base (the release's)."""
        return {"previous": previous, "init": self.init[agent], "base": self.bases[agent]}[mode]


def initialise(cfg, run):
    """Algorithm 1, step 1: every agent initialised, the weak labels and the hard negatives -> Setup.
    Shared by every method: the baselines start from the same weak teachers, weak labels and student."""
    # every dataset file and model the run needs, before any training: the missing ones named in one error
    missing = data.missing_dataset_files(dataset_requests(cfg), cfg.data_dir or None, cfg.cache_dir or None)
    task = None if missing else load_task(cfg)                 # D_init (gold pairs), Q_w2s, test prompts
    missing += check_models(cfg) if cfg.teachers != "toy" else []
    if missing:
        raise ModelLoadError(f"{len(missing)} of the run's files or models are missing:\n" + "\n".join(missing))
    init, w2s, test = task
    Q = [ex.prompt for ex in w2s]
    names = [f"teacher{k}" for k in range(cfg.K)]
    bases = toy_bases(cfg, run) if cfg.task == "toy" else dict(zip(names + ["student"],
                                                                    cfg.teachers.split(",") + [cfg.student]))
    weak = names[cfg.weak_label_teacher]
    gold_chosen, gold_rejected = [(e.prompt, e.chosen, None) for e in init], [(e.prompt, e.rejected, None) for e in init]

    # Weak teachers: the positive model by SFT on D_init's chosen responses; its negative twin by SFT on the
    # rejected ones, continued from the positive model (the release does so for the student's twin).
    pos = {n: sft_stage(cfg, run, f"init/{n}", bases[n], gold_chosen, cfg.teacher_sft_epochs) for n in names}
    neg = {n: sft_stage(cfg, run, f"init/{n}_neg", pos[n], gold_rejected, cfg.neg_sft_epochs, lr=cfg.neg_sft_lr)
           for n in names}
    # Weak labels: one teacher's responses to Q_w2s. The strong student: SFT on them (alone, this is the naive
    # SFT baseline). Its negative twin: continued SFT on the weak teacher's twin's responses to Q_w2s.
    weak_labels = generate_stage(cfg, run, "init/weak_labels", pos[weak], Q)
    pos["student"] = sft_stage(cfg, run, "init/student", bases["student"], [(q, y, None) for q, y in zip(Q, weak_labels)],
                               cfg.student_sft_epochs)
    negative_temperature = None if cfg.negative_temperature < 0 else cfg.negative_temperature
    weak_negatives = generate_stage(cfg, run, "init/weak_negatives", neg[weak], Q, negative_temperature)
    neg["student"] = sft_stage(cfg, run, "init/student_neg", pos["student"],
                               [(q, y, None) for q, y in zip(Q, weak_negatives)], cfg.neg_sft_epochs, lr=cfg.neg_sft_lr)
    # Hard negative behaviour: each twin answers Q_w2s once; the release reuses these every round.
    negatives = {a: generate_stage(cfg, run, f"init/negatives_{a}", neg[a], Q, negative_temperature)
                 for a in ["student"] + names}
    evals = {a: evaluate_stage(cfg, run, f"eval/init/{a}", pos[a], test) for a in names + ["student"]}
    return Setup(w2s, test, Q, names, pos, bases, weak_labels, negatives, evals)


# The two ingredients an ablation swaps (the paper's section 6 names "-MP"; "-HN" is inferred): where each
# agent's positive comes from, and which negative it is contrasted with. A positive source is a pair of
# functions (the student's positive, a teacher's positive), each -> one response per prompt.

def perplexity_pick(cfg, run, r, s, agents, responses, agent):
    """(b) The student's positive: the teacher response it finds most familiar,
    y+_i = argmin_k PPL_student(y_i^k | x_i), scored by the student at the round's start (every perplexity is
    kept in ROUND/pairs_student)."""
    return select_positives_stage(cfg, run, f"{r}/pairs_student", agents["student"], s.Q,
                                  [responses[n] for n in s.teachers], s.teachers)


def student_response(cfg, run, r, s, agents, responses, agent):
    """(c) A teacher's positive: the student's response, for every teacher (no filter)."""
    return responses["student"]


def own_response(cfg, run, r, s, agents, responses, agent):
    """-MP (--no-mutual_positives): the agent's own response."""
    return responses[agent]


MUTUAL_POSITIVES = (perplexity_pick, student_response)
OWN_POSITIVES = (own_response, own_response)


def hard_negatives(cfg, run, s):
    """(d) Agent a's negative for prompt i: its own negative twin's response to prompt i."""
    return s.negatives


def deranged_negatives(cfg, run, s):
    """-HN (--no-hard_negatives): the twin's response to another prompt (a fixed random derangement of the
    same negatives): the same negative behaviour, no longer a familiar near miss for this prompt."""
    order = list(range(len(s.Q)))
    random.Random(run.seed(f"{variant(cfg)}/derangement")).shuffle(order)
    other = {order[i]: order[(i + 1) % len(order)] for i in range(len(order))}         # never i itself (N > 1)
    return {a: [v[other[i]] for i in range(len(s.Q))] for a, v in s.negatives.items()}


def macpo_round(cfg, run, r, s, agents, positives, negatives):
    """Algorithm 1, step 2, round r: every agent samples, takes its positives and is updated by DPO +
    sft_weight x SFT on the pairs (x_i, positive, negative) (e), (f) -> {agent: checkpoint after the round}."""
    student_positive, teacher_positive = positives
    agents = dict(agents)
    # (a) every agent answers each weak-to-strong prompt once: the teachers, and the student before its update
    responses = {a: samples(cfg, run, agents[a], s.Q) for a in agents}
    # (b) the student's positive; (f) its update, from the previous round's model
    positive = student_positive(cfg, run, r, s, agents, responses, "student")
    agents["student"] = dpo_stage(cfg, run, f"{r}/student", agents["student"],
                                  s.reference(cfg.reference, "student", agents["student"]),
                                  list(zip(s.Q, positive, negatives["student"])))
    if cfg.student_positive_from == "after":        # the teachers learn from the updated student instead
        responses["student"] = samples(cfg, run, agents["student"], s.Q)
    # (c) each teacher's positive; (f) its update, against its own twin's negatives
    for n in s.teachers:
        positive = teacher_positive(cfg, run, r, s, agents, responses, n)
        agents[n] = dpo_stage(cfg, run, f"{r}/{n}", agents[n], s.reference(cfg.reference, n, agents[n]),
                              list(zip(s.Q, positive, negatives[n])))
    return agents


def macpo_rounds(cfg, run, s, prefix=""):
    """Algorithm 1, step 2: T rounds of macpo_round, each agent evaluated after every round ->
    ({round: {agent: eval stage}}, {agent: final checkpoint}). `prefix` names a variant's stages."""
    positives = MUTUAL_POSITIVES if cfg.mutual_positives else OWN_POSITIVES
    negatives = (hard_negatives if cfg.hard_negatives else deranged_negatives)(cfg, run, s)
    agents, evals = dict(s.init), {"init": s.evals}
    for t in range(1, cfg.T + 1):
        r = f"{prefix}round{t}"
        agents = macpo_round(cfg, run, r, s, agents, positives, negatives)
        evals[r] = {a: evaluate_stage(cfg, run, f"eval/{r}/{a}", agents[a], s.test) for a in agents}
        report.print_round(run, r, list(agents))
    return evals, agents


METHODS = {"macpo": macpo_rounds, **baselines.METHODS}


def variant(cfg):
    """The method's name with its ablations ("macpo", "macpo-mp", "spin", ...): its stages' folder prefix."""
    return cfg.method + ("-mp" if not cfg.mutual_positives else "") + ("-hn" if not cfg.hard_negatives else "")


def ceiling_stage(cfg, run, s):
    """The ceiling: the same strong base trained by SFT on the ground-truth responses of Q_w2s -> eval stage."""
    ceiling = sft_stage(cfg, run, "ceiling/student", s.bases["student"], [(e.prompt, e.chosen, None) for e in s.w2s],
                        cfg.student_sft_epochs)
    return evaluate_stage(cfg, run, "eval/ceiling/student", ceiling, s.test)


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

def signal_blocks(cfg, run, s, evals):
    """{scorer: {"signal": {round: {agent: ...}}, "negatives": {agent: mean score of its negative twin's
    outputs}, "weak_labels": mean score}} for every scorer of the run ({} without one)."""
    rounds = {r: list(row) for r, row in evals.items() if r not in ("init", "ceiling")}
    negatives = {a: run.score(s.Q, v) for a, v in s.negatives.items()}
    weak = run.score(s.Q, s.weak_labels)
    return {scorer: {"signal": report.run_signal(run.out, rounds, scorer, kind_of(cfg)),
                     "negatives": {a: statistics.fmean(v[scorer]) for a, v in negatives.items()},
                     "weak_labels": statistics.fmean(weak[scorer])} for scorer in run.score.scorers}


def check_premises(cfg, run, s):
    """The toy test bed's premises (toy.premises: partial, complementary teachers, a strong student, a reachable
    ceiling, real hard negatives), measured on this seed's agents after initialisation and printed before
    round 1 -> toy.premises' list, or None off the toy task or without evaluation. Runs the ceiling's stages."""
    if cfg.task != "toy" or not cfg.evaluate or not s.test:
        return None
    import toy
    measured = {a: scores(run, stage, evaluate.gold_scores) for a, stage in s.evals.items()}
    if cfg.ceiling:
        measured["ceiling"] = scores(run, ceiling_stage(cfg, run, s), evaluate.gold_scores)
    # each agent's own sampled responses to Q_w2s, against which its twin's are near misses: the stages round 1
    # samples anyway (same names, so computed once)
    own = {a: samples(cfg, run, s.init[a], s.Q) for a in s.negatives}
    premises = toy.premises([ex.prompt for ex in s.test], measured,
                            {a: (s.Q, v, own[a]) for a, v in s.negatives.items()}, cfg.weak_label_teacher)
    if parallel.is_main():
        failed = [p["premise"] for p in premises if not p["pass"]]
        print(f"test-bed premises (toy.premises, {len(s.test)} test prompts): "
              + ("all hold" if not failed else f"{len(failed)} of {len(premises)} fail: {', '.join(failed)}"))
        for p in premises:
            print(f"  {'ok  ' if p['pass'] else 'FAIL'} {p['premise']:<24} {p['value']:.3f}  "
                  f"({'reported' if p['op'] == 'report' else p['op'] + ' ' + str(p['threshold'])})")
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
    test_prompts = [ex.prompt for ex in s.test]             # the order of every eval stage's generations
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
        test_prompts = [ex.prompt for ex in s.test]
        blocks = signal_blocks(scfg, run, s, {})
        weak = scores(run, s.evals[s.teachers[cfg.weak_label_teacher]], scorer)
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
                    row.get(n, means["init"][n]) for n in s.teachers)} for row in means.values()],
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
        cfg.device = parallel.default_device()
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
    except (data.DataError, ModelLoadError, NonFiniteError, RunError) as e:
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
