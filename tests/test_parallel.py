"""Several processes on CPU (gloo, torchrun --nproc_per_node 2) against one process with the same global batch."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny import run_or_show

pytestmark = pytest.mark.slow           # left out of `bash run.sh test fast`

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "helpers" / "parallel_worker.py"


def torchrun(*args):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    return run_or_show(cmd, cwd=ROOT, env=env)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    out = tmp_path_factory.mktemp("one")
    for kind in ("sft", "dpo"):
        subprocess.run([sys.executable, str(WORKER), str(out / kind), kind, "ddp"], cwd=ROOT, check=True,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    return out


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
@pytest.mark.parametrize("kind", ["sft", "dpo"])
def test_two_processes_match_one(one_process, tmp_path, mode, kind):
    torchrun(str(WORKER), str(tmp_path), kind, mode)
    one = json.loads((one_process / kind / "losses.json").read_text())
    two = json.loads((tmp_path / "losses.json").read_text())
    assert two["sharded"] == (mode == "fsdp")
    assert len(one["losses"]) == len(two["losses"]) == 6          # 36 rows, batch 12, 2 epochs
    assert two["losses"] == pytest.approx(one["losses"], rel=1e-5)
    a, b = load_file(one_process / kind / "weights.safetensors"), load_file(tmp_path / "weights.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-4), k


@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory):
    """The run both parallel modes are compared with: one process, where --parallel changes nothing."""
    from tiny import SMOKE
    out = tmp_path_factory.mktemp("one") / "run"
    subprocess.run([sys.executable, "macpo.py", *SMOKE, "--n_teachers", "1", "--no-ceiling", "--out", str(out)],
                   cwd=ROOT, check=True, capture_output=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    return out


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_process_toy_run_matches_one_process(tmp_path, mode, one_process_run):
    """Every stage of a run under torchrun: ddp (whole copies), or fsdp (full-weight checkpoints loaded
    sharded, so generation, scoring, training and saving all run on 1/2 of the weights per rank)."""
    from tiny import SMOKE
    flags = SMOKE + ["--n_teachers", "1", "--no-ceiling", "--parallel", mode]
    torchrun("macpo.py", *flags, "--out", str(tmp_path / "two"))
    one, two = one_process_run, tmp_path / "two"
    done = sorted(str(p.relative_to(one)) for p in one.rglob("DONE"))
    assert done == sorted(str(p.relative_to(two)) for p in two.rglob("DONE"))
    assert not list(two.rglob("*.partial"))
    # stages trained on the same inputs end with the same weights, within float tolerance (the all-reduce
    # sums in another order)
    for stage in ("bases/student", "init/teacher0"):
        a, b = load_file(one / stage / "model.safetensors"), load_file(two / stage / "model.safetensors")
        assert all(torch.allclose(a[k], b[k], atol=1e-4) for k in a), stage
    # the same prompts in the same order, one response each, however the batches were shared out; sampled
    # responses are the same too, up to the rare token whose sampling threshold a 1e-6 weight change crosses
    for f in sorted(one.rglob("generations.jsonl")):
        ra = [json.loads(x) for x in f.read_text().splitlines()]
        rb = [json.loads(x) for x in (two / f.relative_to(one)).read_text().splitlines()]
        assert [r["i"] for r in rb] == list(range(len(ra))) and [r["prompt"] for r in ra] == [r["prompt"] for r in rb]
        same = sum(x["response"] == y["response"] for x, y in zip(ra, rb))
        assert same >= 0.9 * len(ra), (f, same)
    assert json.loads((one / "results.json").read_text())["results"].keys() == \
        json.loads((two / "results.json").read_text())["results"].keys()


def test_two_process_fsdp_lora_run_completes_every_stage(tmp_path):
    """--parallel fsdp --lora all: every agent's base is loaded sharded with fresh adapters (their A drawn
    differently from one process's, so only the run's shape is compared): the same finished stages as one
    process, adapters written for every trained stage, and no stage left in progress."""
    from tiny import SMOKE
    flags = SMOKE + ["--n_teachers", "1", "--no-ceiling", "--lora", "all"]
    subprocess.run([sys.executable, "macpo.py", *flags, "--out", str(tmp_path / "one")], cwd=ROOT, check=True,
                   capture_output=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    torchrun("macpo.py", *flags, "--parallel", "fsdp", "--out", str(tmp_path / "two"))
    one, two = tmp_path / "one", tmp_path / "two"
    done = sorted(str(p.relative_to(one)) for p in one.rglob("DONE"))
    assert done == sorted(str(p.relative_to(two)) for p in two.rglob("DONE")) and not list(two.rglob("*.partial"))
    for stage in ("init/teacher0", "init/student", "round1/student", "round1/teacher0"):
        a, b = load_file(one / stage / "adapter_model.safetensors"), load_file(two / stage / "adapter_model.safetensors")
        assert a.keys() == b.keys() and all(a[k].shape == b[k].shape for k in a), stage
    results = json.loads((two / "results.json").read_text())["results"]
    assert list(results) == list(json.loads((one / "results.json").read_text())["results"]) == ["init", "round1"]
