"""The run folder and the stages MACPO and its baselines are built from.

A stage is one unit of work whose outputs land in its own folder under --out: a checkpoint (sft_stage,
dpo_stage) or generations (generate_stage, samples, evaluate_stage). Every stage reads the same way:

    if run.done(name):                  # finished by this run or an earlier one: read what it wrote
        return run.out / name
    folder = run.start(name)            # NAME.partial, fresh
    ...                                 # load a model, train or generate, write into folder
    return run.finish(name)             # DONE written last, then renamed to NAME

so a killed run resumes from the last finished stage. `cfg` is macpo.Config (this module does not import
macpo.py; the algorithm lives there).
"""
import contextlib
import dataclasses
import fcntl
import json
import os
import shutil
import sys
import time
import zlib
from pathlib import Path

from huggingface_hub import constants as hub_constants

import data
import evaluate
import lora
import parallel
from data import ModelLoadError, read_jsonl
from generate import generate, reference_logps
from sharding import load_sharded
from train import TrainSettings, check_model, load_model, save_model, train


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
        self.cfg, self.out, self.order, self._started = cfg, Path(cfg.out).resolve(), [], {}
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

    def close(self):
        """Release the folder's lock now (the process's end would too), so that one process can run the same
        folder again, as the tests do, without waiting for this object to be collected."""
        if getattr(self, "_lock", None) is not None:
            self._lock.close()
            self._lock = None

    def done(self, name):
        """Is stage `name` finished (DONE inside its folder)? Either way it takes its place in metrics.jsonl."""
        if name not in self.order:          # the table asks for shared stages once per method
            self.order.append(name)
        return (self.out / name / "DONE").exists()

    def start(self, name):
        """A fresh temporary folder for stage `name` (NAME.partial) -> its path. Under torchrun every rank runs
        the stage; rank 0 writes its files."""
        tmp = self.out / f"{name}.partial"
        if parallel.is_main():
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        parallel.barrier()
        self._started[name] = time.time()
        return tmp

    def finish(self, name):
        """Mark stage `name` DONE (last, with its time) and rename NAME.partial to NAME -> the finished folder."""
        final, tmp = self.out / name, self.out / f"{name}.partial"
        parallel.barrier()
        if parallel.is_main():
            (tmp / "DONE").write_text(f"{time.time() - self._started.pop(name):.1f} s\n")
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


def evaluator_names(cfg):
    """The run's evaluators: the toy task's gold reward and the reward models of --reward_models (resolved by
    macpo.parse_config: the task's default unless named or "none")."""
    names = (["gold"] if cfg.task == "toy" else []) + evaluate.reward_model_names(cfg.reward_models)
    return list(dict.fromkeys(names))                  # --reward_models gold on the toy task: gold once


def signal_scorer_names(cfg):
    """The scorers that judge every training pair (report.py): the run's evaluators; none (no report, no extra
    inference) with --no-signal."""
    return evaluator_names(cfg) if cfg.signal else []


def signal_scorers(cfg):
    """-> {name: f(prompts, responses) -> [float]} for signal_scorer_names(cfg); a reward model loads on first use."""
    return {n: evaluate.make_scorer(n, cfg.device, cfg.score_batch_size, cfg.max_length, cfg.rm_format,
                                    cfg.trust_remote_code, cfg.dtype) for n in signal_scorer_names(cfg)}


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


# ---------------------------------------------------------------------------------------------------------
# Stages. Every model goes to and from disk between stages (save_pretrained, safetensors), so only the models
# a stage needs are in memory and any stage can be resumed alone. Rows are (prompt turns, chosen, rejected);
# each agent renders prompts with its own tokenizer (agents exchange text, not ids).

def _log_file(folder):
    """The stage's metrics.jsonl, written by rank 0 only."""
    return open(folder / "metrics.jsonl", "w") if parallel.is_main() else contextlib.nullcontext()


def render(cfg, turns, tokenizer):
    return data.render_prompt(turns, cfg.template, tokenizer, None if cfg.system == "default" else cfg.system)


def load_agent(cfg, path, new_lora=None):
    """The model at `path` (new_lora: fresh adapters added, lora.add_lora's arguments). Under torchrun with
    --parallel fsdp it is loaded sharded (sharding.load_sharded: no rank holds it whole, a LoRA checkpoint's
    base included) and every pass runs through its FSDP root."""
    sharded = cfg.parallel == "fsdp" and parallel.world_size() > 1
    load = load_sharded if sharded else load_model
    return load(str(path), cfg.device, cfg.trust_remote_code, new_lora, dtype=cfg.dtype)


def _settings(cfg, name, **stage):
    """The TrainSettings of stage `name`: the run's shared flags plus the stage's own (kind, epochs, lr)."""
    return TrainSettings(batch_size=cfg.batch_size, grad_accum=cfg.grad_accum, max_length=cfg.max_length,
                         max_prompt_length=cfg.max_prompt_length, warmup_ratio=cfg.warmup_ratio,
                         grad_clip=cfg.grad_clip, log_every=cfg.log_every, parallel_mode=cfg.parallel,
                         length_window=cfg.length_window, beta=cfg.beta, sft_weight=cfg.sft_weight,
                         loss_type=cfg.loss_type, label_smoothing=cfg.label_smoothing,
                         confident_weight=cfg.confident_weight, confident_warmup=cfg.confident_warmup,
                         desc=name, **stage)


def _load_trainable(cfg, run, name, start, use_lora):
    """The model at `start`, ready to train in stage `name`. use_lora: the agent trains adapters, added here
    when the checkpoint has none yet (a LoRA agent's later stages continue its adapters, as the release does),
    starting from the stage's own seed (the same adapters in every process that runs this stage), before any
    sharding, so that FSDP shards them with their layers."""
    fresh = use_lora and lora.base_model_of(start) is None
    return load_agent(cfg, start, (tuple(cfg.lora_targets.split(",")), cfg.lora_rank, cfg.lora_alpha,
                                   cfg.lora_dropout, run.seed(name)) if fresh else None)


def _save(cfg, model, tokenizer, folder):
    save_model(model, tokenizer, folder)
    if cfg.merge_lora and lora.lora_modules(model):
        save_model(lora.merge_adapters(model), tokenizer, folder / "merged")


def sft_stage(cfg, run, name, start, rows, epochs, use_lora, lr=None, kind="sft"):
    """Supervised fine-tuning of the model at `start` on rows' chosen responses, at `lr` (default --sft_lr);
    use_lora: the agent trains adapters instead of all weights -> checkpoint folder. kind="confident": Burns
    et al.'s auxiliary confidence loss instead (the confident baseline)."""
    if run.done(name):
        return run.out / name
    folder = run.start(name)
    model, tokenizer = _load_trainable(cfg, run, name, start, use_lora)
    rendered = [(render(cfg, turns, tokenizer), chosen, None) for turns, chosen, _ in rows]
    with _log_file(folder) as log:
        train(model, tokenizer, rendered, _settings(cfg, name, kind=kind, epochs=epochs, lr=lr or cfg.sft_lr,
                                                    seed=run.seed(name)), log_file=log)
    _save(cfg, model, tokenizer, folder)
    return run.finish(name)


def dpo_stage(cfg, run, name, start, rows, reference, use_lora):
    """The contrastive update: DPO + sft_weight x SFT on the positive (train.train) on rows (prompt, positive,
    negative), continuing from the model at `start` -> checkpoint folder. use_lora: the agent trains adapters.
    reference, the DPO reference, whose log-probs are computed once before training: "start" (the model at
    `start`), "adapters_off" (its base: the LoRA model with its adapters off) or a checkpoint folder.
    NAME/pairs.jsonl keeps every pair given, whether it was trained on (--identical_pairs) and, with a
    scorer, both sides' scores (report.py reads them)."""
    if run.done(name):
        return run.out / name
    folder = run.start(name)
    turns, chosen, rejected = zip(*rows) if rows else ((), (), ())
    chosen_scores, rejected_scores = scored(run, turns, chosen), scored(run, turns, rejected)
    # A pair whose two sides are the same string contrasts nothing: its DPO gradient is exactly zero, so
    # keeping it only adds SFT on a response the agent's negative twin also wrote. The paper is silent.
    trained = [cfg.identical_pairs == "keep" or c != r for c, r in zip(chosen, rejected)]
    write_jsonl(folder / "pairs.jsonl", [
        {"i": i, "prompt": turns[i], "chosen": chosen[i], "rejected": rejected[i], "trained": trained[i],
         "chosen_score": chosen_scores[i], "rejected_score": rejected_scores[i]} for i in range(len(rows))])
    pairs = [row for row, keep in zip(rows, trained) if keep]
    model, tokenizer = _load_trainable(cfg, run, name, start, use_lora)
    if not pairs:                       # nothing to learn from: the agent goes on unchanged
        print(f"{name}: no pair to train on ({len(rows)} given, every one identical; --identical_pairs drop)",
              file=sys.stderr)
        _save(cfg, model, tokenizer, folder)
        return run.finish(name)
    rendered = [(render(cfg, prompt, tokenizer), positive, negative) for prompt, positive, negative in pairs]
    kw = dict(batch_size=cfg.score_batch_size, max_length=cfg.max_length, max_prompt_length=cfg.max_prompt_length)
    if reference == "start":
        reference_logps_ = reference_logps(model, tokenizer, rendered, **kw)
    elif reference == "adapters_off":
        with lora.adapters_disabled(model):
            reference_logps_ = reference_logps(model, tokenizer, rendered, **kw)
    else:
        reference_model, reference_tokenizer = load_agent(cfg, reference)
        reference_logps_ = reference_logps(reference_model, reference_tokenizer, rendered, **kw)
        del reference_model
    with _log_file(folder) as log:
        train(model, tokenizer, rendered, _settings(cfg, name, kind="dpo", epochs=cfg.dpo_epochs, lr=cfg.dpo_lr,
                                                    seed=run.seed(name)), reference=reference_logps_, log_file=log)
    _save(cfg, model, tokenizer, folder)
    return run.finish(name)


def generate_stage(cfg, run, name, agent, prompts, temperature=None):
    """One response per prompt from the model at `agent`, sampled at `temperature` (default --temperature;
    0 = greedy) -> list of strings (saved as NAME/generations.jsonl)."""
    if not run.done(name):
        folder = run.start(name)
        model, tokenizer = load_agent(cfg, agent)
        texts = generate(model, tokenizer, [render(cfg, turns, tokenizer) for turns in prompts],
                         max_new_tokens=cfg.max_new_tokens,
                         temperature=cfg.temperature if temperature is None else temperature,
                         top_p=cfg.top_p, batch_size=cfg.gen_batch_size, seed=run.seed(name),
                         max_prompt_length=cfg.max_prompt_length, desc=name)
        write_jsonl(folder / "generations.jsonl", [{"i": i, "agent": run.name(agent), "prompt": turns, "response": text}
                                                   for i, (turns, text) in enumerate(zip(prompts, texts))])
        run.finish(name)
    return [r["response"] for r in read_jsonl(run.out / name / "generations.jsonl")]


def samples(cfg, run, agent, prompts, j=0):
    """The checkpoint's j-th sampled response to each prompt, kept beside it (AGENT/samples, AGENT/samples1,
    ...): every method that samples the same checkpoint, such as round 1's initial agents, shares them."""
    return generate_stage(cfg, run, f"{run.name(agent)}/samples{j or ''}", agent, prompts)


def evaluate_stage(cfg, run, name, agent, test):
    """Greedy test generations of one agent (NAME/generations.jsonl) -> the stage name, or None when evaluation
    is off. Scoring reads the saved generations (report.scores: the toy task's gold reward, or a reward model
    via `python macpo.py eval` / the table)."""
    if not cfg.evaluate or not test:
        return None
    generate_stage(cfg, run, name, agent, [ex.prompt for ex in test], cfg.eval_temperature)
    return name


# ---------------------------------------------------------------------------------------------------------
# Before any training: every dataset file and model the run names, and the task's data.

def _model_unavailable(name, flag, reason):
    """One line for a model that is neither a local folder nor in the hub cache while the hub cannot be asked:
    why, and how to put it here."""
    old_cli = "(`huggingface-cli download ...` with huggingface_hub before 0.34)"
    if name.startswith(("/", ".", "~")) or name.count("/") > 1:          # a path: hub names are NAME or ORG/NAME
        return (f"model {name} ({flag}): no such folder, and the hub cannot be asked ({reason}). On a machine "
                f"with network: `hf download ORG/NAME --local-dir {name}` {old_cli}, then copy the folder here")
    return (f"model {name!r} ({flag}) is not a local folder and not in the hub cache ({hub_constants.HF_HUB_CACHE}), "
            f"and the hub cannot be asked ({reason}). If it is the hub's {name}: on a machine with network, `hf "
            f"download {name} --local-dir models/{name.split('/')[-1]}` {old_cli}, then copy that folder here and "
            f"pass it to {flag}; if it is a folder of yours, {name} does not exist here")


def check_models(cfg):
    """Every model the run names exists (config and tokenizer load): each teacher, the student and each reward
    model of --reward_models; and the prompt template fits in --max_prompt_length with each agent's tokenizer.
    Checked before any training, not when the stage comes. When a name is not a local folder and the hub cannot
    be asked (data.hub_unreachable: HF_HUB_OFFLINE, or one short request unanswered), only the hub cache counts,
    so an offline run hears of every model in seconds instead of after each one's retries.
    -> the line of every model that cannot be found (the caller names them in one error, with the dataset files
    still missing)."""
    named = {}                                      # name -> its flag, the first that names it
    for name, flag in ([(n, "--teachers") for n in cfg.teachers.split(",")] + [(cfg.student, "--student")]
                       + [(n, "--reward_models") for n in evaluate.reward_model_names(cfg.reward_models)
                          if n != "gold"]):
        named.setdefault(name, flag)
    # a plain local folder needs no hub; a name, a missing folder or a LoRA folder (its base) may
    offline = (data.hub_unreachable() if any(not Path(n).is_dir() or lora.base_model_of(n) for n in named)
               else None)
    missing = []
    for name, flag in named.items():
        try:
            tokenizer = check_model(name, cfg.trust_remote_code, local_files_only=offline is not None)
        except ModelLoadError as e:
            # offline, a name gets a line of its own: transformers' error would blame the connection alone
            offline_name = offline is not None and not Path(name).is_dir()
            missing.append(_model_unavailable(name, flag, offline) if offline_name else str(e))
            continue
        if flag == "--reward_models":               # scores text as it is given; no prompt template
            continue
        n = len(tokenizer(render(cfg, [{"role": "user", "content": ""}], tokenizer), verbose=False)["input_ids"])
        if n >= cfg.max_prompt_length:
            raise data.DataError(f"--max_prompt_length {cfg.max_prompt_length} leaves no room for a prompt: the "
                                 f"{cfg.template} template alone is {n} tokens with {name}'s tokenizer; raise "
                                 f"--max_prompt_length (and --max_length) above {n}, or pass --system ''")
    return missing


def dataset_requests(cfg):
    """The hub dataset files the task reads: [(name, subset, split)] ([] for the toy task and --data_file)."""
    if cfg.task in ("toy", "file"):
        return []
    name, subset = ("pku", "Alpaca-7B") if cfg.task == "pku" else ("hh", cfg.task.replace("hh-", "") + "-base")
    return [(name, subset, split) for split in dict.fromkeys([cfg.train_split, "test"])]


def load_task(cfg):
    """-> (init, w2s, test): lists of data.Example (D_init with gold pairs, Q_w2s, the test prompts). Data the
    run cannot use (no pairs, too few distinct prompts) is a DataError here, before any model loads."""
    if cfg.task == "toy":
        import toy
        try:
            return toy.make_task(cfg.seed, cfg.n_init, cfg.n_w2s, cfg.n_test)
        except ValueError as e:
            raise data.DataError(f"{e}: lower --n_init, --n_w2s or --n_test") from None
    if cfg.task == "file":      # the file's records must be pairs, whichever of them land in D_init
        examples = data.require_pairs(data.read_any(cfg.data_file, order=cfg.pku_order))
        return data.paper_splits(examples, cfg.n_init, cfg.n_w2s, cfg.n_test, cfg.seed)
    # what is missing was named, all at once, before any training (macpo.initialise: data.missing_dataset_files)
    files = {split: data.dataset_file(name, subset, split, cfg.data_dir or None, cfg.cache_dir or None)
             for name, subset, split in dataset_requests(cfg)}
    read = (lambda f: data.read_pku(f, cfg.pku_order)) if cfg.task == "pku" else data.read_hh
    if cfg.train_split == "test":
        return data.paper_splits(read(files["test"]), cfg.n_init, cfg.n_w2s, cfg.n_test, cfg.seed)
    return data.splits_with_test_file(read(files[cfg.train_split]), read(files["test"]), cfg.n_init, cfg.n_w2s,
                                      cfg.n_test, cfg.seed)
