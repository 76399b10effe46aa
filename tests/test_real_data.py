"""The real-data path (`run.sh hh`) offline: a clear error naming the files to fetch, and a full run on the HH
test file in ../shared/data with shrunken splits and tiny local models (no downloads)."""
import json
from pathlib import Path

import huggingface_hub
import pytest

import macpo
from tiny import make_model, make_tokenizer

pytestmark = pytest.mark.slow           # left out of `bash run.sh test fast`

HH = Path(__file__).resolve().parents[2] / "shared" / "data" / "hh-rlhf"
TINY_HH = [["This is a fixture dialogue.", "Human: hello there", "Assistant: Sorry, I do not know."]]


def test_hh_offline_names_the_file_to_fetch_and_where(tmp_path, monkeypatch):
    # HF_HUB_OFFLINE is read when huggingface_hub is imported; this is the flag it consults on every request.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    (tmp_path / "data").mkdir()
    with pytest.raises(SystemExit) as e:
        macpo.main(["--task", "hh-helpful", "--teachers", "a,b", "--student", "c", "--out", str(tmp_path / "run"),
                    "--data_dir", str(tmp_path / "data"), "--cache_dir", str(tmp_path / "cache")])
    msg = str(e.value)
    assert "https://huggingface.co/datasets/Anthropic/hh-rlhf/resolve/main/helpful-base/train.jsonl.gz" in msg
    assert str(tmp_path / "data" / "hh-rlhf" / "helpful-base" / "train.jsonl.gz") in msg and "--data_dir" in msg


def test_offline_error_names_every_missing_file_and_model_at_once(tmp_path, monkeypatch):
    """Two dataset files, three models and a reward model missing: one error lists all six, before anything
    trains; the flag is spelt --data-dir here (both spellings are accepted)."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    (tmp_path / "data").mkdir()
    with pytest.raises(SystemExit) as e:
        macpo.main(["--task", "hh-helpful", "--teachers", "nope/t0,nope/t1", "--student", "nope/s",
                    "--reward_models", "nope/rm", "--out", str(tmp_path / "run"), "--data-dir", str(tmp_path / "data")])
    msg = str(e.value)
    assert "6 of the run's files or models are missing" in msg
    for missing in ("helpful-base/train.jsonl.gz", "helpful-base/test.jsonl.gz", "'nope/t0' (--teachers)",
                    "'nope/t1' (--teachers)", "'nope/s' (--student)", "'nope/rm' (--reward_models)"):
        assert missing in msg, missing
    assert not (tmp_path / "run" / "init").exists()


def test_missing_model_says_what_to_download(tmp_path, monkeypatch):
    if not HH.exists():
        pytest.skip("../shared/data/hh-rlhf not present")
    # the flag huggingface_hub consults (the environment variable is read once, on import)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(SystemExit) as e:
        macpo.main(["--task", "hh-helpful", "--teachers", str(tmp_path / "no-such-model"), "--student", "x",
                    "--reward_models", "none", "--data_dir", str(HH), "--train_split", "test", "--n_init", "8",
                    "--n_w2s", "8", "--n_test", "4", "--out", str(tmp_path / "run")])
    msg = str(e.value)
    assert "2 of the run's files or models are missing" in msg
    assert f"model {tmp_path / 'no-such-model'} (--teachers): no such folder" in msg
    assert "`hf download x --local-dir models/x`" in msg and "pass it to --student" in msg


PKU_TEST_1K = Path(__file__).resolve().parents[2] / "shared" / "data" / "macpo" / "pku_test_1k.json"


@pytest.mark.parametrize("source", ["fixture", "shared"])
def test_a_file_without_pairs_is_refused_before_any_model_loads(tmp_path, monkeypatch, source):
    """--task file on one response per prompt (the release's pku_test_1k.json, or a fixture like it): refused
    when the data is read, naming the file and the record's line, before any model is looked at or loaded."""
    if source == "shared":
        if not PKU_TEST_1K.is_file():
            pytest.skip(f"{PKU_TEST_1K} not present")
        path, line, counts = PKU_TEST_1K, 2, "1000 of the file's 1000"
    else:
        path, line, counts = tmp_path / "sft.json", 2, "40 of the file's 40"
        path.write_text(json.dumps([{"instruction": f"q{i}", "input": "", "output": f"a{i}"} for i in range(40)],
                                   indent=4))
    monkeypatch.setattr(macpo, "check_models", lambda cfg: pytest.fail("models checked before the data"))
    with pytest.raises(SystemExit) as e:
        macpo.main(["--task", "file", "--data_file", str(path), "--teachers", "nobody/t0,nobody/t1",
                    "--student", "nobody/s", "--n_init", "16", "--n_w2s", "16", "--n_test", "8",
                    "--out", str(tmp_path / "run")])
    msg = str(e.value)
    assert msg.startswith(f"error: {path}:{line}: this record has no rejected response ({counts} records have none)")
    assert "MACPO needs preference pairs for D_init" in msg
    assert not (tmp_path / "run" / "init").exists()


def test_hh_run_on_local_files_with_tiny_models(tmp_path):
    if not HH.exists():
        pytest.skip("../shared/data/hh-rlhf not present")
    import data
    examples = data.read_hh(HH / "helpful-base" / "test.jsonl.gz")[:300]
    texts = [t["content"] for e in examples for t in e.prompt] + [e.chosen for e in examples]
    paths = []
    for k, hidden in enumerate((32, 32, 48)):           # two teachers and a student, each its own tokenizer
        tokenizer = make_tokenizer(texts + ["USER: ASSISTANT:"], vocab_size=300 + 50 * k)
        model = make_model(tokenizer, hidden=hidden, seed=k)
        model.config.max_position_embeddings = 256
        path = tmp_path / f"model{k}"
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        paths.append(str(path))
    out = tmp_path / "run"
    macpo.main(["--task", "hh-helpful", "--data_dir", str(HH), "--train_split", "test", "--n_init", "24",
                "--n_w2s", "16", "--n_test", "8", "--teachers", ",".join(paths[:2]), "--student", paths[2],
                "--max_length", "128", "--max_prompt_length", "96", "--max_new_tokens", "8", "--batch_size", "8",
                "--teacher_sft_epochs", "1", "--student_sft_epochs", "1", "--sft_lr", "1e-3", "--dpo_lr", "1e-4",
                "--system", "", "--device", "cpu", "--out", str(out), "--no-ceiling",
                "--reward_models", "none"])        # the task's default evaluator is a hub model: not here
    results = json.loads((out / "results.json").read_text())
    assert list(results["results"]) == ["init", "round1", "round2"]          # T = K = 2
    pairs = [json.loads(line) for line in (out / "round2" / "pairs_student" / "pairs.jsonl").read_text().splitlines()]
    assert len(pairs) == 16 and {p["chosen_by"] for p in pairs} <= {"teacher0", "teacher1"}
    gens = (out / "eval" / "round2" / "student" / "generations.jsonl").read_text().splitlines()
    assert len(gens) == 8
    # every HH prompt in the run came from the file, multi-turn dialogues kept as turns
    assert all(p["prompt"][-1]["role"] == "user" for p in pairs)
