"""MACPO: weak-to-strong alignment by multi-agent contrastive preference optimization (Lyu et al., ICLR 2025).

K weak teachers and one strong student learn from each other for T rounds. Each agent has a negative twin,
fine-tuned on negative data, whose outputs are the agent's familiar (hard) negatives; each round the student
takes, per prompt, the teacher response it finds most familiar (lowest perplexity) as its positive, the
teachers take the student's response as theirs, and every agent is updated with DPO + 0.2 x SFT.

    bash run.sh toy          # the main job: the built-in offline toy task with its tuned flags (run.sh), CPU
    python macpo.py --help   # every flag, grouped, with its meaning and reason (the Config below)
    python macpo.py --task hh-helpful --teachers A,B,C --student S --data_dir ../shared/data/hh-rlhf ...

`python macpo.py` with no flags runs the toy task at the Config defaults below (the release's recipe: full
fine-tuning, sampled negatives), not with run.sh's toy flags. A killed run resumes where it stopped: every
stage is a folder under --out, marked done last. Algorithm 1 is `initialise` (step 1) and `macpo_round`
(step 2); the baselines are in baselines.py, what a run reports in report.py.
"""
import os
import random
import sys
import time
from dataclasses import dataclass

import torch

import baselines
import data
import evaluate
import flags
import parallel
import report
import toy
from data import ModelLoadError
from generate import perplexity
from stages import (Run, RunError, check_models, dataset_requests, dpo_stage, evaluate_stage, generate_stage,
                    load_agent, load_task, read_jsonl, render, samples, scored, sft_stage, write_jsonl)
from train import NonFiniteError


# ---------------------------------------------------------------------------------------------------------
# Configuration: every field a flag (--name value) whose --help is its comment, each "# --- group" a help group
# (flags.flag_help reads this source). run.sh's presets are sets of these flags; results/README.md measures
# the toy preset's values.

@dataclass
class Config:
    # --- run: where outputs go, on which device, how many processes
    out: str = "runs/toy"               # run folder: checkpoints, generations, pairs, metrics.jsonl, results.json
    seed: int = 0                       # every stage derives its own seed from this and its name
    device: str = "auto"                # auto = cuda if available, else cpu
    dtype: str = "auto"                 # weights: auto (bfloat16 on cuda, float32 on cpu) | float32 | bfloat16
    trust_remote_code: bool = False     # let transformers run code shipped with a hub model; off unless asked
    parallel: str = "ddp"               # under torchrun: ddp (full copies, gradients averaged) | fsdp (sharded)
    # --- task and data: which prompts and preference pairs, rendered how
    task: str = "toy"                   # toy | hh-helpful | hh-harmless | pku | file
    data_dir: str = ""                  # local dataset folder, e.g. ../shared/data/hh-rlhf ("" = the hub)
    data_file: str = ""                 # task=file: your own JSONL (prompt/chosen/rejected) or LLaMA-Factory JSON
    cache_dir: str = ""                 # hub cache for dataset files; "" = huggingface_hub's own (HF_HUB_CACHE)
    train_split: str = "train"          # split of D_init and Q_w2s; "test" cuts the test file three ways
    pku_order: str = "safer"            # PKU-SafeRLHF pair order: safer (the paper's harmlessness) | better
    n_init: int = 1500                  # weak-teacher initialisation pairs D_init (paper: 5,000)
    n_w2s: int = 1500                   # weak-to-strong prompts Q_w2s (paper: 5,000)
    n_test: int = 400                   # test prompts (paper: 2,000 HH, 1,000 PKU)
    template: str = "vicuna"            # prompt template: vicuna (release, HH) | alpaca (release, PKU) | chat | hh
    system: str = "default"             # system line: "default" = the template's own, "" = none
    max_length: int = 1024              # prompt + response tokens (release: LLaMA-Factory's cutoff_len 1024)
    max_prompt_length: int = 512        # prompt tokens kept (from the end: the turn being answered) when too long
    # --- agents: the K weak teachers, the strong student, the rounds
    teachers: str = "toy"               # model names or folders, one per weak teacher; toy = tiny Llamas (toy.py)
    n_teachers: int = 3                 # K for --teachers toy (paper: 3)
    student: str = "toy"                # strong student model name or folder; "toy" = a tiny Llama pre-trained here
    rounds: int = 0                     # T; 0 means T = K, as released (3 stages for 3 teachers)
    weak_label_teacher: int = 0         # whose responses are the weak labels (release: apparently the first)
    reference: str = "previous"         # DPO reference: previous (the agent at the round's start) | init | base
                                        # (LoRA: adapters off, the release's). The paper is silent
    student_positive_from: str = "before"   # teachers learn from the student before or after its update; silent
    # --- supervised fine-tuning: initialising every agent and its negative twin (Algorithm 1, step 1)
    sft_lr: float = 5e-5                # release: 5e-5 (its LoRA rate)
    teacher_sft_epochs: int = 3         # weak teachers on D_init's chosen (release scripts missing: the student's)
    student_sft_epochs: int = 3         # strong student on the weak labels (release: 3)
    neg_sft_epochs: int = 1             # negative twins, continued from their positive agent (release: 1)
    neg_sft_lr: float = 0.0             # the twins' SFT rate; 0 = --sft_lr (the release uses one rate)
    # --- contrastive update: DPO + sft_weight x SFT on the positive, every round (step 2 (f))
    dpo_lr: float = 1e-5                # release: 1e-5, 1 epoch
    dpo_epochs: int = 1                 # passes over each round's pairs (release: 1)
    beta: float = 0.1                   # DPO temperature (LLaMA-Factory's default; the paper's value not found)
    sft_weight: float = 0.2             # weight of the SFT term on the positive (release: --dpo_ftx 0.2)
    loss_type: str = "sigmoid"          # sigmoid (DPO, Rafailov et al.) | ipo (Azar et al.)
    label_smoothing: float = 0.0        # > 0: conservative DPO, labels taken as flipped with this probability
    identical_pairs: str = "drop"       # pairs with chosen == rejected contrast nothing: drop | keep (release)
    batch_size: int = 16                # sequences (SFT) or pairs (DPO) per micro-batch
    grad_accum: int = 1                 # micro-batches per optimizer step
    warmup_ratio: float = 0.0           # linear warm-up share of the steps, then cosine (release: 0, cosine)
    grad_clip: float = 1.0              # max gradient norm; 0 turns clipping off
    length_window: int = 16             # batches cut from windows of this many sorted by length; 1 = uniform
    log_every: int = 10                 # optimizer steps between metrics lines (and the only host syncs)
    # --- generation and scoring: sampling the agents' responses, batched perplexity
    max_new_tokens: int = 256           # per response
    temperature: float = 0.7            # sampling the agents' responses (the release's setting is not known)
    top_p: float = 0.9                  # nucleus sampling mass (the release's setting is not known)
    eval_temperature: float = 0.0       # test generations: 0 = greedy, so evaluation is exact and repeatable
    negative_temperature: float = -1.0  # the twins' sampling (the hard negatives); -1 = --temperature, 0 = greedy
    gen_batch_size: int = 32            # prompts decoded at once
    score_batch_size: int = 32          # rows per batch of perplexity and reference log-prob scoring
    # --- the toy task's bases (task=toy): tiny Llamas pre-trained here, each on its own share of the knowledge
    toy_teacher_ops: str = "+,-,*"                   # the operations each weak teacher's base sees (the student: all)
    toy_teacher_other_share: float = 0.0             # share of a teacher base's problems in the others' operations
    toy_teacher_sizes: str = "64x2,64x2,64x2"        # hidden x layers per weak teacher
    toy_student_size: str = "80x2"                   # hidden x layers of the strong student: larger than a teacher
    toy_teacher_pretrain_steps: str = "1200,1200,1200"   # pre-training steps per weak teacher, to convergence
    toy_student_pretrain_steps: int = 1200           # the student's; it sees three operations at 3x the batch
    toy_pretrain_lr: float = 3e-3                    # the bases' pre-training rate
    toy_pretrain_batch_size: int = 64                # the teachers' pre-training batch
    toy_student_pretrain_batch_size: int = 192       # the student's: three operations, three times the rows
    toy_base_seed: int = 0                           # the bases' seed (released models are the same in every seed)
    toy_base_cache: str = ""                         # bases kept by a hash of their recipe; "" = OUT/../toy_bases
    toy_rebuild_bases: bool = False                  # pre-train this run's bases again, replacing the cached ones
    toy_pretrain_workers: int = 2                    # bases pre-trained at once, one process each
    # --- LoRA (lora.py, hand-written): the release trains rank-8 adapters on q_proj and v_proj, alpha 16
    lora: str = "none"                  # agents that train adapters, not all weights: none | all | student | teachers
    lora_rank: int = 8                  # r (release: 8)
    lora_alpha: float = 16.0            # the update is scaled by alpha / r (release: 16)
    lora_dropout: float = 0.0           # dropout on the adapters' input (release: 0)
    lora_targets: str = "q_proj,v_proj"     # module names (the last part) to wrap (release: q_proj,v_proj)
    merge_lora: bool = False            # also write each LoRA checkpoint merged into its base, as STAGE/merged
    # --- evaluation and reports
    evaluate: bool = True               # generate on the test prompts after init and each round
    signal: bool = True                 # score every pair each agent trains on (report.py's training signal)
    reward_models: str = "auto"         # evaluators (names or folders) of the test outputs and the signal: auto
                                        # = the task's (evaluate.EVALUATORS; toy: gold reward) | none | A,B
    rm_format: str = "auto"             # a reward model's input: auto (its evaluator's) | pair | beaver | a template
    ceiling: bool = True                # also train the strong student by SFT on ground truth (the ceiling)
    # --- method: MACPO or a baseline (baselines.py), from the same initial agents and data
    method: str = "macpo"               # macpo | sft (naive) | confident (Burns) | spin (Chen) | self_reward (Yuan)
    mutual_positives: bool = True       # --no-mutual_positives: the -MP ablation (own_response)
    hard_negatives: bool = True         # --no-hard_negatives: the -HN ablation (deranged_negatives)
    confident_weight: float = 0.75      # confident: final weight of the student's own predictions (Burns: 0.75)
    confident_warmup: float = 0.2       # confident: share of the steps over which alpha rises from 0 (Burns: 20%)
    n_samples: int = 4                  # self_reward: samples per prompt the student ranks (Yuan et al.: 4)
    self_judge: str = "likelihood"      # self_reward: llm (a judge prompt) | likelihood (tiny models: -log PPL)

    @property
    def K(self):
        return self.n_teachers if self.teachers == "toy" else len(self.teachers.split(","))

    @property
    def T(self):
        return self.rounds or self.K


def parse_config(argv=None):
    """Command-line flags -> a Config, refused with every problem named (flags.py builds --help from the
    comments above and checks the flags against each other)."""
    cfg = flags.parse(Config, argv, __doc__.split("\n\n")[0], METHODS)
    cfg.reward_models, cfg.rm_format = evaluate.resolve_evaluators(cfg.task, cfg.reward_models, cfg.rm_format)
    return cfg


# ---------------------------------------------------------------------------------------------------------
# Algorithm 1 (Lyu et al. 2025, section 2). Step 1 initialises every agent; step 2 is T rounds of
# macpo_round. README.md shows it as pseudocode in these functions' names.

@dataclass
class Setup:
    """What Algorithm 1's step 1 leaves, and every method (MACPO, its ablations, the baselines) starts from."""
    w2s: list           # the weak-to-strong split (data.Example; the ceiling trains on its gold responses)
    test: list          # the test split
    Q: list             # Q_w2s: its prompts (turn lists), in the order of every response list below
    teachers: list      # ["teacher0", ..., "teacher{K-1}"]
    init: dict          # agent -> checkpoint of its positive model after initialisation
    bases: dict         # agent -> its base model
    lora: dict          # agent -> does it (and its twin) train LoRA adapters (--lora)
    weak_labels: list   # the weak-label teacher's responses to Q: the naive-SFT student's data
    negatives: dict     # agent -> its negative twin's responses to Q: the hard negatives, generated once
    evals: dict         # agent -> eval stage of its initial model

    def reference(self, mode, agent):
        """The agent's DPO reference (--reference) as dpo_stage takes it: the model at the round's start, its
        initial checkpoint, or its base (a LoRA agent's adapters switched off, as the release does)."""
        if mode == "previous":
            return "start"
        if mode == "init":
            return self.init[agent]
        return "adapters_off" if self.lora[agent] else self.bases[agent]


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
    bases = toy.bases(cfg, run) if cfg.task == "toy" else dict(zip(names + ["student"],
                                                                   cfg.teachers.split(",") + [cfg.student]))
    use_lora = {a: cfg.lora in ("all", "student" if a == "student" else "teachers") for a in names + ["student"]}
    weak = names[cfg.weak_label_teacher]
    gold_chosen = [(e.prompt, e.chosen, None) for e in init]
    gold_rejected = [(e.prompt, e.rejected, None) for e in init]

    # Weak teachers: the positive model by SFT on D_init's chosen responses; its negative twin by SFT on the
    # rejected ones, continued from the positive model (the release does so for the student's twin).
    agents = {n: sft_stage(cfg, run, f"init/{n}", bases[n], gold_chosen, cfg.teacher_sft_epochs, use_lora[n])
              for n in names}
    twins = {n: sft_stage(cfg, run, f"init/{n}_neg", agents[n], gold_rejected, cfg.neg_sft_epochs, use_lora[n],
                          lr=cfg.neg_sft_lr) for n in names}
    # Weak labels: one teacher's responses to Q_w2s. The strong student: SFT on them (alone, this is the naive
    # SFT baseline). Its negative twin: continued SFT on the weak teacher's twin's responses to Q_w2s.
    weak_labels = generate_stage(cfg, run, "init/weak_labels", agents[weak], Q)
    agents["student"] = sft_stage(cfg, run, "init/student", bases["student"],
                                  [(q, y, None) for q, y in zip(Q, weak_labels)], cfg.student_sft_epochs,
                                  use_lora["student"])
    negative_temperature = None if cfg.negative_temperature < 0 else cfg.negative_temperature
    weak_negatives = generate_stage(cfg, run, "init/weak_negatives", twins[weak], Q, negative_temperature)
    twins["student"] = sft_stage(cfg, run, "init/student_neg", agents["student"],
                                 [(q, y, None) for q, y in zip(Q, weak_negatives)], cfg.neg_sft_epochs,
                                 use_lora["student"], lr=cfg.neg_sft_lr)
    # Hard negative behaviour: each twin answers Q_w2s once; the release reuses these every round.
    negatives = {a: generate_stage(cfg, run, f"init/negatives_{a}", twins[a], Q, negative_temperature)
                 for a in ["student"] + names}
    evals = {a: evaluate_stage(cfg, run, f"eval/init/{a}", agents[a], test) for a in names + ["student"]}
    return Setup(w2s, test, Q, names, agents, bases, use_lora, weak_labels, negatives, evals)


# The two ingredients an ablation swaps (the paper's section 6 names "-MP"; "-HN" is inferred): where each
# agent's positive comes from, and which negative it is contrasted with. A positive source is a pair of
# functions (the student's positive, a teacher's positive), each -> one response per prompt.

def perplexity_pick(cfg, run, r, setup, agents, responses, agent):
    """(b) The student's positive: the teacher response it finds most familiar, scored at the round's start,

        y+_i = argmin_k PPL_student(y_i^k | x_i)        over the K teachers' responses y_i^k to prompt x_i

    ROUND/pairs_student/pairs.jsonl keeps every perplexity, the pick's author and, with a scorer, every
    candidate's score (report.py: the pick against the best and a random one)."""
    name = f"{r}/pairs_student"
    if not run.done(name):
        folder = run.start(name)
        model, tokenizer = load_agent(cfg, agents["student"])
        prompts = [render(cfg, turns, tokenizer) for turns in setup.Q]
        candidates = [responses[n] for n in setup.teachers]                         # [K][N]
        # all K x N pairs in one call, so that the K responses to a prompt are scored after one pass of it
        flat = perplexity(model, tokenizer, prompts * len(candidates), sum(candidates, []),
                          batch_size=cfg.score_batch_size, max_length=cfg.max_length,
                          max_prompt_length=cfg.max_prompt_length, progress=True)
        ppl = [flat[k * len(prompts):(k + 1) * len(prompts)] for k in range(len(candidates))]     # [K][N]
        candidate_scores = [scored(run, setup.Q, c) for c in candidates]        # [K][N] {scorer: score}
        rows = []
        for i, turns in enumerate(setup.Q):
            best = min(range(len(candidates)), key=lambda k: ppl[k][i])          # the argmin over k
            rows.append({"i": i, "prompt": turns, "chosen": candidates[best][i], "chosen_by": setup.teachers[best],
                         "perplexities": {n: ppl[k][i] for k, n in enumerate(setup.teachers)},
                         "scored_by": run.name(agents["student"]), "chosen_score": candidate_scores[best][i],
                         "candidate_scores": {s: {n: candidate_scores[k][i][s] for k, n in enumerate(setup.teachers)}
                                              for s in candidate_scores[best][i]}})
        write_jsonl(folder / "pairs.jsonl", rows)
        run.finish(name)
    return [row["chosen"] for row in read_jsonl(run.out / name / "pairs.jsonl")]


def student_response(cfg, run, r, setup, agents, responses, agent):
    """(c) A teacher's positive: the student's response, for every teacher (no filter)."""
    return responses["student"]


def own_response(cfg, run, r, setup, agents, responses, agent):
    """-MP (--no-mutual_positives): the agent's own response."""
    return responses[agent]


MUTUAL_POSITIVES = (perplexity_pick, student_response)
OWN_POSITIVES = (own_response, own_response)


def hard_negatives(cfg, run, setup):
    """(d) Agent a's negative for prompt i: its own negative twin's response to prompt i."""
    return setup.negatives


def deranged_negatives(cfg, run, setup):
    """-HN (--no-hard_negatives): the twin's response to another prompt (a fixed random derangement of the
    same negatives): the same negative behaviour, no longer a familiar near miss for this prompt."""
    order = list(range(len(setup.Q)))
    random.Random(run.seed(f"{variant(cfg)}/derangement")).shuffle(order)
    other = {order[i]: order[(i + 1) % len(order)] for i in range(len(order))}         # never i itself (N > 1)
    return {a: [v[other[i]] for i in range(len(setup.Q))] for a, v in setup.negatives.items()}


def macpo_round(cfg, run, r, setup, agents, positives, negatives):
    """Algorithm 1, step 2, round r: every agent samples, takes its positives and is updated by DPO +
    sft_weight x SFT on the pairs (x_i, positive, negative) (e), (f) -> {agent: checkpoint after the round}."""
    student_positive, teacher_positive = positives
    agents = dict(agents)
    # (a) every agent answers each weak-to-strong prompt once: the teachers, and the student before its update
    responses = {a: samples(cfg, run, agents[a], setup.Q) for a in agents}
    # (b) the student's positive; (f) its update, from the previous round's model
    positive = student_positive(cfg, run, r, setup, agents, responses, "student")
    agents["student"] = dpo_stage(cfg, run, f"{r}/student", agents["student"],
                                  list(zip(setup.Q, positive, negatives["student"])),
                                  setup.reference(cfg.reference, "student"), setup.lora["student"])
    if cfg.student_positive_from == "after":        # the teachers learn from the updated student instead
        responses["student"] = samples(cfg, run, agents["student"], setup.Q)
    # (c) each teacher's positive; (f) its update, against its own twin's negatives
    for n in setup.teachers:
        positive = teacher_positive(cfg, run, r, setup, agents, responses, n)
        agents[n] = dpo_stage(cfg, run, f"{r}/{n}", agents[n], list(zip(setup.Q, positive, negatives[n])),
                              setup.reference(cfg.reference, n), setup.lora[n])
    return agents


def macpo_rounds(cfg, run, setup, prefix=""):
    """Algorithm 1, step 2: T rounds of macpo_round, each agent evaluated after every round ->
    ({round: {agent: eval stage}}, {agent: final checkpoint}). `prefix` names a variant's stages."""
    positives = MUTUAL_POSITIVES if cfg.mutual_positives else OWN_POSITIVES
    negatives = (hard_negatives if cfg.hard_negatives else deranged_negatives)(cfg, run, setup)
    agents, evals = dict(setup.init), {"init": setup.evals}
    for t in range(1, cfg.T + 1):
        r = f"{prefix}round{t}"
        agents = macpo_round(cfg, run, r, setup, agents, positives, negatives)
        evals[r] = {a: evaluate_stage(cfg, run, f"eval/{r}/{a}", agents[a], setup.test) for a in agents}
        report.print_round(run, r, list(agents))
    return evals, agents


METHODS = {"macpo": macpo_rounds, **baselines.METHODS}


def variant(cfg):
    """The method's name with its ablations ("macpo", "macpo-mp", "spin", ...): its stages' folder prefix."""
    return cfg.method + ("-mp" if not cfg.mutual_positives else "") + ("-hn" if not cfg.hard_negatives else "")


def ceiling_stage(cfg, run, setup):
    """The ceiling: the same strong base trained by SFT on the ground-truth responses of Q_w2s -> eval stage."""
    ceiling = sft_stage(cfg, run, "ceiling/student", setup.bases["student"],
                        [(e.prompt, e.chosen, None) for e in setup.w2s], cfg.student_sft_epochs, setup.lora["student"])
    return evaluate_stage(cfg, run, "eval/ceiling/student", ceiling, setup.test)


# ---------------------------------------------------------------------------------------------------------
# Running it: one method on one run folder (the table of every method over several seeds: report.table).

def run_method(cfg):
    """One method (--method, default MACPO) on one run folder -> ({round: {agent: mean score}}, {round: {agent:
    {prompt kind: mean score}}}, the final student's win rates), written with the premises and the training
    signal to results.json and results.md (report.write_results)."""
    run = Run(cfg)
    try:
        report.print_evaluators(cfg)
        setup = initialise(cfg, run)
        ceiling = ceiling_stage(cfg, run, setup) if cfg.ceiling else None
        premises = report.check_premises(cfg, run, setup, ceiling)     # before round 1: a weak-to-strong bed?
        name = variant(cfg)
        evals, final = METHODS[cfg.method](cfg, run, setup, "" if name == "macpo" else f"{name}/")
        if cfg.ceiling:
            evals["ceiling"] = {"student": ceiling}
        return report.write_results(cfg, run, setup, evals, final, premises, name)
    finally:
        run.close()


def main(argv=None):
    """python macpo.py [flags]: one run (--method); `eval FOLDER ...`: score saved generations (evaluate.py);
    `table --seeds 0,1,2 --methods macpo,sft,... [flags]`: every method and ablation, results.md + rounds.png."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["eval"]:
        return evaluate.main(argv[1:])
    sub = argv[:1] == ["table"]
    if sub:
        table_args, argv = report.parse_table_args(argv[1:])
    cfg = parse_config(argv)
    if cfg.device == "auto":
        cfg.device = parallel.default_device()
    cfg.device = parallel.setup(cfg.device)          # torchrun: join the process group, one GPU per rank
    if cfg.device == "cpu" and parallel.world_size() == 1:
        torch.set_num_threads(os.cpu_count() or 1)
    t0 = time.time()
    try:
        if sub:
            print(report.table(cfg, [int(x) for x in table_args.seeds.split(",")], table_args.methods.split(","),
                               initialise, ceiling_stage, METHODS, table_args.scorer, table_args.tie_margin))
            print(f"{cfg.out}: results.md, rounds.png, table.json ({time.time() - t0:.0f} s)")
            return
        results, by_kind, wins = run_method(cfg)
    except (data.DataError, ModelLoadError, NonFiniteError, RunError) as e:
        sys.exit(f"error: {e}")
    except OSError as e:       # a full disk or a lost mount: the stage being written stays *.partial, never DONE
        sys.exit(f"error: {e} (while writing under {cfg.out}). Every finished stage is intact; fix the cause "
                 f"(free disk space) and run the same command again to resume.")
    report.print_results(results, by_kind, wins, [f"teacher{k}" for k in range(cfg.K)])
    print(f"\n{cfg.out}: results.json, results.md, results.png, metrics.jsonl, checkpoints and generations per "
          f"stage ({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
