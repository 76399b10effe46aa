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
    """Two dataset files and three models missing: one error lists all five, before anything trains; the flag
    is spelt --data-dir here (both spellings are accepted)."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    (tmp_path / "data").mkdir()
    with pytest.raises(SystemExit) as e:
        macpo.main(["--task", "hh-helpful", "--teachers", "nope/t0,nope/t1", "--student", "nope/s",
                    "--out", str(tmp_path / "run"), "--data-dir", str(tmp_path / "data")])
    msg = str(e.value)
    assert "5 of the run's files or models are missing" in msg
    for missing in ("helpful-base/train.jsonl.gz", "helpful-base/test.jsonl.gz", "'nope/t0'", "'nope/t1'", "'nope/s'"):
        assert missing in msg, missing
    assert not (tmp_path / "run" / "init").exists()


def test_missing_model_says_what_to_download(tmp_path, monkeypatch):
    if not HH.exists():
        pytest.skip("../shared/data/hh-rlhf not present")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SystemExit) as e:
        macpo.main(["--task", "hh-helpful", "--teachers", str(tmp_path / "no-such-model"), "--student", "x",
                    "--data_dir", str(HH), "--train_split", "test", "--n_init", "8", "--n_w2s", "8", "--n_test", "4",
                    "--out", str(tmp_path / "run")])
    assert "no-such-model" in str(e.value) and "huggingface-cli download" in str(e.value)


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
                "--system", "", "--device", "cpu", "--out", str(out), "--no-ceiling"])
    results = json.loads((out / "results.json").read_text())
    assert list(results["results"]) == ["init", "round1", "round2"]          # T = K = 2
    pairs = [json.loads(line) for line in (out / "round2" / "pairs_student" / "pairs.jsonl").read_text().splitlines()]
    assert len(pairs) == 16 and {p["chosen_by"] for p in pairs} <= {"teacher0", "teacher1"}
    gens = (out / "eval" / "round2" / "student" / "generations.jsonl").read_text().splitlines()
    assert len(gens) == 8
    # every HH prompt in the run came from the file, multi-turn dialogues kept as turns
    assert all(p["prompt"][-1]["role"] == "user" for p in pairs)
