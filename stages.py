"""The run folder and the stages MACPO and its baselines are built from.

A stage is one unit of work whose outputs land in its own folder under --out: a checkpoint (sft_stage,
dpo_stage), generations (generate_stage, samples, evaluate_stage) or the student's positives
(select_positives_stage). Run.stage writes the folder under a temporary name, marks it DONE last and renames it,
so a killed run resumes from the last finished stage. `cfg` is macpo.Config (this module does not import
macpo.py; the algorithm lives there).
"""
import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
import zlib
from pathlib import Path

import torch

import data
import evaluate
import lora
import parallel
from generate import generate, perplexity
from train import TrainSettings, load_model, load_sharded, reference_logps, save_model, train


# ---------------------------------------------------------------------------------------------------------
# The run folder. A stage is a folder written under a temporary name, marked DONE, then renamed into place:
# a folder without DONE (or a *.partial one) is never taken for a finished stage. Each stage seeds itself from
# (seed, name), so a resumed run computes exactly what an uninterrupted one would.

REPORT_ONLY = ("out", "signal", "reward_models", "rm_format", "toy_base_cache", "toy_rebuild_bases",
               "toy_pretrain_workers")
LEGACY = {"identical_pairs": "keep"}        # runs written before the flag trained on identical pairs


class RunError(RuntimeError):
    """The run folder cannot be used as asked (another process holds it, or it holds another configuration)."""


class Run:
    def __init__(self, cfg):
        self.cfg, self.out, self.order = cfg, Path(cfg.out).resolve(), []
        self.out.mkdir(parents=True, exist_ok=True)
        # judges every pair a stage trains on; only rank 0 writes the pair files, so only it scores
        self.score = evaluate.ScoreCache(signal_scorers(cfg) if parallel.is_main() else {})
        if not parallel.is_main():      # under torchrun rank 0 owns the folder; the others follow its stages
            return
        # One process per run folder: flock is released by the kernel when the process dies, so a crash never
        # leaves a stale lock behind.
        self._lock = open(self.out / ".lock", "w")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunError(f"another macpo process is running in {self.out} (it holds {self.out}/.lock); "
                           f"wait for it to finish or pass a different --out") from None
        config = dataclasses.asdict(cfg)
        saved = self.out / "config.json"
        if saved.exists():
            old = json.loads(saved.read_text())
            # flags that only change what is reported may differ; a flag added since the folder was written
            # compares as its value then (LEGACY), or as today's default
            changed = sorted(k for k in config if k not in REPORT_ONLY
                             and old.get(k, LEGACY.get(k, config[k])) != config[k])
            # a folder with no finished stage has nothing to protect: a refused run can be rerun with fixed flags
            if changed and any(self.out.rglob("DONE")):
                raise RunError(f"{self.out} holds a run with a different configuration ({', '.join(changed)}); "
                               f"resume with the same flags, or pass a different --out")
        write_json(saved, config)

    def stage(self, name, build):
        """Run build(folder) unless stage `name` is done; return the finished folder."""
        final = self.out / name
        if name not in self.order:          # the table asks for shared stages once per method
            self.order.append(name)
        if (final / "DONE").exists():
            return final
        tmp = final.with_name(final.name + ".partial")
        if parallel.is_main():
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        parallel.barrier()                  # under torchrun every rank builds the stage; rank 0 writes its files
        t0 = time.time()
        build(tmp)
        parallel.barrier()
        if parallel.is_main():
            (tmp / "DONE").write_text(f"{time.time() - t0:.1f} s\n")
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            self.collect_metrics()
        parallel.barrier()
        return final

    def name(self, path):
        """A checkpoint's name inside the run ("round1/student"), or the model name/path it was given as."""
        path = Path(path)
        return str(path.relative_to(self.out)) if path.is_relative_to(self.out) else str(path)

    def seed(self, name):
        return zlib.crc32(f"{self.cfg.seed}/{name}".encode())

    def collect_metrics(self):
        """metrics.jsonl = every finished stage's own metrics, in stage order (rebuilt, so never duplicated)."""
        lines = []
        for name in self.order:
            f = self.out / name / "metrics.jsonl"
            if f.exists():
                lines += f.read_text().splitlines()
        write_text(self.out / "metrics.jsonl", "".join(line + "\n" for line in lines))


def signal_scorer_names(cfg):
    """The scorers that judge every training pair (report.py): the toy task's gold reward and --reward_models;
    none (no report, no extra inference) with --no-signal."""
    if not cfg.signal:
        return []
    return (["gold"] if cfg.task == "toy" else []) + [n.strip() for n in cfg.reward_models.split(",") if n.strip()]


def signal_scorers(cfg):
    """-> {name: f(prompts, responses) -> [float]} for signal_scorer_names(cfg); a reward model loads on first use."""
    return {n: evaluate.make_scorer(n, cfg.device, cfg.score_batch_size, cfg.max_length, cfg.rm_format,
                                    cfg.trust_remote_code) for n in signal_scorer_names(cfg)}


def scored(run, prompts, responses):
    """-> per response {scorer: score} (each {} when the run has no scorer)."""
    scores = run.score(prompts, responses)
    return [{name: v[i] for name, v in scores.items()} for i in range(len(responses))]


def write_text(path, text):
    if not parallel.is_main():
        return
    data.atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def write_json(path, obj):
    write_text(path, json.dumps(obj, indent=2) + "\n")


def write_jsonl(path, rows):
    write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


# ---------------------------------------------------------------------------------------------------------
# Stages. Every model goes to and from disk between stages (save_pretrained, safetensors), so only the models
# a stage needs are in memory and any stage can be resumed alone. Rows are (prompt turns, chosen, rejected);
# each agent renders prompts with its own tokenizer (agents exchange text, not ids).

def _log_file(folder):
    """The stage's metrics.jsonl, written by rank 0 only."""
    return open(folder / "metrics.jsonl", "w") if parallel.is_main() else contextlib.nullcontext()


def render(cfg, turns, tokenizer):
    return data.render_prompt(turns, cfg.template, tokenizer, None if cfg.system == "default" else cfg.system)


def _sharded(cfg):
    return cfg.parallel == "fsdp" and parallel.world_size() > 1


def load_agent(cfg, path, new_lora=None):
    """The model at `path` (new_lora: fresh adapters added, lora.add_lora's arguments). Under torchrun with
    --parallel fsdp it is loaded sharded (train.load_sharded: no rank holds it whole, a LoRA checkpoint's base
    included) and every pass runs through its FSDP root."""
    load = load_sharded if _sharded(cfg) else load_model
    return load(str(path), cfg.device, cfg.trust_remote_code, new_lora)


def _settings(cfg, name, **stage):
    """The TrainSettings of stage `name`: the run's shared flags plus the stage's own (kind, epochs, lr)."""
    return TrainSettings(batch_size=cfg.batch_size, grad_accum=cfg.grad_accum, max_length=cfg.max_length,
                         max_prompt_length=cfg.max_prompt_length, warmup_ratio=cfg.warmup_ratio,
                         grad_clip=cfg.grad_clip, log_every=cfg.log_every, parallel_mode=cfg.parallel,
                         length_window=cfg.length_window, beta=cfg.beta, sft_weight=cfg.sft_weight,
                         loss_type=cfg.loss_type, label_smoothing=cfg.label_smoothing,
                         confident_weight=cfg.confident_weight, confident_warmup=cfg.confident_warmup,
                         desc=name, **stage)


def _uses_lora(cfg, name):
    """Does the agent trained in stage `name` ("init/teacher0_neg", "round2/student", ...) train adapters?"""
    agent = name.split("/")[-1]
    return cfg.lora == "all" or (cfg.lora != "none" and agent.startswith(cfg.lora.rstrip("s")))


def _load_trainable(cfg, run, name, start):
    """The model at `start`, ready to train in stage `name`: adapters added when the agent uses LoRA and the
    checkpoint has none yet (a LoRA agent's later stages continue its adapters, as the release does), starting
    from the stage's own seed (the same adapters in every process that runs this stage). Adapters are added
    before any sharding, so that FSDP shards them with their layers."""
    fresh = _uses_lora(cfg, name) and lora.base_model_of(start) is None
    return load_agent(cfg, start, (tuple(cfg.lora_targets.split(",")), cfg.lora_rank, cfg.lora_alpha,
                                   cfg.lora_dropout, run.seed(name)) if fresh else None)


def _save(cfg, model, tokenizer, folder):
    save_model(model, tokenizer, folder)
    if cfg.merge_lora and lora.lora_modules(model):
        save_model(lora.merge_adapters(model), tokenizer, folder / "merged")


def sft_stage(cfg, run, name, start, rows, epochs, kind="sft", lr=None):
    """Supervised fine-tuning of the model at `start` on rows' chosen responses, at `lr` (default --sft_lr)
    -> checkpoint folder. kind="confident": with Burns et al.'s auxiliary confidence loss instead (the
    confident baseline)."""
    def build(folder):
        model, tokenizer = _load_trainable(cfg, run, name, start)
        rendered = [(render(cfg, turns, tokenizer), chosen, None) for turns, chosen, _ in rows]
        with _log_file(folder) as log:
            train(model, tokenizer, rendered, _settings(cfg, name, kind=kind, epochs=epochs, lr=lr or cfg.sft_lr,
                                                        seed=run.seed(name)), log_file=log)
        _save(cfg, model, tokenizer, folder)
    return run.stage(name, build)


def dpo_stage(cfg, run, name, start, reference, rows):
    """The contrastive update: macpo_loss (DPO + sft_weight x SFT on the positive) on (prompt, positive,
    negative) rows, continuing from `start`; reference log-probs from the model at `reference`, computed once
    before training -> checkpoint folder. NAME/pairs.jsonl keeps every pair given, whether it was trained on
    (--identical_pairs) and, with a scorer, both sides' scores (report.py reads them)."""
    def build(folder):
        turns, chosen, rejected = zip(*rows) if rows else ((), (), ())
        chosen_scores, rejected_scores = scored(run, turns, chosen), scored(run, turns, rejected)
        # A pair whose two sides are the same string contrasts nothing: its DPO gradient is exactly zero, so
        # keeping it only adds SFT on a response the agent's negative twin also wrote. The paper is silent.
        trained = [cfg.identical_pairs == "keep" or c != r for c, r in zip(chosen, rejected)]
        write_jsonl(folder / "pairs.jsonl", [
            {"i": i, "prompt": turns[i], "chosen": chosen[i], "rejected": rejected[i], "trained": trained[i],
             "chosen_score": chosen_scores[i], "rejected_score": rejected_scores[i]} for i in range(len(rows))])
        pairs = [row for row, keep in zip(rows, trained) if keep]
        model, tokenizer = _load_trainable(cfg, run, name, start)
        if not pairs:                       # nothing to learn from: the agent goes on unchanged
            print(f"{name}: no pair to train on ({len(rows)} given, every one identical; --identical_pairs drop)",
                  file=sys.stderr)
            _save(cfg, model, tokenizer, folder)
            return
        rendered = [(render(cfg, turns, tokenizer), pos, neg) for turns, pos, neg in pairs]
        kw = dict(batch_size=cfg.score_batch_size, max_length=cfg.max_length, max_prompt_length=cfg.max_prompt_length)
        if str(reference) == str(start):
            ref = reference_logps(model, tokenizer, rendered, **kw)
        elif lora.lora_modules(model) and str(reference) == model.name_or_path:
            with lora.adapters_disabled(model):         # the release's reference: the base, adapters off
                ref = reference_logps(model, tokenizer, rendered, **kw)
        else:
            reference_model, reference_tokenizer = load_agent(cfg, reference)
            ref = reference_logps(reference_model, reference_tokenizer, rendered, **kw)
            del reference_model
        with _log_file(folder) as log:
            train(model, tokenizer, rendered, _settings(cfg, name, kind="dpo", epochs=cfg.dpo_epochs, lr=cfg.dpo_lr,
                                                        seed=run.seed(name)), reference=ref, log_file=log)
        _save(cfg, model, tokenizer, folder)
    return run.stage(name, build)


def generate_stage(cfg, run, name, agent, prompts, temperature=None):
    """One response per prompt from the model at `agent`, sampled at `temperature` (default --temperature;
    0 = greedy) -> list of strings (saved as generations.jsonl)."""
    def build(folder):
        model, tokenizer = load_agent(cfg, agent)
        texts = generate(model, tokenizer, [render(cfg, turns, tokenizer) for turns in prompts],
                         max_new_tokens=cfg.max_new_tokens,
                         temperature=cfg.temperature if temperature is None else temperature,
                         top_p=cfg.top_p, batch_size=cfg.gen_batch_size, seed=run.seed(name),
                         max_prompt_length=cfg.max_prompt_length, desc=name)
        write_jsonl(folder / "generations.jsonl", [{"i": i, "agent": run.name(agent), "prompt": turns, "response": text}
                                                   for i, (turns, text) in enumerate(zip(prompts, texts))])
    return [r["response"] for r in read_jsonl(run.stage(name, build) / "generations.jsonl")]


def samples(cfg, run, agent, prompts, j=0):
    """The checkpoint's j-th sampled response to each prompt, kept beside it (AGENT/samples, AGENT/samples1,
    ...): every method that samples the same checkpoint, such as round 1's initial agents, shares them."""
    return generate_stage(cfg, run, f"{run.name(agent)}/samples{j or ''}", agent, prompts)


def select_positives_stage(cfg, run, name, student, prompts, teacher_responses, teacher_names):
    """Mutual positive behaviour augmentation, the student's side:

        y+_i = argmin_k PPL_student(y_i^k | x_i)   over the K teachers' responses to prompt x_i

    -> the positive response per prompt, saved (NAME/pairs.jsonl) with every perplexity, which teacher wrote it
    and, with a scorer, the score of every candidate (report.py: the pick against the best and a random one).
    The pair it goes into, negative included, is kept by the DPO stage that trains on it."""
    def build(folder):
        model, tokenizer = load_agent(cfg, student)
        rendered = [render(cfg, turns, tokenizer) for turns in prompts]
        # all K x N pairs in one call, so that the K responses to a prompt are scored after one pass of it
        flat = perplexity(model, tokenizer, rendered * len(teacher_responses), sum(teacher_responses, []),
                          batch_size=cfg.score_batch_size, max_length=cfg.max_length,
                          max_prompt_length=cfg.max_prompt_length, progress=True)
        ppl = [flat[k * len(prompts):(k + 1) * len(prompts)] for k in range(len(teacher_responses))]     # [K][N]
        candidate = [scored(run, prompts, responses) for responses in teacher_responses]             # [K][N]
        rows = []
        for i, turns in enumerate(prompts):
            best = min(range(len(teacher_names)), key=lambda k: ppl[k][i])
            rows.append({"i": i, "prompt": turns, "chosen": teacher_responses[best][i],
                         "chosen_by": teacher_names[best],
                         "perplexities": {n: ppl[k][i] for k, n in enumerate(teacher_names)},
                         "scored_by": run.name(student), "chosen_score": candidate[best][i],
                         "candidate_scores": {s: {n: candidate[k][i][s] for k, n in enumerate(teacher_names)}
                                              for s in candidate[best][i]}})
        write_jsonl(folder / "pairs.jsonl", rows)
    return [r["chosen"] for r in read_jsonl(run.stage(name, build) / "pairs.jsonl")]


def evaluate_stage(cfg, run, name, agent, test):
    """Greedy test generations of one agent (NAME/generations.jsonl) -> the stage name, or None when evaluation
    is off. Scoring reads the saved generations (`scores`: the toy task's gold reward, or a reward model via
    `python macpo.py eval` / the table)."""
    if not cfg.evaluate or not test:
        return None
    generate_stage(cfg, run, name, agent, [ex.prompt for ex in test], cfg.eval_temperature)
    return name


# ---------------------------------------------------------------------------------------------------------
# The toy task's agents: tiny Llamas built from configs over a tokenizer trained on the task's text, their
# bases pre-trained on plain text, each on its own share of the knowledge (toy.py). Like released base models
# they depend on their recipe only, not on the run's seed: they are built once into a cache folder named by a
# hash of the recipe (--toy_base_cache, default OUT/../toy_bases), where every later run, seed and method of
# the table finds them, and copied into the run folder (bases/NAME) so that a run folder stands alone.

TOY_BASES_VERSION = 5           # bump when toy.py's corpus, tokenizer or model changes what a recipe builds


def toy_recipes(cfg):
    """-> {name: recipe} for "tokenizer", "teacher0".. and "student": everything that decides the weights."""
    import toy
    steps = [int(x) for x in cfg.toy_teacher_pretrain_steps.split(",")[:cfg.K]]
    sizes, ops = cfg.toy_teacher_sizes.split(",")[:cfg.K], cfg.toy_teacher_ops.split(",")[:cfg.K]
    common = {"version": TOY_BASES_VERSION, "seed": cfg.toy_base_seed, "lr": cfg.toy_pretrain_lr,
              "max_length": cfg.max_length}
    recipes = {"tokenizer": {"version": TOY_BASES_VERSION, "seed": cfg.toy_base_seed}}
    for k in range(cfg.K):
        recipes[f"teacher{k}"] = dict(common, size=sizes[k], ops=ops[k], steps=steps[k],
                                      batch_size=cfg.toy_pretrain_batch_size)
    recipes["student"] = dict(common, size=cfg.toy_student_size, ops="".join(toy.OPS),
                              steps=cfg.toy_student_pretrain_steps, batch_size=cfg.toy_student_pretrain_batch_size)
    return recipes


def recipe_hash(recipe):
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]


def toy_base_cache(cfg):
    """The cache folder: --toy_base_cache, or toy_bases beside the run folder (runs/toy -> runs/toy_bases)."""
    return Path(cfg.toy_base_cache or Path(cfg.out).resolve().parent / "toy_bases")


def toy_base_folders(cfg):
    """-> {name: its cache folder, NAME-HASH ("teacher0" -> teacher-<hash>: teachers with one recipe share it)}."""
    cache = toy_base_cache(cfg)
    return {name: cache / f"{name.rstrip('0123456789')}-{recipe_hash(r)}" for name, r in toy_recipes(cfg).items()}


def _pretrain_base(job):
    """Pre-train one toy base into job["folder"] (a fresh temporary folder): language modelling of the
    continuation given its context, one pass over fresh rows of toy.pretraining_corpus. Top level, so that a
    worker process can run it."""
    import toy
    from transformers import AutoTokenizer, LlamaForCausalLM
    torch.set_num_threads(job["threads"])
    recipe, folder = job["recipe"], Path(job["folder"])
    tokenizer = AutoTokenizer.from_pretrained(job["tokenizer"])
    hidden, layers = (int(x) for x in recipe["size"].split("x"))
    seed = zlib.crc32(recipe_hash(recipe).encode())
    torch.manual_seed(seed)
    model = LlamaForCausalLM(toy.model_config(tokenizer, hidden, layers))
    corpus = toy.pretraining_corpus(f"{recipe['seed']}-{recipe['ops']}", recipe["steps"] * recipe["batch_size"],
                                    tuple(recipe["ops"]))
    with open(folder / "metrics.jsonl", "w") as log:
        train(model, tokenizer, [(c, y, None) for c, y in corpus],
              TrainSettings(kind="sft", epochs=1, lr=recipe["lr"], batch_size=recipe["batch_size"],
                            max_length=recipe["max_length"], warmup_ratio=0.05, seed=seed, log_every=50,
                            desc=job["desc"], parallel_mode="none", length_window=1), log_file=log)
    save_model(model, tokenizer, folder)
    write_json(folder / "recipe.json", recipe)


def _build_cache(cfg):
    """Every base whose recipe is not in the cache yet, pre-trained there, two at a time in worker processes
    (each on one core: these models are too small to use two, so two processes are about twice as fast)."""
    import toy
    recipes, folders = toy_recipes(cfg), toy_base_folders(cfg)
    cache = toy_base_cache(cfg)
    cache.mkdir(parents=True, exist_ok=True)
    if not (folders["tokenizer"] / "DONE").exists():
        tmp = Path(tempfile.mkdtemp(dir=cache, prefix=".tmp-"))
        toy.train_tokenizer(toy.tokenizer_texts(toy.pretraining_corpus(f"{recipes['tokenizer']['seed']}-tokenizer",
                                                                      5000))).save_pretrained(tmp)
        _publish(tmp, folders["tokenizer"])
    todo = [n for n in recipes if n != "tokenizer" and not (folders[n] / "DONE").exists()]
    jobs = sorted(({"recipe": recipes[n], "folder": tempfile.mkdtemp(dir=cache, prefix=".tmp-"), "name": n,
                    "tokenizer": str(folders["tokenizer"]),
                    "desc": f"pre-train {n} ({recipes[n]['size']}, {recipes[n]['ops']})"} for n in todo),
                  key=lambda j: -j["recipe"]["steps"] * j["recipe"]["batch_size"])      # the longest first
    workers = max(1, min(cfg.toy_pretrain_workers, len(jobs)))
    for job in jobs:
        job["threads"] = max(1, (os.cpu_count() or 1) // workers)
    if workers == 1 and parallel.world_size() == 1:     # under torchrun a worker keeps training out of the group
        for job in jobs:
            _pretrain_base(job)
    else:
        import concurrent.futures
        import multiprocessing
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            list(pool.map(_pretrain_base, jobs))          # re-raises a worker's error here
    for job in jobs:
        _publish(Path(job["folder"]), folders[job["name"]])


def _publish(tmp, final):
    """Mark a finished cache folder DONE and move it into place (another process may have been first)."""
    (tmp / "DONE").write_text("")
    try:
        os.replace(tmp, final)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)


def toy_bases(cfg, run):
    """-> {agent: its base folder} in the run folder (bases/NAME), copied from the cache,
    which is built first where it lacks a recipe (--toy_rebuild_bases: always)."""
    folders = toy_base_folders(cfg)
    if parallel.is_main():
        if cfg.toy_rebuild_bases and not (run.out / "bases" / "student" / "DONE").exists():
            for folder in folders.values():
                shutil.rmtree(folder, ignore_errors=True)
        _build_cache(cfg)
    parallel.barrier()

    def copy(name):
        def build(folder):
            if parallel.is_main():
                shutil.copytree(folders[name], folder, dirs_exist_ok=True, ignore=shutil.ignore_patterns("DONE"))
        return run.stage(f"bases/{name}", build)
    copy("tokenizer")
    return {a: copy(a) for a in [f"teacher{k}" for k in range(cfg.K)] + ["student"]}


# ---------------------------------------------------------------------------------------------------------
# Data: (init, w2s, test) lists of data.Example.

def dataset_requests(cfg):
    """The hub dataset files the task reads: [(name, subset, split)] ([] for the toy task and --data_file)."""
    if cfg.task in ("toy", "file"):
        return []
    name, subset = ("pku", "Alpaca-7B") if cfg.task == "pku" else ("hh", cfg.task.replace("hh-", "") + "-base")
    return [(name, subset, split) for split in dict.fromkeys([cfg.train_split, "test"])]


def load_task(cfg):
    if cfg.task == "toy":
        import toy
        try:
            return toy.make_task(cfg.seed, cfg.n_init, cfg.n_w2s, cfg.n_test)
        except ValueError as e:
            raise data.DataError(f"{e}: lower --n_init, --n_w2s or --n_test") from None
    if cfg.task == "file":
        return data.paper_splits(data.read_any(cfg.data_file, order=cfg.pku_order), cfg.n_init, cfg.n_w2s,
                                 cfg.n_test, cfg.seed)
    # what is missing was named, all at once, before any training (macpo.initialise: data.missing_dataset_files)
    files = {split: data.dataset_file(name, subset, split, cfg.data_dir or None, cfg.cache_dir or None)
             for name, subset, split in dataset_requests(cfg)}
    read = (lambda f: data.read_pku(f, cfg.pku_order)) if cfg.task == "pku" else data.read_hh
    if cfg.train_split == "test":
        return data.paper_splits(read(files["test"]), cfg.n_init, cfg.n_w2s, cfg.n_test, cfg.seed)
    return data.splits_with_test_file(read(files[cfg.train_split]), read(files["test"]), cfg.n_init, cfg.n_w2s,
                                      cfg.n_test, cfg.seed)
