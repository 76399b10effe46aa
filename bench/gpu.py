"""Does macpo run on this GPU, and how fast? One command, under 8 minutes on one H200, no downloads.

    bash run.sh gpu                              # = python -m bench.gpu: CUDA, bf16; runs/gpu/gpu.json and gpu.md
    bash run.sh gpu --device cpu --tiny          # the same code paths at tiny sizes on a CPU (float32, bf16 where cheap)
    bash run.sh gpu --parts toy                  # one part again (a timed-out toy job resumes where it stopped)

Six parts, run in this order, each under a time budget (seconds: BUDGETS below; the toy job gets what is left of
--budget). A part that fails or runs over is reported as failed with its error, and the rest still run.

  setup       HH-Helpful test pairs (the toy task's where ../shared/data is absent), an 8k BPE tokenizer trained
              on them on the spot, and a random Llama built from its config (hidden 2048, 16 layers: about 0.8B
              parameters; --tiny: hidden 64, 2 layers), in --dtype (bf16 on CUDA)
  scoring     perplexity of K responses per prompt: the naive loop (one pair at a time, model(labels=...))
              against generate.perplexity (packed, batched). Response tokens/s. bench/perplexity.py
  generation  HF model.generate against generate.generate, equal work. New tokens/s. bench/generation.py
  update      the preference step (DPO + 0.2 SFT, AdamW), the naive step up to train.train's. Pairs/s and each
              step's peak extra memory (CUDA: the allocator's counters). bench/update.py
  agreement   how often the student's perplexity pick (the lowest-PPL candidate among K) is the same in bf16 as
              in float32, scored packed, batched and one pair at a time. Share of prompts. bench/agreement.py
  toy         the README's main job: macpo.py with `bash run.sh toy`'s flags (read from run.sh) plus --device,
              --dtype and --toy_base_cache, into runs/gpu/toy (--tiny: the smoke preset's); its premises and the
              student's gold reward per round beside the float32 CPU run's (runs/toy/results.json, or the
              figures README.md quotes)

On a GPU machine whose torch is not in run.sh's .venv (that holds the CPU build), run `python3 -m bench.gpu`
with the machine's Python: every part, the toy job too, runs with the Python that runs this file.

The toy bases are pre-trained on the CPU whatever --device says (toy.py: in CPU worker processes), which takes
minutes: the GPU run shares the CPU runs' cache (runs/toy_bases) so that, where those exist, it reuses them, and
the two runs then differ only in device and dtype after pre-training.
"""
import argparse
import contextlib
import copy
import json
import os
import platform
import re
import shlex
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import transformers

import parallel
import toy
from bench.__main__ import print_table
from bench.agreement import pick_agreement
from bench.common import HH_TEST, build_model, encode, fitting_pairs, k_responses_per_prompt, load_pairs, matmul_params
from bench.generation import bench_generation
from bench.perplexity import naive_perplexity
from bench.timing import ladder_rows
from bench.update import bench_update
from generate import perplexity

ROOT = Path(__file__).resolve().parents[1]
PARTS = ("setup", "scoring", "generation", "update", "agreement", "toy")
# seconds per part on one H200, ceilings rather than estimates (none of it has been timed on a GPU yet); the toy
# job gets what is left of --budget, at least 450 - 225 = 225 s. --tiny multiplies them by TINY_BUDGET_SCALE: the
# CPU form checks the code paths, not the budgets, on a CPU that other jobs may be sharing
BUDGETS = {"setup": 30, "scoring": 45, "generation": 60, "update": 45, "agreement": 45}
TINY_BUDGET_SCALE = 4


@dataclass
class Sizes:
    """Everything that sets how much work a part does; the bench sections read these names from `args`."""
    hidden: int
    layers: int
    n_score: int                # prompts scored, k_responses each
    k_responses: int            # candidates per prompt (MACPO: the K teachers' answers)
    batch_size: int             # scoring and generation
    max_length: int             # prompt + response tokens (scoring, generation)
    max_prompt_length: int
    min_prompt_length: int      # HH prompts of a few hundred tokens, as in multi-turn dialogues (0 on toy data)
    n_generate: int
    max_new_tokens: int
    n_train: int                # pairs per timed pass of the update
    train_batch_size: int       # pairs per preference step
    train_max_length: int
    n_agreement: int            # prompts whose pick is compared in bf16 and fp32
    repeats: int                # timed runs per candidate (the median is reported)
    toy_preset: str             # run.sh's preset for the toy part


# the H200 sizes: a 0.8B model, work sized so that the five benchmark parts take a minute or two in all
FULL = Sizes(hidden=2048, layers=16, n_score=32, k_responses=3, batch_size=16, max_length=512, max_prompt_length=384,
             min_prompt_length=128, n_generate=32, max_new_tokens=64, n_train=16, train_batch_size=4,
             train_max_length=256, n_agreement=32, repeats=3, toy_preset="toy")
# the CPU form: the same calls at the smallest sizes that still exercise them (a batch of several, K > 1)
TINY = Sizes(hidden=64, layers=2, n_score=4, k_responses=2, batch_size=4, max_length=128, max_prompt_length=96,
             min_prompt_length=0, n_generate=4, max_new_tokens=4, n_train=4, train_batch_size=2,
             train_max_length=128, n_agreement=4, repeats=1, toy_preset="smoke")

# The float32 CPU toy run README.md quotes (2-core AMD EPYC, torch 2.13.0+cpu, transformers 5.25.0), the comparison
# where runs/toy/results.json is absent. Its digits depend on the CPU that pre-trained the bases (README.md).
README_TOY = {"source": "README.md's quoted float32 CPU run (2-core AMD EPYC, torch 2.13.0+cpu)",
              "student": {"init": 0.946, "round1": 0.949, "round2": 0.941, "round3": 0.945, "ceiling": 0.973},
              "premises_failed": ["ceiling addition", "teacher1 score", "oracle best-of-K"]}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"),
                   help="weights for every part: auto = bfloat16 on CUDA, float32 on CPU, as macpo.py runs")
    p.add_argument("--tiny", action="store_true", help="tiny sizes (the CPU form; the test runs it)")
    p.add_argument("--out", default=None, help="folder for gpu.json, gpu.md, toy/ and toy.log "
                   "(default runs/gpu, with --tiny runs/gpu-tiny)")
    p.add_argument("--budget", type=float, default=None, help="seconds for all parts; the toy job gets what is "
                   f"left (default 450, with --tiny {TINY_BUDGET_SCALE} x 450)")
    p.add_argument("--parts", default=",".join(PARTS), help="comma-separated, from: " + ", ".join(PARTS))
    p.add_argument("--toy_base_cache", default=None, help="where the toy job finds or pre-trains its bases "
                   "(default runs/toy_bases, the CPU runs' cache; with --tiny, beside the run folder)")
    args = p.parse_args(argv)
    args.out = Path(args.out or ("runs/gpu-tiny" if args.tiny else "runs/gpu"))
    args.budget_scale = TINY_BUDGET_SCALE if args.tiny else 1
    args.budget = args.budget or 450 * args.budget_scale
    if args.toy_base_cache is None and not args.tiny:
        args.toy_base_cache = str(ROOT / "runs" / "toy_bases")
    unknown = set(args.parts.split(",")) - set(PARTS)
    if unknown:
        p.error(f"unknown parts {sorted(unknown)}; choose from {', '.join(PARTS)}")
    return args


# ---------------------------------------------------------------------------------------------------------
# Budgets: a part runs under a SIGALRM timer, so one that hangs or runs long is cut off and reported, and the
# parts after it still run. The timer fires between Python bytecodes: a long CUDA kernel finishes first.

class OverBudget(Exception):
    pass


class PartFailed(RuntimeError):
    """A part's failure that still carries figures worth reporting (a toy run that wrote results.json, then
    exited non-zero)."""

    def __init__(self, message, figures):
        super().__init__(message)
        self.figures = figures


@contextlib.contextmanager
def time_limit(seconds):
    def alarm(signum, frame):
        raise OverBudget(f"over its budget of {seconds:g} s")
    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def run_part(name, fn, budget, device):
    """fn() -> its figures (a dict), under `budget` seconds -> the part's entry in gpu.json: status ok or failed
    (with the error and the traceback's last lines), seconds, budget_s and the figures."""
    print(f"\n=== {name} (budget {budget:.0f} s)", flush=True)
    t0 = time.perf_counter()
    try:
        with time_limit(budget):
            part = {"status": "ok", **fn()}
    except (Exception, SystemExit) as e:           # bench's input helpers stop with SystemExit on too few pairs
        part = {"status": "failed", "error": f"{type(e).__name__}: {e}",
                "traceback": traceback.format_exc().splitlines()[-8:], **getattr(e, "figures", {})}
        print(f"  FAILED: {part['error']}", flush=True)
    if str(device).startswith("cuda"):
        torch.cuda.empty_cache()                    # what a failed part left in the allocator's cache
    part.update(seconds=time.perf_counter() - t0, budget_s=budget)
    return part


# ---------------------------------------------------------------------------------------------------------
# The parts. Each returns its figures; the setup part also leaves the inputs the benchmark parts share in `ctx`.

def machine(device, dtype):
    """What ran: the accelerator (or the CPU), library versions, threads."""
    cuda = str(device).startswith("cuda") and torch.cuda.is_available()
    return {"device": str(device), "dtype": str(dtype).removeprefix("torch."),
            "name": torch.cuda.get_device_name(device) if cuda else platform.processor() or platform.machine(),
            "memory_gb": torch.cuda.get_device_properties(device).total_memory / 2 ** 30 if cuda else None,
            "torch": torch.__version__, "cuda": torch.version.cuda, "transformers": transformers.__version__,
            "python": platform.python_version(), "cpu_threads": torch.get_num_threads()}


def setup(ctx, sizes, device, dtype):
    """The inputs, as bench/__main__.py builds them: pairs, the tokenizer, the model, each part's seeded pairs."""
    pairs, source = load_pairs()
    # an 8k BPE trained on the prompts and responses themselves (the model is random: only shapes matter for speed)
    tokenizer = toy.train_tokenizer([t for pair in pairs[:2000] for t in pair], vocab_size=8000)
    min_prompt = sizes.min_prompt_length if Path(HH_TEST).is_file() else 0     # toy prompts: a few dozen tokens
    with torch.device(device):                      # initialise the weights on the device: 0.8B on a CPU is slow
        model = build_model(tokenizer, sizes.hidden, sizes.layers, device)
    # cast the parameters only: model.to(dtype) would also round the rotary inv_freq buffer to bf16, which
    # macpo's own loading keeps float32 (train.load_model)
    for p in model.parameters():
        p.data = p.data.to(dtype)
    ctx.model, ctx.tokenizer = model, tokenizer
    fit = dict(max_length=sizes.max_length, max_prompt_length=sizes.max_prompt_length, min_prompt_length=min_prompt)
    ctx.score_pairs = k_responses_per_prompt(fitting_pairs(tokenizer, pairs, sizes.n_score, seed=1, **fit),
                                             sizes.k_responses)
    ctx.prompts = [p for p, _, _ in fitting_pairs(tokenizer, pairs, sizes.n_generate, seed=2, **fit)]
    ctx.train_pairs = fitting_pairs(tokenizer, pairs, sizes.n_train, sizes.train_max_length,
                                    sizes.train_max_length // 2, seed=3)
    agreement = fitting_pairs(tokenizer, pairs, sizes.n_agreement, seed=4, **fit)
    grouped = k_responses_per_prompt(agreement, sizes.k_responses)              # K per prompt, consecutive
    ctx.agreement_prompts = [p for p, _, _ in agreement]
    ctx.agreement_candidates = [[r for _, r in grouped[i:i + sizes.k_responses]]
                                for i in range(0, len(grouped), sizes.k_responses)]
    params = sum(p.numel() for p in model.parameters())
    print(f"  data: {source}; tokenizer: {len(tokenizer)} tokens; model: hidden {sizes.hidden}, {sizes.layers} "
          f"layers, {params / 1e9:.3f}B parameters in {str(dtype).removeprefix('torch.')}")
    return {"data": source, "tokenizer_tokens": len(tokenizer), "hidden": sizes.hidden, "layers": sizes.layers,
            "parameters": params, "matmul_parameters": matmul_params(model),
            "weights_mb": params * model.dtype.itemsize / 2 ** 20}


def scoring(ctx, sizes):
    """The naive loop against generate.perplexity (bench/perplexity.py's first and last rungs). The two agree to
    1e-3 in fp32 (bench asserts it); in bf16 their batching rounds differently, so the gap is reported."""
    model, tokenizer, pairs = ctx.model, ctx.tokenizer, ctx.score_pairs
    kw = dict(batch_size=sizes.batch_size, max_length=sizes.max_length)

    def ladder(pairs):
        return {"naive: one pair at a time, model(labels=...)": lambda: naive_perplexity(model, tokenizer, pairs, sizes.max_length),
                "generate.perplexity: packed rows, each prompt once for its K": lambda: perplexity(model, tokenizer, *zip(*pairs), **kw)}
    naive, ours = (fn() for fn in ladder(pairs).values())
    worst = max(abs(a / b - 1) for a, b in zip(ours, naive))
    masks = [mask for _, mask in (encode(tokenizer, p, r, sizes.max_length) for p, r in pairs)]
    response_tokens = sum(sum(mask) for mask in masks)
    flops = 2 * matmul_params(model) * sum(len(mask) for mask in masks)          # the full model's, per row
    rows = ladder_rows(ladder(pairs), ladder(pairs[:sizes.k_responses]), sizes.repeats, model.device, response_tokens, flops)
    print_table(f"perplexity of {sizes.k_responses} responses to each of {sizes.n_score} prompts", rows, "resp tok/s")
    print(f"  largest relative PPL gap, generate.perplexity vs the naive loop: {worst:.2e}")
    return {"unit": "response tokens/s", "rows": rows, "speedup": rows[-1]["rate"] / rows[0]["rate"],
            "max_relative_ppl_gap": worst, "pairs": len(pairs), "response_tokens": response_tokens}


def generation(ctx, sizes):
    """bench/generation.py's ladder: model.generate, then generate.generate in input order and length-sorted."""
    rows = bench_generation(ctx.model, ctx.tokenizer, ctx.prompts, sizes)
    print_table(f"generation, {len(ctx.prompts)} prompts, batch {sizes.batch_size}, {sizes.max_new_tokens} new "
                f"tokens, sampling", rows, "new tok/s")
    return {"unit": "new tokens/s", "rows": rows, "speedup": rows[-1]["rate"] / rows[0]["rate"]}


def update(ctx, sizes):
    """bench/update.py's ladder: the naive preference step up to train.train's, with each step's peak memory."""
    rows, cache = bench_update(ctx.model, ctx.tokenizer, ctx.train_pairs, sizes)
    print_table(f"MACPO update, {sizes.n_train} pairs, {sizes.train_batch_size} per step, max length "
                f"{sizes.train_max_length}", rows, "pairs/s", memory=True)
    return {"unit": "pairs/s", "memory_unit": "MB over the step's start (CUDA: allocator; CPU: RSS)", "rows": rows,
            "speedup": rows[-1]["rate"] / rows[0]["rate"], **cache}


def agreement(ctx, sizes):
    """How often the perplexity pick among K candidates is the same in bf16 as in float32, packed, batched and
    one pair at a time (bench/agreement.py: it copies the model twice, its weights rounded to bf16 and those in
    float32, so the comparison isolates the arithmetic). The benchmark's model has random weights: its
    candidates' perplexities lie close together, and the margins say how close."""
    figures = pick_agreement(ctx.model, ctx.tokenizer, ctx.agreement_prompts, ctx.agreement_candidates,
                             batch_size=sizes.batch_size, max_length=sizes.max_length)
    figures.pop("scores")                           # every pair's mean log-prob per mode: not a figure to read
    for line in agreement_lines(figures):
        print("  " + line)
    return {"unit": "share of prompts whose pick is the same", **figures}


def agreement_lines(p):
    """pick_agreement's figures -> a Markdown table: each comparison's agreement, on all prompts and on those
    whose float32 margin is clear, and the bf16 side's error against float32."""
    lines = [f"{p['prompts']} prompts x {p['candidates']} candidates, LM head in "
             f"{'float32' if p['float32_head'] else 'the weights dtype'}; float32 margin, best minus second-best mean "
             f"log-prob (nats/token): p10 {p['margin']['p10']:.4f}, median {p['margin']['p50']:.4f}; "
             f"{p['clear']['prompts']} prompts above {p['clear']['margin']}", "",
             "| comparison | agreement | on clear margins | error mean / max (nats/token) |", "|---|---|---|---|"]
    for name, value in p["agreement"].items():
        error = p["error"].get(name.split(" vs ")[0]) if name.endswith("vs float32") else None
        lines.append(f"| {name} | {value:.3f} | {p['clear']['agreement'][name]:.3f} | "
                     + (f"{error['mean']:.2e} / {error['max']:.2e} |" if error else "- |"))
    return lines


def reference_toy(preset):
    """The float32 CPU run to compare with: runs/PRESET/results.json where it exists, else (toy) README's."""
    path = ROOT / "runs" / preset / "results.json"
    if path.is_file():
        r = json.loads(path.read_text())
        return {"source": str(path.relative_to(ROOT)), "student": {s: row.get("student") for s, row in r["results"].items()},
                "premises_failed": [p["premise"] for p in r["premises"] or [] if not p["pass"]]}
    return copy.deepcopy(README_TOY) if preset == "toy" else None


def preset_flags(preset):
    """run.sh's macpo.py flags for a preset whose case is `exec $PY macpo.py FLAGS "$@"` (toy, smoke), its
    variables ($TOY) expanded and its --out left out. The toy job runs them with this Python rather than
    through run.sh, whose first step builds .venv with pip: a GPU machine may have no internet, and .venv holds
    the CPU build of torch."""
    text = (ROOT / "run.sh").read_text().replace("\\\n", " ")             # join backslash-continued lines
    variables = dict(re.findall(r'^(\w+)="([^"]*)"', text, re.M))          # NAME="..." (may span lines)
    # `  preset)  # comment`, maybe more comment lines, then the exec line
    case = re.search(rf'^  {re.escape(preset)}\)[^\n]*\n(?:\s*#[^\n]*\n)*\s*exec \$PY macpo\.py (.*?) "\$@" ;;', text, re.M)
    if case is None:
        raise RuntimeError(f"run.sh has no `{preset})` case of the form: exec $PY macpo.py FLAGS \"$@\"")
    flags = shlex.split(re.sub(r"\$(\w+)", lambda m: variables[m.group(1)], case.group(1)))
    i = flags.index("--out")
    return flags[:i] + flags[i + 2:]


def toy_job(sizes, args, dtype):
    """macpo.py with `bash run.sh PRESET`'s flags (preset_flags) and --out OUT/toy --device D --dtype T, in its
    own process group, so that running over the budget ends it and its base pre-training workers (the run
    resumes from its last finished stage)."""
    out = (args.out / "toy").resolve()
    command = [sys.executable, str(ROOT / "macpo.py"), *preset_flags(sizes.toy_preset), "--out", str(out),
               "--device", args.device, "--dtype", str(dtype).removeprefix("torch.")]
    if args.toy_base_cache:
        command += ["--toy_base_cache", str(Path(args.toy_base_cache).resolve())]
    resumed = (out / "config.json").is_file()
    log_path = args.out / "toy.log"
    figures = {"preset": sizes.toy_preset, "command": shlex.join(command), "resumed": resumed, "log": str(log_path),
               "reference": reference_toy(sizes.toy_preset)}
    print(f"  {shlex.join(command)}\n  (log: {log_path}{'; resuming the run already there' if resumed else ''})", flush=True)
    with open(log_path, "w") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=ROOT)
        try:
            returncode = figures["returncode"] = proc.wait()
        except OverBudget as e:
            stop_group(proc)
            raise PartFailed(f"{e}: stopped; the same command resumes the run from its last finished stage", figures) from e
        finally:
            if proc.poll() is None:                 # interrupted (Ctrl-C): stop the run and its workers too
                stop_group(proc)
    if (out / "results.json").is_file():
        r = json.loads((out / "results.json").read_text())
        figures.update(metric=r["metric"], results=r["results"], premises=r["premises"],
                       student={s: row.get("student") for s, row in r["results"].items()})
    if returncode != 0:
        # the log's last lines, each as a terminal would show it (tqdm rewrites a line with carriage returns)
        tail = [line.split("\r")[-1].strip() for line in log_path.read_text(errors="replace").splitlines()]
        tail = [line[-200:] for line in tail if line][-3:]
        raise PartFailed(f"exit status {returncode}: " + " | ".join(tail), figures)
    if "premises" not in figures:
        raise PartFailed(f"the run finished without {out / 'results.json'}", figures)
    premises = figures["premises"] or []
    print(f"  premises: {sum(p['pass'] for p in premises)} of {len(premises)} hold")
    print(f"  student: {student_line(figures['student'])}")
    if figures["reference"]:
        print(f"  float32 CPU ({figures['reference']['source']}): {student_line(figures['reference']['student'])}")
    return figures


def stop_group(proc):
    """End a process started with start_new_session and everything it started (macpo.py's pre-training workers):
    SIGTERM to its process group, SIGKILL after 20 s."""
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def student_line(student):
    return ", ".join(f"{stage} {v:.3f}" for stage, v in student.items() if v is not None)


# ---------------------------------------------------------------------------------------------------------
# The report: gpu.json holds everything; gpu.md, what a person reads (also printed at the end)

def fmt(v):
    return "-" if v is None else f"{v:.3f}" if isinstance(v, float) and abs(v) < 100 else f"{v:,.1f}" if isinstance(v, float) else str(v)


def ladder_markdown(part, memory=False):
    head = f"| what | {part['unit']} | vs naive |" + (" peak extra MB |" if memory else "")
    lines = [head, "|---|---|---|" + ("---|" if memory else "")]
    for row in part["rows"]:
        lines.append(f"| {row['what']} | {fmt(row['rate'])} | {row['vs_naive']:.2f}x |"
                     + (f" {fmt(row['peak_mb'])} |" if memory else ""))
    return lines


def markdown(results):
    m, parts = results["machine"], results["parts"]
    lines = [f"# macpo on {m['name']} ({m['device']}, {m['dtype']})", "",
             f"torch {m['torch']} (CUDA {m['cuda']}), transformers {m['transformers']}, Python {m['python']}, "
             f"{m['cpu_threads']} CPU threads" + (f", {m['memory_gb']:.0f} GiB on the GPU" if m["memory_gb"] else "")
             + f". {'Tiny sizes (the CPU form). ' if results['tiny'] else ''}"
             f"{results['seconds']:.0f} s in all (budget {results['budget_s']:.0f} s).", "",
             "| part | status | seconds | budget s |", "|---|---|---|---|"]
    lines += [f"| {name} | {p['status']}{' (earlier call)' if p.get('earlier_call') else ''} | {p['seconds']:.0f} | "
              f"{p['budget_s']:.0f} |" for name, p in parts.items()]
    for name, p in parts.items():
        lines += ["", f"## {name}", ""]
        if p["status"] != "ok":
            lines += [f"**{p['status']}**: {p.get('error', '')}"]
            if name != "toy" or "student" not in p:
                continue
        if name == "setup":
            lines += [f"data: {p['data']}; tokenizer: {p['tokenizer_tokens']} tokens; random Llama, hidden {p['hidden']}, "
                      f"{p['layers']} layers, {p['parameters'] / 1e9:.3f}B parameters, {p['weights_mb']:,.0f} MB of weights"]
        elif name == "scoring":
            lines += ladder_markdown(p) + ["", f"{p['pairs']} (prompt, response) pairs, {p['response_tokens']} response "
                                               f"tokens; largest relative PPL gap, ours vs naive: {p['max_relative_ppl_gap']:.2e}"]
        elif name == "generation":
            lines += ladder_markdown(p)
        elif name == "update":
            lines += ladder_markdown(p, memory=True) + ["", f"peak extra memory: {p['memory_unit']}; caching the "
                                                            f"reference log-probs: {p['reference_cache_pairs_per_s']:.1f} pairs/s"]
        elif name == "agreement":
            lines += agreement_lines(p)
        elif name == "toy":
            lines += toy_markdown(p)
    return "\n".join(lines) + "\n"


def toy_markdown(p):
    premises = p.get("premises") or []
    failed = [x["premise"] for x in premises if not x["pass"]]
    lines = [f"`{p['command']}`{' (resumed)' if p['resumed'] else ''}; log: {p['log']}", "",
             f"premises: {len(premises) - len(failed)} of {len(premises)} hold" + (f"; failing: {', '.join(failed)}" if failed else "")]
    reference = p["reference"]
    if reference:
        lines[-1] += f" (float32 CPU: {', '.join(reference['premises_failed']) or 'none'} failing)"
    lines += ["", f"student, {p.get('metric') or 'score'} per stage:", "",
              "| stage | this run | float32 CPU |", "|---|---|---|"]
    for stage, v in p["student"].items():
        lines.append(f"| {stage} | {fmt(v)} | {fmt(reference['student'].get(stage)) if reference else '-'} |")
    if reference:
        lines += ["", f"float32 CPU figures: {reference['source']}"]
    return lines


def merge_parts(path, results):
    """Keep, from the gpu.json already at `path`, the parts this call did not run (--parts runs some again),
    marked earlier_call, when it is from the same machine, device, dtype and sizes; -> results."""
    previous = json.loads(path.read_text()) if path.is_file() else None
    same = previous is not None and all(previous.get(k) == results[k] for k in ("machine", "tiny", "sizes"))
    kept = {name: dict(part, earlier_call=True) for name, part in (previous["parts"] if same else {}).items()
            if name not in results["parts"]}
    parts = kept | results["parts"]
    results["parts"] = {name: parts[name] for name in PARTS if name in parts}
    return results


def main(argv=None):
    args = parse_args(argv)
    t_start = time.perf_counter()
    sizes, device = TINY if args.tiny else FULL, torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit(f"no CUDA device for {sys.executable} (torch {torch.__version__}): run.sh's .venv holds the CPU "
                 f"build, so on a GPU machine use its own Python (python3 -m bench.gpu); `bash run.sh gpu --device "
                 f"cpu --tiny` runs the same code paths on a CPU")
    dtype = parallel.dtype_for(device, args.dtype)
    chosen = args.parts.split(",")
    args.out.mkdir(parents=True, exist_ok=True)
    results = {"machine": machine(device, dtype), "tiny": args.tiny, "sizes": asdict(sizes), "budget_s": args.budget,
               "parts": {}}
    print(f"macpo GPU check on {results['machine']['name']} ({device}, {results['machine']['dtype']}), "
          f"torch {torch.__version__}, transformers {transformers.__version__}")
    ctx = argparse.Namespace()
    benchmark = {"scoring": lambda: scoring(ctx, sizes), "generation": lambda: generation(ctx, sizes),
                 "update": lambda: update(ctx, sizes), "agreement": lambda: agreement(ctx, sizes)}
    if "setup" in chosen or any(name in chosen for name in benchmark):   # the benchmark parts share its inputs
        results["parts"]["setup"] = run_part("setup", lambda: setup(ctx, sizes, device, dtype),
                                           BUDGETS["setup"] * args.budget_scale, device)
    for name, fn in benchmark.items():
        if name not in chosen:
            continue
        if results["parts"]["setup"]["status"] != "ok":
            results["parts"][name] = {"status": "skipped", "error": "setup failed", "seconds": 0.0, "budget_s": 0.0}
            continue
        results["parts"][name] = run_part(name, fn, BUDGETS[name] * args.budget_scale, device)
    ctx = None                                      # the model's memory, before the toy job takes the device
    if str(device).startswith("cuda"):
        torch.cuda.empty_cache()
    if "toy" in chosen:
        budget = max(args.budget - (time.perf_counter() - t_start), 30.0)
        results["parts"]["toy"] = run_part("toy", lambda: toy_job(sizes, args, dtype), budget, device)
    results["seconds"] = time.perf_counter() - t_start
    results = merge_parts(args.out / "gpu.json", results)
    (args.out / "gpu.json").write_text(json.dumps(results, indent=1, default=str))
    text = markdown(results)
    (args.out / "gpu.md").write_text(text)
    print("\n" + text + f"\nwritten: {args.out / 'gpu.json'}, {args.out / 'gpu.md'}")
    return 0 if all(p["status"] == "ok" for p in results["parts"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
