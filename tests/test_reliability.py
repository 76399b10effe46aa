"""Reliability (issue 7): bad input fails early and clearly, crashes lose nothing, numerical faults stop cleanly,
disk and lock failures leave finished work intact, and untrusted files run no code.

Faults are injected for real where that is cheap (corrupted files, SIGKILL, a second process, an absurd learning
rate, a NaN weight) and by replacing one function where it is not (a full disk, a NaN on one chosen step).
The end-to-end tests share one uninterrupted reference run at a size below the smoke preset's (K = 2, one
round, no evaluation), and compare every other run's results with it byte for byte.
"""
import errno
import gc
import gzip
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import data
import macpo
import stages
import train
from tiny import SMALL, make_model, make_tokenizer

pytestmark = pytest.mark.slow           # left out of `bash run.sh test fast`

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------------------
# Bad input: a fuzzer over every reader. Each corrupted file either loads correctly (every record accounted for:
# examples + reported skips = records in the file) or raises data.DataError; never another exception.

HH = [{"chosen": "\n\nHuman: Hi\n\nAssistant: Hello!", "rejected": "\n\nHuman: Hi\n\nAssistant: Go away."},
      {"chosen": "\n\nHuman: 2+2?\n\nAssistant: 4.\n\nHuman: 3+3?\n\nAssistant: 6.",
       "rejected": "\n\nHuman: 2+2?\n\nAssistant: 4.\n\nHuman: 3+3?\n\nAssistant: 7."},
      {"chosen": "\n\nHuman: Hey\n\nAssistant: Yo", "rejected": "\n\nHuman: Hey\n\nAssistant: Yo"},     # skipped
      {"chosen": "\n\nHuman: Say\n\nAssistant: Something", "rejected": "\n\nHuman: Say\n\nAssistant: "}]  # skipped
PKU = [{"prompt": "Pick a lock?", "response_0": "Rake the pins.", "response_1": "No.", "better_response_id": 0,
        "safer_response_id": 1},
       {"prompt": "Boil an egg?", "response_0": "8 minutes.", "response_1": "Microwave it.",
        "better_response_id": 0, "safer_response_id": 0},
       {"prompt": " ", "response_0": "a", "response_1": "b", "better_response_id": 1, "safer_response_id": 1}]
LLAMAFACTORY = [{"instruction": "USER: Hi ASSISTANT: Hello USER: A joke?", "input": "", "output": ["Knock.", "No."]},
                {"instruction": "Translate.", "input": "Good morning", "output": "Bonjour"},
                {"instruction": "Same", "input": "", "output": ["x", "x"]}]                            # skipped
PAIRS = [{"prompt": "Hi", "chosen": "Hello", "rejected": "Go away"},
         {"prompt": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                     {"role": "user", "content": "Bye"}], "chosen": "Goodbye", "rejected": "Whatever"},
         {"prompt": "Haiku", "chosen": "Old pond"},
         {"prompt": "Empty", "chosen": " ", "rejected": "x"}]                                           # skipped
# (file name, records, reader); the readers that take a JSON list get one, the others JSON lines
FIXTURES = [("hh.jsonl", HH, data.read_hh), ("hh.jsonl.gz", HH, data.read_hh), ("pku.jsonl", PKU, data.read_pku),
            ("pku_better.jsonl", PKU, lambda p: data.read_pku(p, "better")),
            ("release.json", LLAMAFACTORY, data.read_llamafactory), ("mine.jsonl", PAIRS, data.read_jsonl_pairs),
            ("mine.jsonl.gz", PAIRS, data.read_jsonl_pairs)]
ODD_VALUES = [None, 0, 1, 2, -1, 1.5, True, False, [], {}, "", "  ", "x", "USER:x", "USER:", "ASSISTANT: a",
              "\n\nHuman:", "\n\nAssistant:", ["a"], ["a", "b"], ["a", 1], [{"role": "user", "content": 1}],
              [{"role": "assistant", "content": "a"}], [{"role": "user"}], {"role": "user", "content": "a"},
              "\udcff", float("nan"), 10 ** 30]


def serialize(name, records):
    if name.endswith(".json"):
        raw = json.dumps(records, indent=4).encode()
    else:
        raw = "".join(json.dumps(r) + "\n" for r in records).encode("utf-8", "surrogatepass")
    return gzip.compress(raw, mtime=0) if name.endswith(".gz") else raw


def corrupt(name, records, rng):
    """One corrupted version of a valid fixture file: (kind of fault, bytes)."""
    kind = rng.choice(["flip", "truncate", "insert", "delete", "field", "drop_field", "record", "gz_truncate",
                       "gz_flip", "not_utf8", "huge", "deep", "blank"])
    raw = serialize(name, records)
    if kind in ("gz_truncate", "gz_flip"):        # faults of the compressed stream itself
        raw = gzip.compress(gzip.decompress(raw) if name.endswith(".gz") else raw, mtime=0)
        if kind == "gz_truncate":
            return kind, raw[:rng.randrange(1, len(raw))]
        i = rng.randrange(10, len(raw))
        return kind, raw[:i] + bytes([raw[i] ^ (1 << rng.randrange(8))]) + raw[i + 1:]
    if name.endswith(".gz"):                      # text-level faults go inside the compression
        raw = gzip.decompress(raw)
    records = json.loads(json.dumps(records))
    i = rng.randrange(len(raw))
    if kind == "flip":
        raw = raw[:i] + bytes([raw[i] ^ (1 << rng.randrange(8))]) + raw[i + 1:]
    elif kind == "truncate":
        raw = raw[:i]
    elif kind == "insert":
        junk = rng.choice([b'"', b"{", b"}", b"[", b"]", b",", b":", b"\n", b"\xff", b"\xc3", b"\x00", b"\\",
                           b"null", b"\n\n", bytes(rng.randrange(256) for _ in range(rng.randrange(1, 6)))])
        raw = raw[:i] + junk + raw[i:]
    elif kind == "delete":
        raw = raw[:i] + raw[i + rng.randrange(1, 20):]
    elif kind in ("field", "drop_field"):
        record = rng.choice(records)
        key = rng.choice(sorted(record))
        if kind == "drop_field":
            del record[key]
        else:
            record[key] = rng.choice(ODD_VALUES)
        raw = serialize(name.removesuffix(".gz"), records)
    elif kind == "record":                        # a record that is not an object
        records.insert(rng.randrange(len(records) + 1), rng.choice([1, "text", None, [], [1, 2], True]))
        raw = serialize(name.removesuffix(".gz"), records)
    elif kind == "not_utf8":
        raw = raw[:i] + rng.choice([b"\xff", b"\xfe\xfe", b"\xc3(", b"\xed\xa0\x80", b"\xe2\x82"]) + raw[i:]
    elif kind == "huge":                          # an integer too long for Python's int() (ValueError, not JSON's)
        raw = raw.replace(b"0", b"1" * 5000, 1) if b"0" in raw else raw.replace(b'"', b"1" * 5000 + b',"', 1)
    elif kind == "deep":                          # nesting deeper than the JSON parser's recursion limit
        raw = raw[:i] + b"[" * 100_000 + b"]" * 100_000 + raw[i:]
    elif kind == "blank":
        raw = b"" if rng.random() < 0.5 else b"\n \n"
    return kind, gzip.compress(raw, mtime=0) if name.endswith(".gz") else raw


def record_count(path, as_list):
    """How many records the file holds, counted without data.py (only called on files that loaded)."""
    raw = Path(path).read_bytes()
    if path.name.endswith(".gz"):
        raw = gzip.decompress(raw)
    if as_list:
        return len(json.loads(raw))
    return sum(1 for line in raw.split(b"\n") if line.decode("utf-8").strip())


def check_loaded(examples, n_records, stderr):
    skipped = re.findall(r"skipped (\d+) of (\d+) records", stderr)
    n_skipped = int(skipped[0][0]) if skipped else 0
    if skipped:
        assert int(skipped[0][1]) == n_records
    assert len(examples) + n_skipped == n_records
    for e in examples:
        assert isinstance(e, data.Example) and e.prompt and e.prompt[-1]["role"] == "user"
        assert all(t["role"] in ("user", "assistant") and isinstance(t["content"], str) for t in e.prompt)
        assert isinstance(e.chosen, str) and e.chosen
        assert e.rejected is None or (isinstance(e.rejected, str) and e.rejected and e.rejected != e.chosen)


N_FUZZ = 80                   # corrupted files per fixture: 7 x 80 = 560, each read by its reader and by read_any


def test_fuzzed_files_load_exactly_or_raise_data_error(tmp_path, capsys):
    rng = random.Random(7)
    outcomes = {"loaded": 0, "DataError": 0}
    for name, records, reader in FIXTURES:
        for n in range(N_FUZZ):
            kind, raw = corrupt(name, records, rng)
            path = tmp_path / f"{n}_{name}"
            path.write_bytes(raw)
            for read, as_list in [(reader, name.endswith(".json")), (data.read_any, None)]:
                capsys.readouterr()
                try:
                    examples = read(path)
                except data.DataError as e:
                    assert str(e), (name, kind)
                    outcomes["DataError"] += 1
                    continue
                except Exception as e:      # noqa: BLE001 - exactly what this test is about
                    pytest.fail(f"{name} with fault {kind!r} ({path}): {type(e).__name__}: {e}")
                if as_list is None:
                    as_list = data.sniff_format(path) == "llamafactory"
                check_loaded(examples, record_count(path, as_list), capsys.readouterr().err)
                outcomes["loaded"] += 1
    assert outcomes["loaded"] > 50 and outcomes["DataError"] > 300, outcomes


@pytest.mark.parametrize("name,record", [
    ("release.json", {"instruction": "USER:x", "input": "", "output": "y"}),      # once an IndexError
    ("release.json", {"instruction": 1, "input": "", "output": "y"}),
    ("mine.jsonl", {"prompt": 3, "chosen": "y"}),                                # once an AttributeError
    ("mine.jsonl", {"prompt": "x", "chosen": "y", "rejected": 5}),
    ("pku.jsonl", {"prompt": "x", "response_0": "a", "response_1": "b", "safer_response_id": True}),
    ("hh.jsonl", {"chosen": ["\n\nHuman: a\n\nAssistant: b"], "rejected": "x"}),
])
def test_handpicked_bad_records_load_or_raise_data_error(tmp_path, capsys, name, record):
    reader = {"release.json": data.read_llamafactory, "mine.jsonl": data.read_jsonl_pairs,
              "pku.jsonl": data.read_pku, "hh.jsonl": data.read_hh}[name]
    path = tmp_path / name
    path.write_bytes(serialize(name, [record]))
    try:
        examples = reader(path)
    except data.DataError as e:
        assert str(path) in str(e)
        return
    check_loaded(examples, 1, capsys.readouterr().err)


# ---------------------------------------------------------------------------------------------------------
# Bad flags: refused through the command line before any compute, with the flag to change named.



def stage_folders(out):
    return sorted(str(p.relative_to(out)) for p in Path(out).rglob("*") if p.is_dir()) if Path(out).exists() else []


@pytest.mark.parametrize("flags,named", [
    (["--n_teachers", "0"], "--n_teachers"),
    (["--max_length", "32", "--max_prompt_length", "32"], "--max_prompt_length"),
    (["--dpo_lr", "nan"], "--dpo_lr"),
    (["--teachers", "a,b", "--student", "toy"], "--teachers"),
    (["--weak_label_teacher", "5"], "--weak_label_teacher"),
    (["--neg_sft_lr", "-1"], "--neg_sft_lr"),
    (["--length_window", "0"], "--length_window"),
    (["--toy_teacher_ops", "+,/"], "--toy_teacher_ops"),
    (["--negative_temperature", "-0.5"], "--negative_temperature"),
    (["--temperature", "-1"], "--temperature"),
])
def test_incompatible_flags_are_refused_naming_the_flag(tmp_path, capsys, flags, named):
    with pytest.raises(SystemExit) as e:
        macpo.main(SMALL + flags + ["--out", str(tmp_path / "run")])
    assert e.value.code != 0 and named in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_flags_accept_dashes_as_well_as_underscores():
    """--data-dir as --data_dir, --no-hard-negatives as --no-hard_negatives (HfArgumentParser accepts both)."""
    cfg = macpo.parse_config(["--data-dir", "d", "--n-init", "7", "--no-hard-negatives", "--neg_sft_lr", "1e-3"])
    assert (cfg.data_dir, cfg.n_init, cfg.hard_negatives, cfg.neg_sft_lr) == ("d", 7, False, 1e-3)
    assert macpo.parse_config([]).hard_negatives is True


def test_splits_larger_than_the_data_are_refused_naming_the_flags(tmp_path):
    with pytest.raises(SystemExit, match="--n_init") as e:       # the toy task runs out of harmful requests
        macpo.main(SMALL + ["--n_init", "100000", "--out", str(tmp_path / "toy")])
    assert stage_folders(tmp_path / "toy") == []
    path = tmp_path / "mine.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"q{i}", "chosen": f"a{i}", "rejected": f"b{i}"}) + "\n"
                            for i in range(10)))
    with pytest.raises(SystemExit, match="--n_init") as e:
        macpo.main(["--task", "file", "--data_file", str(path), "--teachers", "a", "--student", "b", "--n_init", "8",
                    "--n_w2s", "8", "--n_test", "0", "--out", str(tmp_path / "file")])
    assert "10 distinct prompts" in str(e.value) and stage_folders(tmp_path / "file") == []


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    """Two tiny local causal LMs, saved as anyone's would be (save_pretrained, safetensors)."""
    root = tmp_path_factory.mktemp("models")
    tokenizer = make_tokenizer()
    paths = []
    for k in range(2):
        path = root / f"model{k}"
        make_model(tokenizer, seed=k).save_pretrained(path)
        tokenizer.save_pretrained(path)
        paths.append(path)
    return paths


@pytest.fixture()
def file_task(tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"What is {i} + 1?", "chosen": f"{i + 1}.", "rejected": "No."})
                            + "\n" for i in range(40)))
    return ["--task", "file", "--data_file", str(path), "--n_init", "8", "--n_w2s", "8", "--n_test", "0",
            "--max_length", "64", "--max_prompt_length", "48", "--system", "", "--device", "cpu"]


def test_a_missing_model_among_real_ones_is_refused_before_any_training(tmp_path, tiny_models, file_task):
    out = tmp_path / "run"
    missing = tmp_path / "no-such-model"
    with pytest.raises(SystemExit) as e:
        macpo.main(file_task + ["--teachers", f"{tiny_models[0]},{tiny_models[1]},{missing}",
                                "--student", str(tiny_models[1]), "--out", str(out)])
    assert str(missing) in str(e.value) and "huggingface-cli download" in str(e.value)
    assert stage_folders(out) == []                     # not one stage started, the first teacher's SFT included


def test_a_prompt_limit_shorter_than_the_template_is_refused(tmp_path, tiny_models, file_task):
    out = tmp_path / "run"
    flags = file_task + ["--teachers", str(tiny_models[0]), "--student", str(tiny_models[1]), "--out", str(out)]
    with pytest.raises(SystemExit, match=r"--max_prompt_length 6 .*vicuna template alone is \d+ tokens"):
        macpo.main(flags + ["--system", "default", "--max_prompt_length", "6"])
    assert stage_folders(out) == []
    # nothing finished, so the same folder takes the corrected flags (the refused config.json does not block it)
    run = macpo.Run(macpo.parse_config(flags))
    run._lock.close()


# ---------------------------------------------------------------------------------------------------------
# The reference run all end-to-end tests below compare with.

@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("reference") / "run"
    macpo.main(SMALL + ["--out", str(out)])
    return out


def snapshot(out):
    """Everything of a run that must not depend on how it was run: results, pairs, generations, weights."""
    return {str(f.relative_to(out)): f.read_bytes() for f in sorted(Path(out).rglob("*"))
            if f.is_file() and f.suffix in (".json", ".jsonl", ".safetensors") and f.name != "config.json"
            and "metrics" not in f.name and ".partial" not in str(f.relative_to(out))}


def assert_finished_stages_are_whole(out):
    """Every stage marked DONE under its final name holds readable files: no half-written file is taken for done."""
    from safetensors.torch import load_file
    for done in Path(out).rglob("DONE"):
        folder = done.parent
        if folder.name.endswith(".partial"):
            continue
        for f in folder.iterdir():
            if f.suffix == ".safetensors":
                assert all(torch.isfinite(t).all() for t in load_file(f).values()), f
            elif f.suffix == ".jsonl":
                [json.loads(line) for line in f.read_text().splitlines()]
        assert not list(folder.glob("*.tmp")), folder


# ---------------------------------------------------------------------------------------------------------
# Crashes lose nothing: one run folder killed with SIGKILL six times, at random moments inside training stages
# and at chosen moments inside writes, then resumed to the very bytes of the uninterrupted run.

KILLER = r"""
import os, signal, sys
from pathlib import Path
sys.path.insert(0, ".")
import macpo
import stages

def die():
    os.kill(os.getpid(), signal.SIGKILL)

mode = sys.argv[1]
if mode == "save":        # half of the weights written, then killed
    save_model = stages.save_model
    def half_save(model, tokenizer, directory):
        save_model(model, tokenizer, directory)
        f = Path(directory) / "model.safetensors"
        f.write_bytes(f.read_bytes()[:f.stat().st_size // 2])
        die()
    stages.save_model = half_save
elif mode == "write":     # half of a generations file written, then killed
    write_text = stages.write_text
    def half_write(path, text):
        if str(path).endswith("generations.jsonl"):
            Path(f"{path}.tmp").write_text(text[:len(text) // 2])
            die()
        write_text(path, text)
    stages.write_text = half_write
elif mode == "rename":    # DONE written, killed before the stage folder is renamed into place
    replace = os.replace
    def replace_or_die(src, dst):
        if str(src).endswith(".partial"):
            die()
        replace(src, dst)
    os.replace = replace_or_die
macpo.main(sys.argv[2:])
"""


def test_run_killed_six_times_resumes_to_identical_results(reference, tmp_path):
    out = tmp_path / "run"
    argv = SMALL + ["--out", str(out)]
    rng = random.Random(11)
    # (mode, stage whose *.partial folder appears before a timed kill): bases pre-training, the student's SFT,
    # a weak-label generation, the round's DPO update; the other kills land inside a write
    plan = [("timed", "bases/teacher0"), ("save", None), ("timed", "init/student"), ("write", None),
            ("rename", None), ("timed", "round1/student")]
    for mode, stage in plan:
        proc = subprocess.Popen([sys.executable, "-c", KILLER, mode] + argv, cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if mode == "timed":
            marker = out / f"{stage}.partial"
            while not marker.exists() and not (out / stage / "DONE").exists() and proc.poll() is None:
                time.sleep(0.02)
            time.sleep(rng.uniform(0.0, 0.05))           # stages take from milliseconds to seconds
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=300) == -signal.SIGKILL, f"the {mode} kill did not happen (run ended first)"
        assert not (out / "results.json").exists()
        if mode != "timed":
            assert list(out.rglob("*.partial")), f"the {mode} kill left no stage in progress"
        assert_finished_stages_are_whole(out)
    macpo.main(argv)
    assert not list(out.rglob("*.partial")) and not list(out.rglob("*.tmp"))
    a, b = snapshot(reference), snapshot(out)
    assert a.keys() == b.keys() and [k for k in a if a[k] != b[k]] == []


# ---------------------------------------------------------------------------------------------------------
# Numerical faults: the stage stops, names the step and batch, and nothing non-finite is saved.

ROWS = [(f"USER: What is {i} + 30? ASSISTANT:", f"{i} + 30 = {i + 30}.", None) for i in range(16)]


def test_absurd_learning_rate_stops_training(tokenizer):
    model = make_model(tokenizer)
    with pytest.raises(train.NonFiniteError, match=r"optimizer step \d+ of 4 \(batch \d+, rows"):
        train.train(model, tokenizer, ROWS, train.TrainSettings(kind="sft", lr=1e30, batch_size=4, log_every=100, progress=False))


def test_nan_weight_stops_at_the_first_step(tokenizer):
    model = make_model(tokenizer)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, 0] = float("nan")
    with pytest.raises(train.NonFiniteError, match=r"step 1 of 4 \(batch 0"):
        train.train(model, tokenizer, ROWS, train.TrainSettings(kind="sft", lr=1e-3, batch_size=4, log_every=100, progress=False))


def test_nan_between_log_steps_is_caught_at_its_own_step(tokenizer, monkeypatch):
    """log_every = 100 logs steps 1 and 4 only; a NaN loss at step 2 still stops training and is named."""
    calls, sft_loss = [], train.sft_loss

    def nan_on_second_batch(logps, n):
        calls.append(1)
        losses = sft_loss(logps, n)
        return losses * float("nan") if len(calls) == 2 else losses
    monkeypatch.setattr(train, "sft_loss", nan_on_second_batch)
    with pytest.raises(train.NonFiniteError, match=r"step 2 of 4 \(batch 1,"):
        train.train(make_model(tokenizer), tokenizer, ROWS, train.TrainSettings(kind="sft", lr=1e-3, batch_size=4, log_every=100,
                    progress=False))


def test_weights_that_overflow_on_the_last_step_are_never_returned(tokenizer, monkeypatch):
    class OverflowingAdamW(torch.optim.AdamW):     # an update that overflows one weight, losses all finite
        def step(self, closure=None):
            super().step(closure)
            with torch.no_grad():
                self.param_groups[0]["params"][0].view(-1)[0] = float("inf")
    monkeypatch.setattr(torch.optim, "AdamW", OverflowingAdamW)
    with pytest.raises(train.NonFiniteError, match="non-finite weights after the last optimizer step"):
        train.train(make_model(tokenizer), tokenizer, ROWS[:4], train.TrainSettings(kind="sft", lr=1e-3, batch_size=4, progress=False))


def test_gradient_clipping_is_on_by_default(tokenizer, monkeypatch):
    assert macpo.Config().grad_clip == 1.0 and stages._settings(macpo.Config(), "x").grad_clip == 1.0
    norms, clip = [], torch.nn.utils.clip_grad_norm_
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda p, max_norm: norms.append(max_norm) or clip(p, max_norm))
    train.train(make_model(tokenizer), tokenizer, ROWS[:8], train.TrainSettings(kind="sft", lr=1e-3, batch_size=4, progress=False))
    assert norms == [1.0, 1.0]


def resumable_copy(reference, tmp_path, undone):
    """A copy of the reference run with the stages `undone` (and results.json) removed, as if it stopped there."""
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    for name in undone:
        shutil.rmtree(out / name)
    (out / "results.json").unlink()
    return out


ROUND1_UPDATES = ["round1/student", "round1/teacher0", "round1/teacher1"]


def test_nan_in_a_stage_exits_with_the_step_and_keeps_the_previous_checkpoint(reference, tmp_path, monkeypatch):
    out = resumable_copy(reference, tmp_path, ROUND1_UPDATES)
    calls, dpo_loss = [], train.dpo_loss

    def nan_on_second_batch(*args, **kwargs):
        calls.append(1)
        losses, chosen_rewards, rejected_rewards = dpo_loss(*args, **kwargs)
        return (losses * float("nan") if len(calls) == 2 else losses), chosen_rewards, rejected_rewards
    monkeypatch.setattr(train, "dpo_loss", nan_on_second_batch)
    with pytest.raises(SystemExit) as e:
        macpo.main(SMALL + ["--out", str(out)])
    assert isinstance(e.value.code, str)                  # exit status 1, the message on stderr
    assert re.search(r"round1/student: non-finite loss or gradient at optimizer step 2 of 2 \(batch 1,", e.value.code)
    assert not (out / "round1" / "student").exists() and not (out / "round1" / "student.partial" / "DONE").exists()
    assert not list((out / "round1" / "student.partial").glob("*.safetensors"))         # nothing NaN saved
    assert snapshot(out) == {k: v for k, v in snapshot(reference).items()
                             if not k.startswith(tuple(ROUND1_UPDATES)) and k != "results.json"}


# ---------------------------------------------------------------------------------------------------------
# Disk and locks

def test_full_disk_during_a_save_keeps_finished_stages_and_a_rerun_completes(reference, tmp_path, monkeypatch):
    out = resumable_copy(reference, tmp_path, ROUND1_UPDATES)
    before = snapshot(out)
    done = {str(f): f.stat().st_mtime_ns for f in out.rglob("DONE")}

    def disk_full(model, tokenizer, directory):
        f = Path(directory) / "model.safetensors"
        f.write_bytes(b"\0" * 1000)                       # part of the file written, then no space is left
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))
    monkeypatch.setattr(stages, "save_model", disk_full)
    try:
        macpo.main(SMALL + ["--out", str(out)])
        pytest.fail("a full disk went unnoticed")
    except SystemExit as e:
        message = e.code
    gc.collect()            # the failed run's frames, and the run folder's lock with them, are gone (as its process would be)
    assert "No space left on device" in message and "run the same command again" in message
    assert snapshot(out) == before and {str(f): f.stat().st_mtime_ns for f in out.rglob("DONE")} == done
    assert not (out / "round1" / "student").exists() and not (out / "round1" / "student.partial" / "DONE").exists()
    monkeypatch.undo()
    macpo.main(SMALL + ["--out", str(out)])
    a, b = snapshot(reference), snapshot(out)
    assert a.keys() == b.keys() and [k for k in a if a[k] != b[k]] == []


HOLD = """import sys, time; sys.path.insert(0, "."); import macpo
run = macpo.Run(macpo.parse_config(sys.argv[1:])); print("locked", flush=True); time.sleep(600)"""


def test_second_process_is_refused_and_the_lock_dies_with_its_holder(tmp_path):
    argv = SMALL + ["--out", str(tmp_path / "run")]
    holder = subprocess.Popen([sys.executable, "-c", HOLD] + argv, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        second = subprocess.run([sys.executable, "macpo.py"] + argv, cwd=ROOT, capture_output=True, text=True,
                                timeout=120)
        assert second.returncode != 0
        assert f"another macpo process is running in {tmp_path / 'run'}" in second.stderr
        assert "Traceback" not in second.stderr
    finally:
        holder.kill()                                     # SIGKILL: the holder gets no chance to unlock
        holder.wait()
    run = macpo.Run(macpo.parse_config(argv))             # the kernel released the lock with its process
    run._lock.close()


# ---------------------------------------------------------------------------------------------------------
# Untrusted files: no remote code unless asked, weights through safetensors or weights-only unpickling.

def test_trust_remote_code_is_off_unless_asked_and_is_passed_through(tiny_models, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    assert macpo.Config().trust_remote_code is False and macpo.parse_config([]).trust_remote_code is False
    assert macpo.parse_config(["--trust_remote_code"]).trust_remote_code is True
    seen = []
    for cls in (AutoModelForCausalLM, AutoTokenizer):
        original = cls.from_pretrained
        monkeypatch.setattr(cls, "from_pretrained",
                            lambda *a, original=original, **kw: seen.append(kw) or original(*a, **kw))
    stages.load_agent(macpo.Config(device="cpu"), tiny_models[0])
    assert [kw["trust_remote_code"] for kw in seen] == [False, False]
    assert seen[1]["use_safetensors"] is True            # a folder with model.safetensors is read through it only
    seen.clear()
    stages.load_agent(macpo.Config(device="cpu", trust_remote_code=True), tiny_models[0])
    assert [kw["trust_remote_code"] for kw in seen] == [True, True]


class Payload:
    def __reduce__(self):
        return (os.mkdir, (str(Path(os.environ["PAYLOAD_MARKER"])),))


def test_pickled_weights_run_no_code(tmp_path, tiny_models, monkeypatch):
    folder = tmp_path / "evil"
    shutil.copytree(tiny_models[0], folder)
    (folder / "model.safetensors").unlink()
    marker = tmp_path / "payload-ran"
    monkeypatch.setenv("PAYLOAD_MARKER", str(marker))
    torch.save({"model.embed_tokens.weight": Payload()}, folder / "pytorch_model.bin")
    with pytest.raises(Exception):
        train.load_model(str(folder))
    assert not marker.exists()


def test_no_pickle_loading_or_remote_code_in_the_sources():
    for f in ROOT.glob("*.py"):
        text = f.read_text()
        for call in re.findall(r"torch\.load\([^)]*\)", text):
            assert "weights_only=True" in call, (f.name, call)
        assert "trust_remote_code=True" not in text, f.name
