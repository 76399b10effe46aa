"""Probe (issue 21): can a toy teacher learn from correct positives at all? Each teacher gets MACPO's own update,
T rounds of DPO + 0.2 SFT against its twin's hard negatives, but with the ground-truth response as its positive
instead of the student's: the upper bound of what MACPO's teachers could gain on the bed. Reuses a finished run
folder's initial agents; writes stages under OUT/probe-gold/ and prints each teacher's gold reward per kind.

    .venv/bin/python results/probes/gold_teachers.py runs/probe-share10 [--rounds 3]
"""
import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))          # the project

import macpo  # noqa: E402
import toy  # noqa: E402
from stages import Run, dpo_stage, evaluate_stage, read_jsonl  # noqa: E402

args = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
args.add_argument("folder")
args.add_argument("--rounds", type=int, default=3)
a = args.parse_args()
saved = json.loads((Path(a.folder) / "config.json").read_text())
cfg = macpo.Config(**{k: v for k, v in saved.items() if k in macpo.Config.__dataclass_fields__})
cfg.device = "cpu"
run = Run(cfg)
setup = macpo.initialise(cfg, run)                  # every init stage is done: read back, nothing retrained
gold = [ex.chosen for ex in setup.w2s]              # the ground-truth responses to Q_w2s
rows = {}
for n in setup.teachers:
    agent = setup.init[n]
    stages = {"init": setup.evals[n]}
    for t in range(1, a.rounds + 1):
        agent = dpo_stage(cfg, run, f"probe-gold/round{t}/{n}", agent, list(zip(setup.Q, gold, setup.negatives[n])),
                          setup.reference(cfg.reference, n), setup.lora[n])
        stages[f"round{t}"] = evaluate_stage(cfg, run, f"eval/probe-gold/round{t}/{n}", agent, setup.test)
    for r, stage in stages.items():
        gen = read_jsonl(run.out / stage / "generations.jsonl")
        by_kind = {}
        for x in gen:
            by_kind.setdefault(toy.kind(x["prompt"]), []).append(toy.reward(x["prompt"], x["response"]))
        rows[(n, r)] = {k: statistics.fmean(v) for k, v in sorted(by_kind.items())}
run.close()
kinds = sorted({k for v in rows.values() for k in v})
print("| teacher | stage | " + " | ".join(kinds) + " |\n|---|---|" + "---|" * len(kinds))
for (n, r), v in rows.items():
    print(f"| {n} | {r} | " + " | ".join(f"{v[k]:.3f}" for k in kinds) + " |")
