"""The training-signal report: is every agent, every round, trained toward better behaviour?

A MACPO run trains K + 1 agents on pairs that other agents wrote, so whether it can work at all depends on
those pairs: is the chosen response better than the rejected one, does the student's lowest-perplexity pick
beat a random teacher and how far is it from the best one, are the negative twins' outputs really worse.
When the run has a scorer (the toy task's gold reward; on real data --reward_models), every preference stage
keeps the pairs it trained on with the scores they were judged by:

    ROUND/AGENT/pairs.jsonl            (stages.dpo_stage)  prompt, chosen, rejected, trained,
                                       chosen_score {scorer: v}, rejected_score {scorer: v}
    ROUND/pairs_student/pairs.jsonl    (the student's selection) chosen_by, candidate_scores {scorer: {who: v}}

and this module turns those files into results.json["signal"][ROUND][AGENT] (pair_signal, selection_signal),
the lines printed after each round, the table's Markdown section and a plot. Reads files only: no model.
"""
import json
import statistics
from pathlib import Path


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

def _rows(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


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
    rows = _rows(path)
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
    selection = [r for r in _rows(selection_file) if "candidate_scores" in r] \
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
    lines = [f"### Training signal: what each agent was trained on (scorer: {scorer}; mean over seeds)", "",
             "Shares of the pairs each agent trained on where the chosen response scores above / below / level with "
             "the rejected one, the share of identical pairs among those given (dropped before training unless "
             "--identical_pairs keep), mean scores of both sides; for the student, the "
             "score of the teacher response it picked against the best one per prompt (oracle) and a random one.",
             "", "| method | round | agent | n | chosen better | rejected better | equal | identical | chosen | "
             "rejected | pick | oracle | random |", "|---" * 13 + "|"]

    def num(v, pct=False):
        return "-" if v is None else (f"{100 * v:.1f}%" if pct else f"{v:.3f}")
    for method, signal in by_method.items():
        for r, row in signal.items():
            for agent, s in row.items():
                lines.append(f"| {method} | {r.split('/')[-1]} | {agent} | {s['n']:.0f} | "
                             + " | ".join(num(s.get(k), True) for k in ("chosen_better", "rejected_better", "equal",
                                                                         "identical")) + " | "
                             + " | ".join(num(s.get(k)) for k in ("chosen_score", "rejected_score", "pick", "oracle",
                                                                  "random")) + " |")
    return "\n".join(lines) + "\n"


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
    import parallel
    for scorer in run.score.scorers:
        row = run_signal(run.out, {r: agents}, scorer).get(r)
        if row and parallel.is_main():
            print("\n".join(format_lines(r, row, scorer)), flush=True)
