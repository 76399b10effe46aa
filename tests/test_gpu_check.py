"""bench/gpu.py (`bash run.sh gpu`): its CPU form runs every part and writes every figure, and a part that fails or
runs over its budget is reported while the others still run. Speed is printed, never asserted."""
import json
import math
import time
from pathlib import Path

import pytest

from bench import gpu

ROOT = Path(__file__).resolve().parents[1]


def test_a_failing_or_overrunning_part_is_reported_and_the_next_still_runs():
    def hang():
        while True:                             # ends only when the part's timer fires
            time.sleep(0.01)

    def broken():
        raise ValueError("no such kernel")

    hung, failed, fine = (gpu.run_part(name, fn, 0.2, "cpu") for name, fn in
                          (("hang", hang), ("broken", broken), ("fine", lambda: {"rate": 1.5})))
    assert hung["status"] == "failed" and "OverBudget" in hung["error"] and "budget of 0.2 s" in hung["error"]
    assert failed["status"] == "failed" and failed["error"] == "ValueError: no such kernel"
    assert fine == {"status": "ok", "rate": 1.5, "seconds": fine["seconds"], "budget_s": 0.2}


def test_the_toy_job_gets_run_sh_s_preset_flags():
    from macpo import parse_config
    toy = parse_config(gpu.preset_flags("toy"))             # run.sh's toy case, $TOY expanded
    assert (toy.n_init, toy.n_w2s, toy.n_test) == (700, 700, 1200)
    assert (toy.toy_teacher_ops, toy.lora, toy.system, toy.neg_sft_epochs) == ("+,-,*", "all", "", 32)
    smoke = parse_config(gpu.preset_flags("smoke"))         # backslash-continued, with --system ""
    assert (smoke.n_init, smoke.toy_student_size, smoke.system) == (64, "32x1", "")
    assert "--out" not in gpu.preset_flags("smoke") and smoke.out != "runs/smoke"     # the caller sets --out


def test_a_rerun_of_some_parts_keeps_the_others_from_the_same_machine(tmp_path):
    def results(machine, parts):
        return {"machine": {"name": machine}, "tiny": False, "sizes": {"hidden": 2048}, "parts": parts}
    path = tmp_path / "gpu.json"
    path.write_text(json.dumps(results("H200", {"setup": {"status": "ok"}, "scoring": {"status": "ok", "speedup": 2.0},
                                                "toy": {"status": "failed"}})))
    merged = gpu.merge_parts(path, results("H200", {"toy": {"status": "ok"}}))["parts"]
    assert merged == {"setup": {"status": "ok", "earlier_call": True},
                      "scoring": {"status": "ok", "speedup": 2.0, "earlier_call": True}, "toy": {"status": "ok"}}
    assert gpu.merge_parts(path, results("A100", {"toy": {"status": "ok"}}))["parts"] == {"toy": {"status": "ok"}}


def test_the_summary_puts_the_toy_student_beside_the_cpu_run_and_names_failures():
    machine = {"name": "NVIDIA H200", "device": "cuda", "dtype": "bfloat16", "torch": "2.13", "cuda": "12.8",
               "transformers": "5.25", "python": "3.11", "cpu_threads": 16, "memory_gb": 139.8}
    toy = {"status": "ok", "seconds": 200.0, "budget_s": 300.0, "preset": "toy", "command": "python macpo.py",
           "resumed": False, "log": "runs/gpu/toy.log", "metric": "gold", "reference": gpu.README_TOY, "student": {"init": 0.95, "round1": 0.9512, "ceiling": None},
           "premises": [{"premise": "ceiling harmful", "pass": True}, {"premise": "teacher1 score", "pass": False}]}
    scoring = {"status": "failed", "error": "OutOfMemoryError: CUDA out of memory", "seconds": 3.0, "budget_s": 45.0}
    md = gpu.markdown({"machine": machine, "tiny": False, "seconds": 250.0, "budget_s": 450.0,
                       "parts": {"scoring": scoring, "toy": toy}})
    assert "# macpo on NVIDIA H200 (cuda, bfloat16)" in md and "140 GiB on the GPU" in md
    assert "| scoring | failed | 3 | 45 |" in md and "**failed**: OutOfMemoryError: CUDA out of memory" in md
    assert "| init | 0.950 | 0.946 |" in md and "| round1 | 0.951 | 0.949 |" in md and "| ceiling | - | 0.973 |" in md
    assert "premises: 1 of 2 hold; failing: teacher1 score (float32 CPU: ceiling addition, teacher1 score" in md
    assert gpu.README_TOY["source"] in md


def finite_positive(v):
    return isinstance(v, (int, float)) and math.isfinite(v) and v > 0


@pytest.mark.slow
def test_cpu_form_writes_every_part_with_numbers(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)                     # bench's inputs and run.sh are found from the repository root
    out = tmp_path / "gpu"
    code = gpu.main(["--device", "cpu", "--tiny", "--out", str(out)])
    results = json.loads((out / "gpu.json").read_text())
    parts = results["parts"]
    assert list(parts) == list(gpu.PARTS)
    for name, part in parts.items():
        assert part["status"] == "ok", (name, part.get("error"))
    assert code == 0
    assert results["machine"]["device"] == "cpu" and results["machine"]["dtype"] == "float32"
    assert results["machine"]["torch"] and results["machine"]["transformers"]

    assert parts["setup"]["parameters"] > 0 and parts["setup"]["tokenizer_tokens"] > 0
    for name, n_rows in (("scoring", 2), ("generation", 3), ("update", 5)):
        rows = parts[name]["rows"]
        assert len(rows) == n_rows and all(finite_positive(r["rate"]) for r in rows), name
        assert finite_positive(parts[name]["speedup"]) and parts[name]["unit"]
    assert all(math.isfinite(r["peak_mb"]) for r in parts["update"]["rows"])
    assert 0 <= parts["scoring"]["max_relative_ppl_gap"] < 1e-3        # fp32: ours gives the naive loop's PPL
    agreement = parts["agreement"]              # pick_agreement's figures: every comparison a share of prompts
    assert (agreement["prompts"], agreement["candidates"]) == (gpu.TINY.n_agreement, gpu.TINY.k_responses)
    assert "bf16 packed vs float32" in agreement["agreement"] and "scores" not in agreement
    assert all(0 <= v <= 1 for v in agreement["agreement"].values())
    assert all(math.isfinite(e["mean"]) and e["max"] >= e["mean"] >= 0 for e in agreement["error"].values())

    toy = parts["toy"]
    assert toy["returncode"] == 0 and toy["preset"] == "smoke" and "--device cpu --dtype float32" in toy["command"]
    assert set(toy["student"]) == {"init", "round1", "round2", "round3", "ceiling"}
    assert all(isinstance(v, float) and 0 <= v <= 1 for v in toy["student"].values())
    assert toy["premises"] and all(isinstance(p["value"], float) and isinstance(p["pass"], bool) for p in toy["premises"])

    md = (out / "gpu.md").read_text()
    assert "failed" not in md
    assert "(cpu, float32)" in md and f"torch {results['machine']['torch']}" in md
    for unit in ("response tokens/s", "new tokens/s", "pairs/s", "peak extra MB", "nats/token"):
        assert unit in md
    for name in gpu.PARTS:
        assert f"\n## {name}\n" in md
    for row in parts["scoring"]["rows"] + parts["generation"]["rows"] + parts["update"]["rows"]:
        assert f"| {row['what']} | {gpu.fmt(row['rate'])} | {row['vs_naive']:.2f}x |" in md
    for name, value in agreement["agreement"].items():
        assert f"| {name} | {value:.3f} |" in md
    assert f"| round3 | {gpu.fmt(toy['student']['round3'])} |" in md
    assert "premises: " in md and f"of {len(toy['premises'])} hold" in md
