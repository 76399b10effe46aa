"""What a run reports: its results per round, agent and prompt kind (results.json and the printed tables), the
toy bed's premises, the multi-seed table (results.md, rounds.png), and the training signal.

The training signal: is every agent, every round, trained toward better behaviour? A MACPO run trains K + 1
agents on pairs that other agents wrote, so whether it can work at all depends on those pairs: is the chosen
response better than the rejected one, does the student's lowest-perplexity pick beat a random teacher and how
far is it from the best one, are the negative twins' outputs really worse. When the run has a scorer (the toy
task's gold reward; on real data --reward_models), every preference stage keeps the pairs it trained on with
the scores they were judged by:

    ROUND/AGENT/pairs.jsonl            (stages.dpo_stage)  prompt, chosen, rejected, trained,
                                       chosen_score {scorer: v}, rejected_score {scorer: v}
    ROUND/pairs_student/pairs.jsonl    (macpo.perplexity_pick) chosen_by, candidate_scores {scorer: {who: v}}

and this module turns those files into results.json["signal"][ROUND][AGENT] (pair_signal, selection_signal),
the lines printed after each round, the table's Markdown section and a plot.
"""
import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import evaluate
import parallel
import toy
from data import read_jsonl
from evaluate import markdown_table
from stages import Run, evaluator_names, samples, write_json, write_text


# ---------------------------------------------------------------------------------------------------------
# The statistics, from scores alone

def pair_signal(chosen_scores, rejected_scores, identical):
    """The preference pairs one agent trained on -> {n, chosen_better, rejected_better, equal, identical,
    chosen_score, rejected_score}. chosen_better = share of pairs with score(chosen) > score(rejected) (the
    three shares sum to 1); identical = share with chosen == rejected as strings (`identical`: [bool]); the
    last two are mean scores. Empty input -> n 0 and None elsewhere."""
    n = len(chosen_scores)
    assert len(rejected_scores) == n == len(identical)
    if n == 0:
        return {"n": 0, **{k: None for k in ("chosen_better", "rejected_better", "equal", "identical",
                                              "chosen_score", "rejected_score")}}
    better = sum(c > r for c, r in zip(chosen_scores, rejected_scores))
    worse = sum(c < r for c, r in zip(chosen_scores, rejected_scores))
    return {"n": n, "chosen_better": better / n, "rejected_better": worse / n, "equal": (n - better - worse) / n,
            "identical": sum(identical) / n, "chosen_score": statistics.fmean(chosen_scores),
            "rejected_score": statistics.fmean(rejected_scores)}


def selection_signal(candidate_scores, chosen_by):
    """A selection among candidates per prompt -> {pick, oracle, random, picked_from}.

    candidate_scores: per prompt {candidate (who wrote it): score}; chosen_by: per prompt the candidate taken.
    pick = mean score of the taken response; oracle = mean of the best candidate's score per prompt (what a
    perfect selector would get); random = mean over all candidates (a uniformly random pick, in expectation);
    picked_from = {candidate: how many prompts took it}, in candidate order."""
    assert len(candidate_scores) == len(chosen_by) > 0
    names = list(candidate_scores[0])
    return {"pick": statistics.fmean(s[c] for s, c in zip(candidate_scores, chosen_by)),
            "oracle": statistics.fmean(max(s.values()) for s in candidate_scores),
            "random": statistics.fmean(statistics.fmean(s.values()) for s in candidate_scores),
            "picked_from": {n: sum(c == n for c in chosen_by) for n in names}}


# ---------------------------------------------------------------------------------------------------------
# From a run folder's files

def stage_signal(out, stage, scorer, kind=None):
    """Signal of the preference stage OUT/STAGE ("round2/teacher1") under `scorer` -> dict, or None when the
    stage kept no scored pairs (no scorer, or a run older than the report). n and the shares of better / worse /
    equal count the pairs the agent trained on; "identical" is the share of the pairs it was given (with
    --identical_pairs drop those are not trained on: "dropped_identical" counts them). For the student, the
    selection it took its positives from (ROUND/pairs_student) adds pick / oracle / random / picked_from, over
    every prompt (the choice is made before any pair is dropped). kind(prompt turns) -> str adds "by_kind":
    the same statistics per prompt kind."""
    out = Path(out)
    path = out / stage / "pairs.jsonl"
    if not path.exists():
        return None
    rows = read_jsonl(path)
    if rows and scorer not in rows[0].get("chosen_score", {}):
        return None
    def stats(given, selection):
        rows = [r for r in given if r["trained"]]
        s = pair_signal([r["chosen_score"][scorer] for r in rows], [r["rejected_score"][scorer] for r in rows],
                        [r["chosen"] == r["rejected"] for r in rows])
        s["identical"] = sum(r["chosen"] == r["rejected"] for r in given) / len(given) if given else None
        if selection:
            s.update(selection_signal([r["candidate_scores"][scorer] for r in selection],
                                      [r["chosen_by"] for r in selection]))
        return s

    round_name, agent = stage.rsplit("/", 1)
    selection_file = out / round_name / "pairs_student" / "pairs.jsonl"
    selection = [r for r in read_jsonl(selection_file) if "candidate_scores" in r] \
        if agent == "student" and selection_file.exists() else []
    if selection and scorer not in selection[0]["candidate_scores"]:
        selection = []
    result = dict(stats(rows, selection), dropped_identical=sum(not r["trained"] for r in rows))
    if kind is not None:
        kinds = sorted({kind(r["prompt"]) for r in rows})
        result["by_kind"] = {k: stats([r for r in rows if kind(r["prompt"]) == k],
                                      [r for r in selection if kind(r["prompt"]) == k]) for k in kinds}
    return result


def run_signal(out, rounds, scorer, kind=None):
    """{round: [agents]} -> {round: {agent: stage_signal}}, leaving out stages without scored pairs."""
    signal = {}
    for r, agents in rounds.items():
        row = {a: s for a in agents if (s := stage_signal(out, f"{r}/{a}", scorer, kind)) is not None}
        if row:
            signal[r] = row
    return signal


# ---------------------------------------------------------------------------------------------------------
# Reading it: one line per agent after each round, a Markdown table, a plot

def _pct(v):
    return "   -" if v is None else f"{100 * v:4.0f}"


def format_lines(round_name, row, scorer):
    """One round's signal as printed lines, one per agent (shares in %, scores as means)."""
    lines = [f"training signal, {round_name} (scorer: {scorer}; % of pairs):"]
    for agent, s in row.items():
        line = (f"  {agent:>9}  n {s['n']:5d}  chosen better {_pct(s['chosen_better'])}  rejected better "
                f"{_pct(s['rejected_better'])}  equal {_pct(s['equal'])}  identical {_pct(s['identical'])}")
        if s["n"]:
            line += f"  | chosen {s['chosen_score']:.3f}  rejected {s['rejected_score']:.3f}"
        if "pick" in s:
            line += (f"  | pick {s['pick']:.3f}  oracle {s['oracle']:.3f}  random {s['random']:.3f}  from "
                     + " ".join(f"{k} {v}" for k, v in s["picked_from"].items()))
        if s.get("dropped_identical"):
            line += f"  ({s['dropped_identical']} identical pairs dropped)"
        lines.append(line)
    return lines


def mean_over_seeds(signals):
    """[per seed {round: {agent: signal}}] -> the same shape, each number the mean over the seeds that have it
    (picked_from too: mean counts per teacher), "seeds" how many have it; by_kind left out."""
    out = {}
    for signal in signals:
        for r, row in signal.items():
            for agent, s in row.items():
                out.setdefault(r, {}).setdefault(agent, []).append(s)
    result = {}
    for r, row in out.items():
        result[r] = {}
        for agent, ss in row.items():
            m = {"seeds": len(ss)}
            for k in dict.fromkeys(k for s in ss for k in s):
                if k == "picked_from":
                    picks = [s[k] for s in ss if k in s]
                    m[k] = {n: statistics.fmean(p.get(n, 0) for p in picks)
                            for n in dict.fromkeys(n for p in picks for n in p)}
                elif k != "by_kind":
                    vals = [s[k] for s in ss if s.get(k) is not None]
                    m[k] = statistics.fmean(vals) if vals else None
            result[r][agent] = m
    return result


def table_markdown(by_method, scorer):
    """{method: mean_over_seeds(...)} -> a Markdown section: one row per method, round and agent."""
    def num(v, pct=False):
        return "-" if v is None else (f"{100 * v:.1f}%" if pct else f"{v:.3f}")
    rows = [[method, r.split("/")[-1], agent, f"{s['n']:.0f}"]
            + [num(s.get(k), True) for k in ("chosen_better", "rejected_better", "equal", "identical")]
            + [num(s.get(k)) for k in ("chosen_score", "rejected_score", "pick", "oracle", "random")]
            for method, signal in by_method.items() for r, row in signal.items() for agent, s in row.items()]
    return (f"### Training signal: what each agent was trained on (scorer: {scorer}; mean over seeds)\n\n"
            "Shares of the pairs each agent trained on where the chosen response scores above / below / level with "
            "the rejected one, the share of identical pairs among those given (dropped before training unless "
            "--identical_pairs keep), mean scores of both sides; for the student, the "
            "score of the teacher response it picked against the best one per prompt (oracle) and a random one.\n\n"
            + markdown_table(["method", "round", "agent", "n", "chosen better", "rejected better", "equal",
                              "identical", "chosen", "rejected", "pick", "oracle", "random"], rows))


def plot_signal(signal, path, scorer, title=""):
    """{round: {agent: signal}} -> PNG at `path`. Left: the share of pairs with the chosen response better
    (solid) and worse (dashed) than the rejected one, per agent and round. Right: the student's pick against the
    oracle and a random candidate."""
    import matplotlib
    matplotlib.use("Agg")                       # no display on CI machines
    import matplotlib.pyplot as plt
    rounds = list(signal)
    x = list(range(1, len(rounds) + 1))
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    agents = list(dict.fromkeys(a for row in signal.values() for a in row))
    for agent in agents:
        better = [signal[r].get(agent, {}).get("chosen_better") for r in rounds]
        worse = [signal[r].get(agent, {}).get("rejected_better") for r in rounds]
        line, = left.plot(x, [float("nan") if v is None else v for v in better], marker="o", label=agent)
        left.plot(x, [float("nan") if v is None else v for v in worse], "--", marker="x", color=line.get_color())
    left.set_ylabel("share of pairs: chosen better (solid), rejected better (dashed)")
    left.set_ylim(-0.02, 1.02)
    left.legend(fontsize=8)
    for key, style in (("pick", "o-"), ("oracle", "s:"), ("random", "^--")):
        values = [signal[r].get("student", {}).get(key) for r in rounds]
        if any(v is not None for v in values):
            right.plot(x, [float("nan") if v is None else v for v in values], style, label=f"student's {key}"
                       if key == "pick" else key)
    right.set_ylabel(f"mean {scorer} score of the student's positive")
    right.legend(fontsize=8)
    for ax in (left, right):
        ax.set_xlabel("round")
        ax.set_xticks(x)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def print_round(run, r, agents):
    """After round r of a run (stages.Run): one line per agent and scorer (chosen better than rejected, the
    student's pick), printed by rank 0."""
    for scorer in run.score.scorers:
        row = run_signal(run.out, {r: agents}, scorer).get(r)
        if row and parallel.is_main():
            print("\n".join(format_lines(r, row, scorer)), flush=True)


# ---------------------------------------------------------------------------------------------------------
# One run's results: every eval stage's generations scored, per agent and per prompt kind (results.json)

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
    return toy.kind if cfg.task == "toy" else None


def kind_means(values, prompts, kind):
    """Per-prompt scores -> {prompt kind: mean score}, kinds sorted (None without scores or kinds)."""
    if values is None or kind is None:
        return None
    groups = {}
    for p, v in zip(prompts, values):
        groups.setdefault(kind(p), []).append(v)
    return {k: statistics.fmean(groups[k]) for k in sorted(groups)}


def signal_blocks(cfg, run, setup, evals):
    """{scorer: {"signal": {round: {agent: ...}}, "negatives": {agent: mean score of its negative twin's
    outputs}, "weak_labels": mean score}} for every scorer of the run ({} without one)."""
    rounds = {r: list(row) for r, row in evals.items() if r not in ("init", "ceiling")}
    negatives = {a: run.score(setup.Q, v) for a, v in setup.negatives.items()}
    weak = run.score(setup.Q, setup.weak_labels)
    return {scorer: {"signal": run_signal(run.out, rounds, scorer, kind_of(cfg)),
                     "negatives": {a: statistics.fmean(v[scorer]) for a, v in negatives.items()},
                     "weak_labels": statistics.fmean(weak[scorer])} for scorer in run.score.scorers}


def check_premises(cfg, run, setup, ceiling):
    """The toy test bed's premises (toy.premises: partial, complementary teachers, a strong student, a reachable
    ceiling, real hard negatives), measured on this seed's agents after initialisation and printed before
    round 1 -> toy.premises' list, or None off the toy task or without evaluation. `ceiling`: the ceiling's
    eval stage, or None."""
    if cfg.task != "toy" or not cfg.evaluate or not setup.test:
        return None
    measured = {a: scores(run, stage, evaluate.gold_scores) for a, stage in setup.evals.items()}
    if ceiling is not None:
        measured["ceiling"] = scores(run, ceiling, evaluate.gold_scores)
    # each agent's own sampled responses to Q_w2s, against which its twin's are near misses: the stages round 1
    # samples anyway (same names, so computed once)
    own = {a: samples(cfg, run, setup.init[a], setup.Q) for a in setup.negatives}
    premises = toy.premises([ex.prompt for ex in setup.test], measured,
                            {a: (setup.Q, v, own[a]) for a, v in setup.negatives.items()}, cfg.weak_label_teacher)
    if parallel.is_main():
        failed = [p["premise"] for p in premises if not p["pass"]]
        print(f"test-bed premises (toy.premises, {len(setup.test)} test prompts): "
              + ("all hold" if not failed else f"{len(failed)} of {len(premises)} fail: {', '.join(failed)}"))
        for p in premises:
            print(f"  {'ok  ' if p['pass'] else 'FAIL'} {p['premise']:<24} {p['value']:.3f}  "
                  f"({'reported' if p['op'] == 'report' else p['op'] + ' ' + str(p['threshold'])})")
    return premises


def judge_of(cfg, run):
    """{name: f(prompts, responses) -> [float]} for the run's evaluators (stages.evaluator_names), sharing the
    signal's already loaded reward models, in one ScoreCache so a response is scored once."""
    return evaluate.ScoreCache({n: run.score.scorers.get(n) or evaluate.make_scorer(
        n, cfg.device, cfg.score_batch_size, cfg.max_length, cfg.rm_format, cfg.trust_remote_code, cfg.dtype)
        for n in evaluator_names(cfg)})


def write_results(cfg, run, setup, evals, final, premises, method):
    """OUT/results.json, results.md and results.png (and signal.png) of one method's run: the mean score per
    round and agent under every evaluator (the first one's also as "results" and per prompt kind), the final
    student's win / tie / lose against the naive-SFT student and against the weak supervisor, the premises,
    the final checkpoints and the training signal -> (results, results_by_kind, win_rates)."""
    judge = judge_of(cfg, run) if parallel.is_main() else evaluate.ScoreCache({})
    names = list(judge.scorers)
    metric = names[0] if names else None
    # {stage: {agent: {scorer: [per test prompt]}}}; None where a stage was not evaluated
    per_prompt = {}
    for r, row in evals.items():
        per_prompt[r] = {}
        for a, stage in row.items():
            rows = read_jsonl(run.out / stage / "generations.jsonl") if stage and judge else None
            per_prompt[r][a] = judge([x["prompt"] for x in rows], [x["response"] for x in rows]) if rows else None
    by_scorer = {n: {r: {a: None if v is None else statistics.fmean(v[n]) for a, v in row.items()}
                     for r, row in per_prompt.items()} for n in names}
    results = by_scorer[metric] if metric else {r: {a: None for a in row} for r, row in evals.items()}
    test_prompts = [ex.prompt for ex in setup.test]             # the order of every eval stage's generations
    by_kind = {r: {a: kind_means(v and v[metric], test_prompts, kind_of(cfg)) for a, v in row.items()}
               for r, row in per_prompt.items()}
    wins = final_win_rates(run, judge, evals, setup.evals, f"teacher{cfg.weak_label_teacher}")
    blocks = signal_blocks(cfg, run, setup, evals)
    first = next(iter(blocks), None)         # the first scorer's block also sits at the top level
    write_json(run.out / "results.json", {"metric": metric, "method": method, "results": results,
                                          "results_by_scorer": by_scorer, "results_by_kind": by_kind,
                                          "win_rates": wins, "premises": premises,
                                          "final": {a: run.name(p) for a, p in final.items()},
                                          "signal_scorer": first, **(blocks[first] if first else {}),
                                          "signal_by_scorer": blocks})
    teachers = list(setup.teachers)
    write_text(run.out / "results.md", results_markdown(cfg, method, by_scorer, by_kind, wins, premises, teachers))
    if not parallel.is_main():
        return results, by_kind, wins
    try:
        if metric:
            plot_results(by_scorer[metric], teachers, run.out / "results.png", metric, f"{method}: {cfg.task}")
        if first and blocks[first]["signal"]:
            plot_signal(blocks[first]["signal"], run.out / "signal.png", first, f"training signal: {method}")
    except ImportError:
        print("matplotlib is not installed: no results.png or signal.png (pip install matplotlib)", file=sys.stderr)
    return results, by_kind, wins


def final_win_rates(run, judge, evals, initial, weak):
    """The method's final strong student (its student's eval stage in the last row before the ceiling) against
    the naive-SFT student (Setup.evals' student: every method's start; left out when the final student is that
    one, as for --method sft) and against its weak supervisor (the weak-label teacher after initialisation), per
    test prompt -> {scorer: {"stage": final stage, "vs_naive_sft": {win, tie, lose, n}, "vs_weak": {...}}};
    {} without evaluators or evaluation."""
    rows = [row for r, row in evals.items() if r != "ceiling" and row.get("student")]
    if not judge or not rows or not initial.get("student"):
        return {}

    def scores(stage):
        generations = read_jsonl(run.out / stage / "generations.jsonl")
        return judge([x["prompt"] for x in generations], [x["response"] for x in generations])
    final = rows[-1]["student"]
    against = {"vs_naive_sft": initial["student"], "vs_weak": initial.get(weak)}
    against = {k: scores(stage) for k, stage in against.items() if stage and stage != final}
    mine = scores(final)
    return {n: {"stage": str(final).removeprefix("eval/").removesuffix("/student"), **{k: evaluate.win_rates(mine[n], v[n])
                                                             for k, v in against.items()}} for n in judge.scorers}


def print_evaluators(cfg):
    """The line a run starts with: which evaluators will score it (or that none will)."""
    if parallel.is_main():
        print("evaluator: " + (", ".join(evaluator_names(cfg)) or "none (--reward_models none): the results stay "
              "empty; score the test generations later with python macpo.py eval FOLDER --reward_models NAME"))


def print_results(results, by_kind, wins, teachers):
    """What a run prints at its end: the mean score per stage and agent, per prompt kind, the win rates."""
    print(format_table(results, teachers))
    if any(v for row in by_kind.values() for v in row.values()):
        print("\nper prompt kind:\n" + format_kind_table(by_kind))
    if wins:
        print("\nthe final student's win / tie / lose:\n" + format_wins(wins))


def format_wins(wins):
    """The final student's win / tie / lose rates as a Markdown table (one row per evaluator and opponent)."""
    return markdown_table(["evaluator", "final student", "against", "win", "tie", "lose", "n"], [
        [n, w["stage"], against.replace("vs_", "").replace("_", " "), f"{v['win']:.3f}", f"{v['tie']:.3f}",
         f"{v['lose']:.3f}", v["n"]] for n, w in wins.items() for against, v in w.items() if against != "stage"]
    ).rstrip("\n")


def results_markdown(cfg, method, by_scorer, by_kind, wins, premises, teachers):
    """One run's results.md: per evaluator the mean score per stage and agent, per prompt kind, win rates."""
    lines = [f"# {method} on {cfg.task} (`{cfg.out}`)", ""]
    if not by_scorer:
        lines += ["No evaluator (`--reward_models none`): score the test generations with "
                  "`python macpo.py eval FOLDER --reward_models NAME`.", ""]
    for n, results in by_scorer.items():
        note = " (a cost model, negated: higher = safer)" if evaluate.is_cost(n) else ""
        lines += [f"## Mean {n} score on {cfg.n_test} test prompts{note}", "", format_table(results, teachers), ""]
    if any(v for row in by_kind.values() for v in row.values()):
        lines += ["## Per prompt kind", "", format_kind_table(by_kind), ""]
    if wins:
        lines += ["## The final strong student's win / tie / lose (per test prompt, higher score wins)", "",
                  format_wins(wins), ""]
    if premises:
        failed = [p["premise"] for p in premises if not p["pass"]]
        lines += ["## Test-bed premises", "", "All hold." if not failed else f"Failing: {', '.join(failed)}.", ""]
    return "\n".join(lines)


def plot_results(results, teachers, path, metric, title=""):
    """{stage: {agent: mean score}} -> PNG at `path`: each agent's score per stage (init, round 1..T), the
    ceiling as a dotted line."""
    import matplotlib
    matplotlib.use("Agg")                       # no display on CI machines
    import matplotlib.pyplot as plt
    stages = [r for r in results if r != "ceiling"]
    fig, ax = plt.subplots(figsize=(7, 4))
    for agent in teachers + ["student"]:
        values = [results[r].get(agent) for r in stages]
        ax.plot(range(len(stages)), [float("nan") if v is None else v for v in values], marker="o",
                linestyle="-" if agent == "student" else "--", label=agent)
    if (results.get("ceiling") or {}).get("student") is not None:
        ax.axhline(results["ceiling"]["student"], color="grey", linestyle=":", label="ceiling")
    ax.set_xticks(range(len(stages)), stages)
    ax.set_ylabel(f"mean {metric} score")
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def format_table(results, teachers):
    """Mean score per agent (columns) after init, each round and the ceiling (rows), as a Markdown table."""
    cols = teachers + ["student"]
    return markdown_table(["stage"] + cols, [[stage] + ["-" if row.get(c) is None else f"{row[c]:.3f}" for c in cols]
                                             for stage, row in results.items()]).rstrip("\n")


def format_kind_table(by_kind):
    """{stage: {agent: {kind: mean}}} -> a Markdown table, one row per stage and agent, one column per kind."""
    kinds = list(dict.fromkeys(k for row in by_kind.values() for v in row.values() if v for k in v))
    return markdown_table(["stage", "agent"] + kinds, [
        [stage, agent] + [f"{v[k]:.3f}" if k in v else "-" for k in kinds]
        for stage, row in by_kind.items() for agent, v in row.items() if v]).rstrip("\n")


# ---------------------------------------------------------------------------------------------------------
# The table: every method and ablation on the same seeds, each seed one run folder (OUT/seed{S}) whose bases,
# init stages and round-1 samples are computed once and shared by every method.

TABLE_METHODS = {        # name: the flags that differ from MACPO's
    "macpo": {}, "sft": {"method": "sft"}, "confident": {"method": "confident"}, "spin": {"method": "spin"},
    "self_reward": {"method": "self_reward"}, "macpo-mp": {"mutual_positives": False},
    "macpo-hn": {"hard_negatives": False}, "macpo-k1": {"n_teachers": 1}, "macpo-k2": {"n_teachers": 2},
    "macpo-base": {"reference": "base"}}        # MACPO with the release's DPO reference, the raw base model


def parse_table_args(argv):
    """`python macpo.py table --seeds 0,1,2 --methods macpo,sft,... [run flags]` -> (its own flags, the rest)."""
    extra = argparse.ArgumentParser(prog="macpo.py table", add_help=False)
    extra.add_argument("--seeds", default="0,1,2", help="one run folder per seed: OUT/seed{S}")
    extra.add_argument("--methods", default=",".join(TABLE_METHODS), help=f"of {', '.join(TABLE_METHODS)}")
    extra.add_argument("--scorer", default="gold", help="gold (toy task) or a reward model name or folder")
    extra.add_argument("--tie_margin", type=float, default=0.0, help="win-rate score differences up to this tie")
    args, rest = extra.parse_known_args(argv)
    unknown = [m for m in args.methods.split(",") if m not in TABLE_METHODS]
    if unknown:
        sys.exit(f"error: unknown --methods {', '.join(unknown)}; choose from {', '.join(TABLE_METHODS)}")
    return args, rest


def table(cfg, seeds, methods, initialise, ceiling_stage, run_methods, scorer_name="gold", tie_margin=0.0):
    """`methods` (TABLE_METHODS names) for every seed -> the text of OUT/results.md, also written with
    OUT/rounds.png and OUT/table.json. Algorithm 1 comes in from macpo.py (which this module does not import):
    initialise, ceiling_stage and run_methods ({--method: (cfg, run, setup, prefix) -> (evals, final)})."""
    t0 = time.time()
    scorer = evaluate.make_scorer(scorer_name, cfg.device, cfg.score_batch_size, cfg.max_length, dtype=cfg.dtype)
    per_seed, reference = {m: {} for m in methods}, {}
    cache = str(toy.base_cache(cfg))     # every seed's folder is OUT/seed{S}; the toy bases sit beside OUT
    for seed in seeds:
        seed_cfg = dataclasses.replace(cfg, seed=seed, out=str(Path(cfg.out) / f"seed{seed}"), toy_base_cache=cache)
        run = Run(seed_cfg)
        # the seed's shared agents first: the weak supervisor, the ceiling, the bed's premises (printed)
        setup = initialise(seed_cfg, run)
        ceiling = ceiling_stage(seed_cfg, run, setup)
        premises = check_premises(seed_cfg, run, setup, ceiling if cfg.ceiling else None)
        test_prompts = [ex.prompt for ex in setup.test]
        blocks = signal_blocks(seed_cfg, run, setup, {})
        weak = scores(run, setup.evals[setup.teachers[cfg.weak_label_teacher]], scorer)
        ceiling = scores(run, ceiling, scorer)
        reference[seed] = {"weak": statistics.fmean(weak), "ceiling": statistics.fmean(ceiling),
                           "weak_kinds": kind_means(weak, test_prompts, kind_of(cfg)),
                           "ceiling_kinds": kind_means(ceiling, test_prompts, kind_of(cfg)),
                           "negatives": {name: b["negatives"] for name, b in blocks.items()},
                           "weak_labels": {name: b["weak_labels"] for name, b in blocks.items()},
                           "premises": premises}
        for m in methods:
            method_cfg = dataclasses.replace(seed_cfg, **TABLE_METHODS[m])
            setup = initialise(method_cfg, run)
            evals, _ = run_methods[method_cfg.method](method_cfg, run, setup, "" if m == "macpo" else f"{m}/")
            means = mean_scores(run, evals, scorer)
            blocks = signal_blocks(method_cfg, run, setup, evals)
            per_seed[m][seed] = {
                "rounds": [{"student": row["student"], "teachers": statistics.fmean(
                    row.get(n, means["init"][n]) for n in setup.teachers)} for row in means.values()],
                "scores": (final := scores(run, evals[list(evals)[-1]]["student"], scorer)),
                "kinds": kind_means(final, test_prompts, kind_of(method_cfg)),
                "signal": {name: b["signal"] for name, b in blocks.items()}}
        del run
    return write_table(cfg, seeds, methods, per_seed, reference, scorer_name, tie_margin, time.time() - t0)


def write_table(cfg, seeds, methods, per_seed, reference, scorer_name, tie_margin, seconds):
    """OUT/table.json, OUT/results.md (-> its text), OUT/rounds.png and OUT/signal.png from the table's numbers."""
    summary = evaluate.summarise(per_seed, reference, "macpo", tie_margin)
    out = Path(cfg.out)
    write_json(out / "table.json", {"per_seed": per_seed, "reference": reference, "summary": summary})
    header = (f"# Weak-to-strong results: {cfg.task}, {len(seeds)} seed(s) ({', '.join(map(str, seeds))}), "
              f"K = {cfg.K} teachers, T = {cfg.T} rounds, scorer: {scorer_name}\n\n"
              f"Sizes: {cfg.n_init} init / {cfg.n_w2s} weak-to-strong / {cfg.n_test} test prompts. "
              f"Wall time {seconds:.0f} s. Written by `python macpo.py table` (run.sh table); "
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
    if signal_name:                 # what each method trained on, mean over seeds
        signal = {m: mean_over_seeds([per_seed[m][sd]["signal"][signal_name] for sd in seeds]) for m in methods}
        twins = {a: statistics.fmean(reference[sd]["negatives"][signal_name][a] for sd in seeds)
                 for a in reference[seeds[0]]["negatives"][signal_name]}
        text += ("\n" + table_markdown(signal, signal_name) + "\nWeak labels' mean score: "
                 f"{statistics.fmean(reference[sd]['weak_labels'][signal_name] for sd in seeds):.3f}; the negative "
                 "twins' outputs (the hard negatives): " + ", ".join(f"{a} {v:.3f}" for a, v in twins.items())
                 + " (mean over seeds).\n")
        if "macpo" in signal and signal["macpo"] and parallel.is_main():
            try:
                plot_signal(signal["macpo"], out / "signal.png", signal_name, "training signal: MACPO, mean over seeds")
            except ImportError:
                pass                # said once below, for rounds.png
    write_text(out / "results.md", text)
    try:
        evaluate.plot_rounds(summary, out / "rounds.png", "gold reward" if scorer_name == "gold" else scorer_name)
    except ImportError:
        print("matplotlib is not installed: no rounds.png (pip install matplotlib)", file=sys.stderr)
    return text
