"""Evaluation: score saved test generations, compare methods, summarise a weak-to-strong experiment.

    python macpo.py eval runs/toy                                   # every generations.jsonl under the folder
    python macpo.py eval runs/hh --reward_models OpenAssistant/reward-model-deberta-v3-large-v2
    python macpo.py eval runs/pku --reward_models models/beaver-7b-v1.0-reward,models/beaver-7b-v1.0-cost \
        --baseline eval/init/student                                # + win/tie/lose of every file against one

Scorers turn (prompt turns, response) into one float per response, higher = better:
  gold    the toy task's exact reward (toy.reward, 0 or 1): the share of prompts answered correctly
  NAME    any AutoModelForSequenceClassification (hub name or folder): its first logit. PKU-SafeRLHF's reward
          model (higher = more helpful) and cost model (higher = less safe) are two such scorers, reported
          side by side, each under its own name; a model whose name contains "cost" is a cost model and its
          score is negated, so that every scorer, win rate and training signal reads higher = better.
Each task has a default evaluator (EVALUATORS), used by a run and by `eval` on a run folder unless
--reward_models names others or "none".
The paper's exact reward models, GPT-4 judge prompt and human protocol are not published (README.md, "Where
the paper is silent"); the mean score on the test prompts and pairwise win / tie / lose rates are the assumed
metrics. Also the Markdown of the multi-seed table (report.table runs it). Above generate.py, below macpo.py.
"""
import argparse
import json
import math
import statistics
from pathlib import Path

import torch

import data
import parallel
from generate import length_sorted_batches


# ---------------------------------------------------------------------------------------------------------
# Scorers

# Each task's default evaluator (--reward_models auto) and its input format (--rm_format auto). The paper names
# no reward model (../shared/paper.md, section 4); these are the usual public choices. HH: OpenAssistant's
# DeBERTa-v3-large reward model (435M parameters, trained on HH-RLHF's train split among others, so HH's test
# prompts are in its domain, and small enough to sit beside the agents). PKU-SafeRLHF: the dataset authors'
# beaver-7b reward (helpfulness) and cost (harm) models, trained on PKU-SafeRLHF.
EVALUATORS = {"hh-helpful": ("OpenAssistant/reward-model-deberta-v3-large-v2", "pair"),
              "hh-harmless": ("OpenAssistant/reward-model-deberta-v3-large-v2", "pair"),
              "pku": ("PKU-Alignment/beaver-7b-v1.0-reward,PKU-Alignment/beaver-7b-v1.0-cost", "beaver")}
RM_FORMATS = ("pair", "beaver")          # besides the prompt templates (data.TEMPLATES)


def resolve_evaluators(task, reward_models, rm_format):
    """--reward_models and --rm_format as given -> (comma-separated reward models, format): "auto" is the
    task's default evaluator (EVALUATORS; none for the toy task, scored by its gold reward, and for --task
    file), "none" (or "") none."""
    default, default_format = EVALUATORS.get(task, ("", "pair"))
    names = default if reward_models == "auto" else "" if reward_models == "none" else reward_models
    # named models keep "auto": make_scorer then reads the format off the loaded model (beaver for a safe-rlhf
    # score model, pair otherwise)
    fmt = default_format if rm_format == "auto" and reward_models == "auto" else rm_format
    return names, fmt


def reward_model_names(reward_models):
    """"A,B" -> ["A", "B"] ("none" and "" -> [])."""
    return [n.strip() for n in reward_models.split(",") if n.strip() and n.strip() != "none"]


def is_cost(name):
    """A cost model (higher = worse, e.g. beaver-7b-v1.0-cost), by its name; its scores are negated."""
    return "cost" in Path(name.rstrip("/")).name.lower()

def gold_scores(prompts, responses):
    """The toy task's exact reward per (prompt turns, response): 1.0 when correct, else 0.0."""
    import toy
    return [toy.reward(p, r) for p, r in zip(prompts, responses)]


def load_reward_model(name_or_path, device="cpu", trust_remote_code=False, dtype="auto"):
    """Any AutoModelForSequenceClassification, its weights in `dtype` (--dtype: "auto" is bf16 on CUDA, float32
    on CPU), and its tokenizer, in eval mode.

    safe-rlhf's score models (beaver-7b: architectures ["LlamaModelForScore"], a bias-free `score_head` read at
    the last token) load as the architecture's ...ForSequenceClassification with one label, `score_head`'s
    weight copied into its `score` layer: the same last-non-pad-token linear score, without the safe_rlhf
    package."""
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    score_model = any(a.endswith("ForScore") for a in (config.architectures or []))
    if score_model:
        config.num_labels, config.architectures = 1, None
    model = AutoModelForSequenceClassification.from_pretrained(name_or_path, config=config,
                                                               trust_remote_code=trust_remote_code,
                                                               **parallel.dtype_kwargs(device, dtype))
    if score_model:
        _load_score_head(model, name_or_path)
    model.is_score_model = score_model           # its input format under --rm_format auto: beaver
    data.ensure_pad_token(tokenizer)
    if model.config.pad_token_id is None:       # the classifier pools at the last non-pad token: it needs one
        model.config.pad_token_id = tokenizer.pad_token_id
    return model.to(device).eval(), tokenizer


def _load_score_head(model, name_or_path):
    """Copy a safe-rlhf checkpoint's score_head.weight [1, hidden] into model.score (from its safetensors or
    pytorch_model files, local or in the hub cache); ModelLoadError when it has none."""
    import glob
    import os

    from huggingface_hub import snapshot_download
    from safetensors import safe_open
    folder = name_or_path if os.path.isdir(name_or_path) else snapshot_download(
        name_or_path, allow_patterns=["*.safetensors", "*.bin", "*.json"])
    for path in sorted(glob.glob(os.path.join(folder, "*.safetensors")) + glob.glob(os.path.join(folder, "*.bin"))):
        if path.endswith(".safetensors"):
            with safe_open(path, "pt") as f:
                key = next((k for k in f.keys() if k.endswith("score_head.weight")), None)
                weight = f.get_tensor(key) if key else None
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
            key = next((k for k in state if k.endswith("score_head.weight")), None)
            weight = state[key] if key else None
        if weight is not None:
            with torch.no_grad():
                model.score.weight.copy_(weight.reshape(model.score.weight.shape))
            return
    raise data.ModelLoadError(f"{name_or_path} declares a score model (…ForScore) but no file in {folder} holds "
                              f"score_head.weight")


def rm_inputs(prompt, response, rm_format="pair"):
    """How a (prompt turns, response) is shown to a reward model.
    pair     (question, answer) as a tokenizer text pair, the OpenAssistant DeBERTa reward models' format;
             the question is the user turn, or the whole dialogue in HH's Human/Assistant form when longer
    beaver   safe-rlhf's "BEGINNING OF CONVERSATION: USER: {u} ASSISTANT:{response}" (its model cards'), one
             text, earlier turns as "USER: ... ASSISTANT: ..." in between
    a data.TEMPLATES name (vicuna, alpaca, hh, ...)  one text: the rendered prompt, a space, the response."""
    if rm_format == "pair":
        question = prompt[-1]["content"] if len(prompt) == 1 else data.render_prompt(prompt, "hh")
        return (question, response)
    if rm_format == "beaver":
        turns = " ".join(f"USER: {t['content']}" if t["role"] == "user" else f"ASSISTANT:{t['content']}"
                         for t in prompt)
        return (f"BEGINNING OF CONVERSATION: {turns} ASSISTANT:{response}",)
    return (data.render_prompt(prompt, rm_format, system="") + " " + response,)


@torch.inference_mode()
def reward_model_scores(model, tokenizer, prompts, responses, batch_size=16, max_length=1024, rm_format="pair"):
    """One float per (prompt turns, response): the classifier's first logit, in input order.
    Batched by length (longest first; right padding, which the classifier's last-non-pad pooling skips)."""
    encoded = [tokenizer(*rm_inputs(p, r, rm_format), truncation=True, max_length=max_length)["input_ids"]
               for p, r in zip(prompts, responses)]
    device = next(model.parameters()).device
    pad_id = model.config.pad_token_id
    out = [0.0] * len(encoded)
    for idx in length_sorted_batches([len(e) for e in encoded], batch_size):
        T = max(len(encoded[i]) for i in idx)
        input_ids = torch.full((len(idx), T), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(idx), T), dtype=torch.long)
        for r, i in enumerate(idx):
            input_ids[r, :len(encoded[i])] = torch.tensor(encoded[i])
            attention_mask[r, :len(encoded[i])] = 1
        logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).logits  # [B, L]
        for i, v in zip(idx, logits[:, 0].float().tolist()):
            out[i] = v
    return out


def make_scorer(name, device="cpu", batch_size=16, max_length=1024, rm_format="pair", trust_remote_code=False,
                dtype="auto"):
    """name "gold" or a reward model -> f(prompts, responses) -> [float], higher = better (a cost model's
    scores negated). The model is loaded on first use."""
    if name == "gold":
        return gold_scores
    loaded, sign = {}, -1.0 if is_cost(name) else 1.0

    def score(prompts, responses):
        if not loaded:
            loaded["model"], loaded["tokenizer"] = load_reward_model(name, device, trust_remote_code, dtype)
        fmt = rm_format if rm_format != "auto" else "beaver" if loaded["model"].is_score_model else "pair"
        return [sign * v for v in reward_model_scores(loaded["model"], loaded["tokenizer"], prompts, responses,
                                                      batch_size, max_length, fmt)]
    return score



class ScoreCache:
    """Several scorers by name; each (prompt, response) is scored once per process and scorer.

    MACPO's pairs reuse responses (the negative twins' outputs every round, a teacher's response as the
    student's positive and again as a candidate), and a reward model's inference is the cost, so scores are
    remembered. __call__(prompts, responses) -> {scorer name: [float per response]}, in input order; the new
    pairs of one call go to each scorer in one batched call. An empty cache (no scorer) returns {}."""

    def __init__(self, scorers):
        self.scorers = dict(scorers)                        # {name: f(prompts, responses) -> [float]}
        self.memo = {name: {} for name in self.scorers}

    def __bool__(self):
        return bool(self.scorers)

    def __call__(self, prompts, responses):
        keys = [(json.dumps(p, sort_keys=True), r) for p, r in zip(prompts, responses)]
        out = {}
        for name, score in self.scorers.items():
            memo = self.memo[name]
            new = {}                                        # unscored key -> its first index
            for i, k in enumerate(keys):
                if k not in memo:
                    new.setdefault(k, i)
            new = list(new.values())
            if new:
                for i, v in zip(new, score([prompts[i] for i in new], [responses[i] for i in new])):
                    memo[keys[i]] = float(v)
            out[name] = [memo[k] for k in keys]
        return out


# ---------------------------------------------------------------------------------------------------------
# Comparisons

def win_rates(scores_a, scores_b, margin=0.0):
    """A against B on the same prompts: A wins where score_a - score_b > margin, loses where
    score_b - score_a > margin, ties otherwise. -> {"win", "tie", "lose"} as shares, and "n"."""
    assert len(scores_a) == len(scores_b) and scores_a
    win = sum(a - b > margin for a, b in zip(scores_a, scores_b))
    lose = sum(b - a > margin for a, b in zip(scores_a, scores_b))
    n = len(scores_a)
    return {"win": win / n, "tie": (n - win - lose) / n, "lose": lose / n, "n": n}


def pgr(student, weak, ceiling):
    """Performance gap recovered (Burns et al. 2023): (student - weak) / (ceiling - weak). 1 = the student
    trained on weak labels does as well as on ground truth, 0 = no better than its weak supervisor.
    nan when the ceiling does not beat the weak supervisor (no gap to recover)."""
    return (student - weak) / (ceiling - weak) if ceiling > weak else math.nan


def mean_std(values):
    """-> (mean, sample standard deviation; 0 for a single value), ignoring nans."""
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def fmt(values, digits=3):
    m, s = mean_std(values)
    return "-" if math.isnan(m) else f"{m:.{digits}f} ± {s:.{digits}f}"


def markdown_table(header, rows):
    """The one Markdown table writer: header cells and rows of (formatted) cells -> the table's text."""
    lines = ["| " + " | ".join(map(str, header)) + " |", "|---" * len(header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(map(str, row)) + " |" for row in rows]) + "\n"


# ---------------------------------------------------------------------------------------------------------
# The weak-to-strong table. `per_seed[method][seed]` (written by report.table) holds:
#   "rounds":   [{"student": mean score, "teachers": mean score over the K teachers}, ...]  init, round 1..T
#   "scores":   the final strong student's score per test prompt (for win rates)
# and `reference[seed]` holds "weak" (the weak-label teacher's score after init: the supervisor of the
# weak-to-strong step) and "ceiling" (the strong student SFT on ground truth).

def summarise(per_seed, reference, baseline_of="macpo", margin=0.0):
    """-> {"methods": {method: {"student": [[per seed] per round], "teachers": ..., "pgr": [per seed]}},
    "weak": [per seed], "ceiling": [per seed], "win_rates": {baseline: {...}}}. Win rates pool every seed's
    test prompts: MACPO's final student against each other method's."""
    seeds = sorted(reference)
    out = {"methods": {}, "weak": [reference[s]["weak"] for s in seeds],
           "ceiling": [reference[s]["ceiling"] for s in seeds], "win_rates": {}}
    for method, by_seed in per_seed.items():
        T = max(len(by_seed[s]["rounds"]) for s in by_seed)
        student = [[by_seed[s]["rounds"][min(t, len(by_seed[s]["rounds"]) - 1)]["student"] for s in by_seed]
                   for t in range(T)]
        teachers = [[by_seed[s]["rounds"][min(t, len(by_seed[s]["rounds"]) - 1)]["teachers"] for s in by_seed]
                    for t in range(T)]
        out["methods"][method] = {"student": student, "teachers": teachers, "pgr": [
            pgr(by_seed[s]["rounds"][-1]["student"], reference[s]["weak"], reference[s]["ceiling"]) for s in by_seed]}
    if baseline_of in per_seed:
        mine = per_seed[baseline_of]
        for method, by_seed in per_seed.items():
            if method != baseline_of:
                common = [s for s in mine if s in by_seed]
                out["win_rates"][method] = win_rates(sum((mine[s]["scores"] for s in common), []),
                                                     sum((by_seed[s]["scores"] for s in common), []), margin)
    return out


def results_markdown(summary, header="", margin=0.0):
    """The summary as Markdown: student and teacher score per round (mean ± std over seeds), final, PGR;
    the weak supervisor and the ceiling; win / tie / lose of MACPO against each other method."""
    methods = summary["methods"]
    T = max(len(m["student"]) for m in methods.values())
    rounds = ["init"] + [f"round {t}" for t in range(1, T)]
    lines = [header, "", "### Strong student (gold reward, mean ± std over seeds)", "",
             markdown_table(["method"] + rounds + ["PGR (final)"], [
                 [name] + [fmt(m["student"][t]) if t < len(m["student"]) else "" for t in range(T)]
                 + [fmt(m["pgr"], 2)] for name, m in methods.items()]).rstrip("\n")]
    lines += ["", f"Weak supervisor (the weak-label teacher after init): {fmt(summary['weak'])}; "
              f"ceiling (the strong student SFT on ground truth): {fmt(summary['ceiling'])}. "
              "PGR = (student - weak) / (ceiling - weak), per seed, then mean ± std.", "",
              "### Weak teachers (mean over the K teachers, then mean ± std over seeds)", "",
              markdown_table(["method"] + rounds, [
                  [name] + [fmt(m["teachers"][t]) if t < len(m["teachers"]) else "" for t in range(T)]
                  for name, m in methods.items()]).rstrip("\n")]
    if summary["win_rates"]:
        lines += ["", f"### MACPO's final strong student against each method's (per test prompt, all seeds "
                  f"pooled, tie margin {margin})", "",
                  markdown_table(["against", "win", "tie", "lose", "n"], [
                      [name, f"{w['win']:.3f}", f"{w['tie']:.3f}", f"{w['lose']:.3f}", w["n"]]
                      for name, w in summary["win_rates"].items()]).rstrip("\n")]
    lines += _verdict(methods)
    return "\n".join(lines) + "\n"


def premises_markdown(by_seed, weak, ceiling, n_test):
    """The test bed's premises per seed ({seed: toy.premises list}) and, across seeds, its noise: the spread of
    the weak supervisor and of the ceiling (standard deviations <= 0.05 and <= 0.03) and one seed's standard
    error at a score of 0.5 (0.5 / sqrt(n_test) <= 0.015) -> a Markdown section."""
    seeds = list(by_seed)
    names = list(dict.fromkeys(p["premise"] for ps in by_seed.values() for p in ps))
    rows = []
    for name in names:
        cells, threshold = [], ""
        for sd in seeds:
            p = next((p for p in by_seed[sd] if p["premise"] == name), None)
            threshold = threshold or (p and (f"in [{p['threshold'][0]}, {p['threshold'][1]}]" if p["op"] == "in"
                                             else "(reported)" if p["op"] == "report" else f"{p['op']} {p['threshold']}"))
            cells.append("-" if p is None else f"{p['value']:.3f}{'' if p['pass'] else ' FAIL'}")
        rows.append([name, threshold] + cells)
    lines = ["### Test-bed premises (measured after initialisation, every seed)", "",
             markdown_table(["premise", "threshold"] + [f"seed {sd}" for sd in seeds], rows).rstrip("\n")]
    noise = [("std of the weak supervisor over seeds", mean_std(weak)[1], 0.05),
             ("std of the ceiling over seeds", mean_std(ceiling)[1], 0.03),
             ("one seed's standard error at 0.5", 0.5 / math.sqrt(max(n_test, 1)), 0.015)]
    lines.append("")
    lines += [f"- {name}: {v:.3f} (<= {t}){'' if v <= t else ' FAIL'}" for name, v, t in noise]
    failed = sum(not p["pass"] for ps in by_seed.values() for p in ps) + sum(v > t for _, v, t in noise)
    lines += ["", "Every premise holds in every seed." if not failed else f"{failed} premise checks fail (FAIL above)."]
    return "\n".join(lines) + "\n"


def kinds_markdown(per_method, weak, ceiling):
    """Final strong student per prompt kind: {method: [per seed {kind: mean}]}, and the weak supervisor's and the
    ceiling's [per seed {kind: mean}] -> a Markdown section (mean ± std over seeds)."""
    rows = dict(per_method, **{"weak supervisor": weak, "ceiling": ceiling})
    kinds = list(dict.fromkeys(k for per_seed in rows.values() for v in per_seed if v for k in v))
    return "### Final strong student per prompt kind (mean ± std over seeds)\n\n" + markdown_table(
        ["method"] + kinds, [[name] + [fmt([v[k] for v in per_seed if v and k in v]) for k in kinds]
                             for name, per_seed in rows.items()])


def _verdict(methods, name="macpo"):
    """Plain words on whether MACPO's final strong student beats each other method's. Seeds differ more than
    methods do (each seed pre-trains and initialises its own agents), so the comparison is paired: MACPO minus
    the method within each seed. "beats" = higher in every seed, "loses to" = lower in every seed, else mixed."""
    if name not in methods or len(methods) < 2:
        return []
    final = {m: v["student"][-1] for m, v in methods.items()}
    n = len(final[name])
    rows, groups = [], {"beats": [], "loses to": [], "mixed against": []}
    for m in final:
        if m == name:
            continue
        diffs = [a - b for a, b in zip(final[name], final[m])]
        verdict = "beats" if all(d > 0 for d in diffs) else "loses to" if all(d < 0 for d in diffs) else "mixed against"
        groups[verdict].append(f"{m} ({statistics.fmean(diffs):+.3f})")
        rows.append([m] + [f"{d:+.3f}" for d in diffs] + [f"{statistics.fmean(diffs):+.3f}", verdict.split()[0]])
    lines = ["", "### MACPO's final strong student minus each method's, per seed (paired; seeds in --seeds order)", "",
             markdown_table(["method"] + [f"seed #{i + 1}" for i in range(n)] + ["mean", "verdict"], rows).rstrip("\n")]
    text = [f"MACPO's final strong student scores {statistics.fmean(final[name]):.3f} (mean over {n} seeds)."]
    for verdict, which in groups.items():
        if which:
            text.append(f"In every seed it {verdict} {', '.join(which)}." if verdict != "mixed against" else
                        f"Mixed, neither higher nor lower in every seed, against {', '.join(which)}.")
    return lines + ["", "### Verdict", "", " ".join(text) + " (mean paired differences in brackets.) Why, as far "
                    "as measured, and what changed when the bed was varied: results/README.md."]


def plot_rounds(summary, path, ylabel="gold reward"):
    """Score against round -> PNG at `path`. Left: one line per method (the strong student, mean over seeds)
    and the weak teachers of MACPO (dashed), with the weak supervisor and the ceiling. Right: the same students
    minus the naive-SFT student of their own seed (the shared round-0 student), mean ± std over seeds: the
    seeds' agents differ far more than the methods do, and the paired difference removes that."""
    import matplotlib
    matplotlib.use("Agg")                       # no display on CI machines
    import matplotlib.pyplot as plt
    import matplotlib.ticker
    fig, (ax, gain) = plt.subplots(1, 2, figsize=(12, 4.5))
    methods = summary["methods"]
    T = max(len(m["student"]) for m in methods.values())
    start = (methods.get("sft") or methods.get("macpo") or next(iter(methods.values())))["student"][0]   # [seeds]
    for name, m in methods.items():
        # a method without rounds (naive SFT, confident loss) is a flat line at its one score
        student = m["student"] if len(m["student"]) > 1 else m["student"] * T
        x = list(range(len(student)))
        line, = ax.plot(x, [mean_std(v)[0] for v in student], marker="o", label=name)
        diffs = [[a - b for a, b in zip(v, start)] for v in student]
        mean, std = [mean_std(d)[0] for d in diffs], [mean_std(d)[1] for d in diffs]
        gain.plot(x, mean, marker="o", color=line.get_color(), label=name)
        gain.fill_between(x, [a - b for a, b in zip(mean, std)], [a + b for a, b in zip(mean, std)],
                          color=line.get_color(), alpha=0.08)
    if "macpo" in methods:
        teachers = methods["macpo"]["teachers"]
        ax.plot(range(len(teachers)), [mean_std(v)[0] for v in teachers], "k--", marker="s",
                label="weak teachers (MACPO)")
    for key, style in (("ceiling", ":"), ("weak", "-.")):
        ax.axhline(mean_std(summary[key])[0], color="grey", linestyle=style, label=key)
    gain.axhline(0.0, color="grey", linewidth=0.8)
    for a in (ax, gain):
        a.set_xlabel("round (0 = after initialisation)")
        a.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))      # rounds are whole numbers
    ax.set_ylabel(f"{ylabel} (mean over seeds)")
    gain.set_ylabel(f"{ylabel} minus the seed's naive-SFT student")
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------------
# `python macpo.py eval FOLDER`: score any folder of generations.jsonl files (prompt turns + response rows).

def read_generations(path):
    rows = data.read_jsonl(path)
    # plain strings are accepted as prompts too (a run done elsewhere): one user turn
    return [r["prompt"] if isinstance(r["prompt"], list) else [{"role": "user", "content": r["prompt"]}]
            for r in rows], [r["response"] for r in rows]


def evaluate_folder(folder, scorers, baseline=None, margin=0.0):
    """Score every generations.jsonl under `folder` with every scorer; with `baseline` (a path relative to
    folder, or a part of one), also win / tie / lose of every file against it on the same prompts.
    -> {file: {scorer: {"mean": float, "scores": [..]}, "win_rates": {scorer: {...}}}}."""
    folder = Path(folder)
    files = sorted(folder.rglob("generations.jsonl"))
    if not files:
        raise FileNotFoundError(f"no generations.jsonl under {folder}")
    results = {}
    for f in files:
        prompts, responses = read_generations(f)
        name = str(f.parent.relative_to(folder))
        results[name] = {s: {"mean": statistics.fmean(v) if v else math.nan, "scores": v}
                         for s, v in ((s, fn(prompts, responses)) for s, fn in scorers.items())}
        results[name]["prompts"] = prompts
    if baseline is not None:
        base = next((n for n in results if n == baseline), None) or next(n for n in results if baseline in n)
        for name, r in results.items():
            if name != base and r["prompts"] == results[base]["prompts"]:
                r["win_rates"] = {s: win_rates(r[s]["scores"], results[base][s]["scores"], margin) for s in scorers}
    return results


def run_evaluators(folder, reward_models, gold, rm_format):
    """Which scorers `eval FOLDER` uses, and why -> (names, rm_format, the line saying so). Named reward models
    (and --gold) when given; otherwise the run's own evaluators, read from FOLDER/config.json. A folder without
    one, or the toy task's gold reward asked for on a real-data run, is refused (SystemExit) with what to pass:
    scoring HH or PKU answers with the toy's arithmetic reward would give every output 0 without a word."""
    config = Path(folder) / "config.json"
    run = json.loads(config.read_text()) if config.is_file() else None
    task = run.get("task") if run else None
    if gold and task not in (None, "toy"):
        raise SystemExit(f"error: --gold is the toy task's reward; {folder} is a {task} run ({config}). Pass "
                         f"--reward_models NAME, or nothing to use the run's evaluator")
    if reward_models == "none":
        raise SystemExit("error: --reward_models none leaves nothing to score; name a reward model or --gold")
    names = reward_model_names(reward_models or "")
    if names or gold:
        return ["gold"] * bool(gold) + names, rm_format, "as named on the command line"
    if run is None:
        raise SystemExit(f"error: no evaluator for {folder}: it holds no config.json naming its task. Pass "
                         f"--reward_models NAME[,NAME] (HH: {EVALUATORS['hh-helpful'][0]}; PKU: "
                         f"{EVALUATORS['pku'][0]}), or --gold for the toy task")
    names, fmt = resolve_evaluators(task, run.get("reward_models", "auto"), run.get("rm_format", "auto"))
    names = ["gold"] * (task == "toy") + reward_model_names(names)
    if not names:
        raise SystemExit(f"error: the {task} run in {folder} has no evaluator (--reward_models none); pass "
                         f"--reward_models NAME[,NAME]")
    return names, fmt if rm_format == "auto" else rm_format, f"the run's ({config})"


def main(argv=None):
    parser = argparse.ArgumentParser(prog="macpo.py eval", description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", help="a run folder (or any folder) holding generations.jsonl files")
    parser.add_argument("--reward_models", default=None,
                        help="comma-separated AutoModelForSequenceClassification names or folders (PKU: reward,cost); "
                             "default: the run's evaluator, from FOLDER/config.json")
    parser.add_argument("--gold", action=argparse.BooleanOptionalAction, default=False,
                        help="score with the toy task's gold reward (a toy run's default)")
    parser.add_argument("--rm_format", default="auto", help="auto, pair, beaver, or a prompt template name (see rm_inputs)")
    parser.add_argument("--baseline", default=None, help="win / tie / lose of every file against this one")
    parser.add_argument("--tie_margin", type=float, default=0.0, help="score differences up to this are ties")
    parser.add_argument("--device", default=parallel.default_device())
    parser.add_argument("--dtype", default="auto", choices=("auto",) + tuple(parallel.DTYPES),
                        help="the reward models' weights: auto = bfloat16 on cuda, float32 on cpu")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--max_length", type=int, default=1024)
    args = parser.parse_args(argv)
    names, rm_format, why = run_evaluators(args.folder, args.reward_models, args.gold, args.rm_format)
    print(f"evaluator: {', '.join(names)} ({why})")
    scorers = {n: make_scorer(n, args.device, args.batch_size, args.max_length, rm_format, dtype=args.dtype)
               for n in names}
    results = evaluate_folder(args.folder, scorers, args.baseline, args.tie_margin)
    out = Path(args.folder) / "eval_scores.json"
    out.write_text(json.dumps({n: {k: v for k, v in r.items() if k != "prompts"} for n, r in results.items()},
                              indent=1) + "\n")
    baseline = [f"{s} win/tie/lose vs baseline" for s in names] if args.baseline else []
    print(markdown_table(["generations"] + names + baseline, [
        [n] + [f"{r[s]['mean']:.4f}" for s in names]
        + [(lambda w: f"{w['win']:.2f}/{w['tie']:.2f}/{w['lose']:.2f}" if w else "-")(r.get("win_rates", {}).get(s))
           for s in names if args.baseline] for n, r in results.items()]), end="")
    print(f"\nper-response scores: {out}")
