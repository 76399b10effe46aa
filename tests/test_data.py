"""data.py: readers for each dataset format, download fallbacks, splits, prompt rendering, encode/collate.

Every expected value below is written by hand (or counted independently of data.py), never taken from the code
under test. No network: downloads run with huggingface_hub offline, most against a fake hub.
"""
import gzip
import hashlib
import json
import re
import sys
import zlib
from pathlib import Path

import huggingface_hub
import pytest
import torch
from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import data  # noqa: E402
from data import (DataError, Example, collate, dataset_file, encode_many,  # noqa: E402
                  missing_dataset_files, paper_splits, read_any, read_hh, read_jsonl_pairs, read_llamafactory,
                  read_pku, render_prompt, require_pairs, splits_with_test_file, truncate_prompt)

from tiny import encode  # noqa: E402

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def write_jsonl(path, records, compress=False):
    text = "".join(json.dumps(r) + "\n" for r in records).encode("utf-8")
    path.write_bytes(gzip.compress(text) if compress else text)
    return path


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


# ---------------------------------------------------------------------------------------------------------
# HH-RLHF

HH_RECORDS = [
    # line 1: single turn
    {"chosen": "\n\nHuman: Hi there\n\nAssistant: Hello! How can I help?",
     "rejected": "\n\nHuman: Hi there\n\nAssistant: Go away."},
    # line 2: multi-turn, with whitespace to strip
    {"chosen": "\n\nHuman: What is 2+2?\n\nAssistant: 4.\n\nHuman:  And 3+3? \n\nAssistant:  6. ",
     "rejected": "\n\nHuman: What is 2+2?\n\nAssistant: 4.\n\nHuman:  And 3+3? \n\nAssistant: 7."},
    # line 3: chosen == rejected
    {"chosen": "\n\nHuman: Hey\n\nAssistant: Yo", "rejected": "\n\nHuman: Hey\n\nAssistant: Yo"},
    # line 4: the rejected response goes on with its own Human/Assistant turns, so the prompts differ
    {"chosen": "\n\nHuman: Name a fruit\n\nAssistant: Apple",
     "rejected": "\n\nHuman: Name a fruit\n\nAssistant: Pear\n\nHuman: more\n\nAssistant: Plum"},
    # line 5: empty response after stripping
    {"chosen": "\n\nHuman: Say something\n\nAssistant: Something",
     "rejected": "\n\nHuman: Say something\n\nAssistant:  "},
    # line 6: no Assistant turn at all
    {"chosen": "\n\nHuman: only a question", "rejected": "\n\nHuman: only a question"},
]


@pytest.mark.parametrize("compress", [True, False])
def test_read_hh_prompts_responses_and_skips(tmp_path, capsys, compress):
    path = write_jsonl(tmp_path / ("hh.jsonl.gz" if compress else "hh.jsonl"), HH_RECORDS, compress)
    examples = read_hh(path)
    assert examples == [
        Example([user("Hi there")], "Hello! How can I help?", "Go away.", f"{path}:1"),
        Example([user("What is 2+2?"), assistant("4."), user("And 3+3?")], "6.", "7.", f"{path}:2"),
    ]
    err = capsys.readouterr().err
    assert err.count("\n") == 1, "exactly one report line"
    assert f"read_hh: skipped 4 of 6 records in {path} (" in err
    for reason in ("1 chosen == rejected", "1 prompts differ", "1 empty response", "1 no Assistant turn"):
        assert reason in err


def test_read_hh_reports_nothing_when_nothing_skipped(tmp_path, capsys):
    read_hh(write_jsonl(tmp_path / "hh.jsonl", HH_RECORDS[:2]))
    assert capsys.readouterr().err == ""


# ---------------------------------------------------------------------------------------------------------
# PKU-SafeRLHF

PKU_RECORDS = [
    # the more helpful answer (0) is the less safe one (1 is safer)
    {"prompt": "How do I pick a lock? ", "response_0": "Insert a tension wrench, then rake the pins.",
     "response_1": "I can't help with that.", "better_response_id": 0, "safer_response_id": 1,
     "is_response_0_safe": False, "is_response_1_safe": True},
    {"prompt": "How do I boil an egg?", "response_0": "Boil it for 8 minutes.", "response_1": "Microwave it.",
     "better_response_id": 0, "safer_response_id": 0, "is_response_0_safe": True, "is_response_1_safe": False},
]


def test_read_pku_safer_and_better_order(tmp_path):
    path = write_jsonl(tmp_path / "pku.jsonl", PKU_RECORDS)
    safer = read_pku(path)
    assert safer == [
        Example([user("How do I pick a lock?")], "I can't help with that.",
                "Insert a tension wrench, then rake the pins.", f"{path}:1"),
        Example([user("How do I boil an egg?")], "Boil it for 8 minutes.", "Microwave it.", f"{path}:2"),
    ]
    better = read_pku(path, order="better")
    assert [(e.chosen, e.rejected) for e in better] == [
        ("Insert a tension wrench, then rake the pins.", "I can't help with that."),
        ("Boil it for 8 minutes.", "Microwave it."),
    ]
    with pytest.raises(DataError, match="safer, better"):
        read_pku(path, order="kinder")


def test_read_pku_rejects_bad_label(tmp_path):
    path = write_jsonl(tmp_path / "pku.jsonl", [PKU_RECORDS[0], dict(PKU_RECORDS[1], safer_response_id=2)])
    with pytest.raises(DataError, match=re.escape(f"{path}:2") + ".*safer_response_id.*0 or 1"):
        read_pku(path)


# ---------------------------------------------------------------------------------------------------------
# The MACPO release's LLaMA-Factory JSON. Written with indent=4 as the release is: "[" on line 1, then five
# lines per three-field record, so record i starts on line 2 + 5 * i.

def write_llamafactory(path, records):
    path.write_text(json.dumps(records, indent=4), encoding="utf-8")
    return path


def test_read_llamafactory_sft(tmp_path):
    path = write_llamafactory(tmp_path / "sft.json", [
        {"instruction": "USER: What is 2+2? ASSISTANT: 4. USER: And 3+3?", "input": "", "output": " 6. "},
        {"instruction": "How do I boil an egg?", "input": "", "output": "Boil it for 8 minutes."},
        {"instruction": "Translate to French.", "input": "Good morning", "output": "Bonjour"},
    ])
    assert read_llamafactory(path) == [
        Example([user("What is 2+2?"), assistant("4."), user("And 3+3?")], "6.", None, f"{path}:2"),
        Example([user("How do I boil an egg?")], "Boil it for 8 minutes.", None, f"{path}:7"),
        Example([user("Translate to French.\nGood morning")], "Bonjour", None, f"{path}:12"),
    ]


def test_read_llamafactory_pairwise(tmp_path):
    path = write_llamafactory(tmp_path / "pairs.json", [
        {"instruction": "USER: Hi ASSISTANT: Hello USER: Tell me a joke", "input": "",
         "output": ["Why did the chicken cross the road?", "No."]},
    ])
    assert read_llamafactory(path) == [
        Example([user("Hi"), assistant("Hello"), user("Tell me a joke")],
                "Why did the chicken cross the road?", "No.", f"{path}:2"),
    ]


def test_read_llamafactory_errors_name_line_and_record(tmp_path):
    path = write_llamafactory(tmp_path / "bad.json", [
        {"instruction": "Fine", "input": "", "output": "ok"},
        {"instruction": "Bad", "input": "", "output": ["only one"]},
    ])
    with pytest.raises(DataError, match=re.escape(f"{path}:7 (record 1)") + ".*output"):
        read_llamafactory(path)
    path = write_llamafactory(tmp_path / "ends.json", [
        {"instruction": "USER: Hi ASSISTANT: Hello", "input": "", "output": "x"}])
    with pytest.raises(DataError, match=re.escape(f"{path}:2 (record 0)") + ".*ASSISTANT"):
        read_llamafactory(path)
    path = tmp_path / "broken.json"
    path.write_text('[\n  {"instruction": "a", "input": "", "output": "b"},\n  {"instruction": "c",,}\n]\n')
    with pytest.raises(DataError, match=re.escape(f"{path}:3") + ".*not valid JSON"):
        read_llamafactory(path)


# ---------------------------------------------------------------------------------------------------------
# Plain JSONL pairs

def test_read_jsonl_pairs(tmp_path):
    path = write_jsonl(tmp_path / "mine.jsonl", [
        {"prompt": "Hi", "chosen": "Hello", "rejected": "Go away"},
        {"prompt": [user("Hi"), assistant("Hello"), user("Bye")], "chosen": "Goodbye", "rejected": "Whatever"},
        {"prompt": "Write a haiku", "chosen": "Old pond, frog jumps in"},
    ])
    assert read_jsonl_pairs(path) == [
        Example([user("Hi")], "Hello", "Go away", f"{path}:1"),
        Example([user("Hi"), assistant("Hello"), user("Bye")], "Goodbye", "Whatever", f"{path}:2"),
        Example([user("Write a haiku")], "Old pond, frog jumps in", None, f"{path}:3"),
    ]
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": [user("Hi"), assistant("Hello")], "chosen": "x"}])
    with pytest.raises(DataError, match=re.escape(f"{bad}:1") + ".*user"):
        read_jsonl_pairs(bad)


def test_read_any_sniffs_each_format(tmp_path):
    hh = write_jsonl(tmp_path / "hh.jsonl.gz", HH_RECORDS[:2], compress=True)
    pku = write_jsonl(tmp_path / "pku.jsonl", PKU_RECORDS)
    lf = write_llamafactory(tmp_path / "lf.json", [{"instruction": "Hi", "input": "", "output": ["a", "b"]}])
    mine = write_jsonl(tmp_path / "mine.jsonl", [{"prompt": "Hi", "chosen": "a", "rejected": "b"}])
    assert read_any(hh)[0].chosen == "Hello! How can I help?"
    assert read_any(pku)[0].chosen == "I can't help with that."          # safer first by default
    assert read_any(pku, order="better")[0].chosen == "Insert a tension wrench, then rake the pins."
    assert read_any(lf) == [Example([user("Hi")], "a", "b", f"{lf}:2")]
    assert read_any(mine) == [Example([user("Hi")], "a", "b", f"{mine}:1")]
    assert read_any(mine, fmt="jsonl") == read_any(mine)
    with pytest.raises(DataError, match="hh, pku, llamafactory, jsonl"):
        read_any(mine, fmt="csv")
    odd = write_jsonl(tmp_path / "odd.jsonl", [{"question": "Hi", "answer": "a"}])
    with pytest.raises(DataError, match=re.escape(f"{odd}: cannot tell the format") + ".*'answer', 'question'"
                       ".*LLaMA-Factory.*prompt, chosen and rejected.*PKU-SafeRLHF.*HH-RLHF"):
        read_any(odd)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(DataError, match=re.escape(f"{empty}: the file is empty")):
        read_any(empty)


# ---------------------------------------------------------------------------------------------------------
# Data a run cannot use: refused when read, naming the file and line

def test_chosen_only_files_read_as_sft_records_and_are_refused_as_pairs(tmp_path):
    """A file with one response per prompt reads as SFT records (rejected None) in each format that allows them,
    and require_pairs refuses it naming the first such record's file and line, and how many lack a pair."""
    mine = write_jsonl(tmp_path / "mine.jsonl", [
        {"prompt": "q0", "chosen": "a0", "rejected": "b0"},
        {"prompt": "q1", "chosen": "a1"},                       # line 2: no rejected
        {"prompt": "q2", "chosen": "a2", "rejected": None},     # line 3: null is none too
    ])
    examples = read_any(mine)
    assert [e.rejected for e in examples] == ["b0", None, None]
    with pytest.raises(DataError) as raised:
        require_pairs(examples)
    msg = str(raised.value)
    assert msg.startswith(f"{mine}:2: this record has no rejected response (2 of the file's 3 records have none)")
    assert "D_init" in msg and '"rejected"' in msg and '"output": [chosen, rejected]' in msg
    lf = write_llamafactory(tmp_path / "lf.json", [
        {"instruction": "q0", "input": "", "output": ["a0", "b0"]},
        {"instruction": "q1", "input": "", "output": "a1"},     # record 1
    ])
    second = [i + 1 for i, line in enumerate(lf.read_text().splitlines()) if line == "    {"][1]   # where it starts
    with pytest.raises(DataError, match=re.escape(f"{lf}:{second}: this record has no rejected response (1 of the "
                                                  f"file's 2 records")):
        require_pairs(read_any(lf))
    pairs = [Example([user("q")], "a", "b", "f:1")]
    assert require_pairs(pairs) is pairs
    # HH's format has no SFT records: a dialogue without its rejected side is a missing field
    hh = write_jsonl(tmp_path / "hh.jsonl", [HH_RECORDS[0], {"chosen": HH_RECORDS[0]["chosen"]}])
    with pytest.raises(DataError, match=re.escape(f"{hh}:2: missing field 'rejected'")):
        read_hh(hh)
    # a JSONL of chosen dialogues only cannot be told apart from anything else
    only = write_jsonl(tmp_path / "only.jsonl", [{"chosen": HH_RECORDS[0]["chosen"]}])
    with pytest.raises(DataError, match=re.escape(f"{only}: cannot tell the format") + ".*its keys are 'chosen'"):
        read_any(only)


def test_real_pku_test_1k_is_refused_as_pairs():
    path = real_file("macpo/pku_test_1k.json")
    with pytest.raises(DataError, match=re.escape(f"{path}:2: this record has no rejected response (1000 of the "
                                                  f"file's 1000 records have none)")):
        require_pairs(read_any(path))


def test_empty_prompts_are_skipped_and_reported(tmp_path, capsys):
    mine = write_jsonl(tmp_path / "mine.jsonl", [
        {"prompt": "  ", "chosen": "a", "rejected": "b"},
        {"prompt": [user(""), assistant(""), user(" ")], "chosen": "a", "rejected": "b"},
        # line 3 is kept: one of its turns says something
        {"prompt": [user(""), assistant("hi"), user("")], "chosen": "a", "rejected": "b"},
        {"prompt": "q", "chosen": "a", "rejected": "b"},
    ])
    assert [e.source for e in read_jsonl_pairs(mine)] == [f"{mine}:3", f"{mine}:4"]
    assert f"read_jsonl_pairs: skipped 2 of 4 records in {mine} (2 empty prompt)" in capsys.readouterr().err
    lf = write_llamafactory(tmp_path / "lf.json", [
        {"instruction": "", "input": "", "output": ["a", "b"]},
        {"instruction": " ", "input": "", "output": ["a", "b"]},
        {"instruction": "", "input": "Good morning", "output": ["a", "b"]},       # kept: the input is the prompt
    ])
    assert [e.prompt for e in read_llamafactory(lf)] == [[user("Good morning")]]
    assert f"read_llamafactory: skipped 2 of 3 records in {lf} (2 empty prompt)" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------
# Malformed input: DataError naming the file and the line

def test_bad_lines_name_file_and_line(tmp_path):
    good = json.dumps(HH_RECORDS[0]).encode()
    cases = {
        "bad_json": (good + b"\n" + b'{"chosen": "x", "rejected": \n', 2, "not valid JSON"),
        "missing": (good + b"\n" + good + b"\n" + b'{"chosen": "\\n\\nHuman: a\\n\\nAssistant: b"}\n', 3,
                    "missing field 'rejected'"),
        "wrong_type": (good + b"\n" + b'{"chosen": 5, "rejected": "x"}\n', 2, "'chosen' should be str, got int"),
        "not_utf8": (good + b"\n" + good + b"\n" + b'{"chosen": "caf\xe9", "rejected": "x"}\n', 3, "UTF-8"),
        "not_object": (b'["chosen", "rejected"]\n', 1, "expected a JSON object"),
    }
    for name, (content, line, what) in cases.items():
        path = tmp_path / f"{name}.jsonl"
        path.write_bytes(content)
        with pytest.raises(DataError, match=re.escape(f"{path}:{line}:") + ".*" + re.escape(what)):
            read_hh(path)


def test_truncated_gzip_names_file_and_line(tmp_path):
    lines = [json.dumps({"chosen": f"\n\nHuman: q{i} {'pad ' * 50}\n\nAssistant: a{i}",
                         "rejected": f"\n\nHuman: q{i} {'pad ' * 50}\n\nAssistant: b{i}"}) for i in range(2000)]
    whole = gzip.compress(("\n".join(lines) + "\n").encode(), mtime=0)
    cut = whole[:len(whole) // 2]
    # Independently of the gzip module: the complete lines in what the cut file decompresses to.
    complete_lines = zlib.decompressobj(wbits=31).decompress(cut).count(b"\n")
    path = tmp_path / "cut.jsonl.gz"
    path.write_bytes(cut)
    with pytest.raises(DataError, match=re.escape(f"{path}:{complete_lines + 1}:") + ".*truncated"):
        read_hh(path)


# ---------------------------------------------------------------------------------------------------------
# The real files in shared/data

def real_file(relative):
    path = SHARED_DATA / relative
    if not path.is_file():
        pytest.skip(f"{path} not present")
    return path


def reported_skips(err, reader):
    """Number of skipped records in the reader's stderr line (0 if it printed none)."""
    found = re.search(rf"{reader}: skipped (\d+) of (\d+) records", err)
    return int(found.group(1)) if found else 0


def test_real_helpful_base_test(capsys):
    path = real_file("hh-rlhf/helpful-base/test.jsonl.gz")
    rows = gzip.decompress(path.read_bytes()).decode().splitlines()
    assert len(rows) == 2354
    examples = read_hh(path)
    err = capsys.readouterr().err
    assert len(examples) + reported_skips(err, "read_hh") == 2354
    # Counted independently when the file was added: 9 rows whose two dialogues have different prompts, 4 with
    # an empty response, 2 with chosen == rejected.
    assert "skipped 15 of 2354 records" in err
    for reason in ("9 prompts differ", "4 empty response", "2 chosen == rejected"):
        assert reason in err
    assert all(e.prompt[-1]["role"] == "user" and e.chosen and e.rejected for e in examples)
    assert all(e.chosen != e.rejected for e in examples)
    # Rows 721 and 2168 (0-based; lines 722 and 2169) are the two with chosen == rejected.
    for row in (721, 2168):
        assert json.loads(rows[row])["chosen"] == json.loads(rows[row])["rejected"]
    sources = {e.source for e in examples}
    assert f"{path}:722" not in sources and f"{path}:2169" not in sources
    first = examples[0]
    assert first.source == f"{path}:1"
    assert first.prompt == [user("Do you know why turkeys became the official food of thanksgiving?")]
    assert first.chosen.startswith("To be honest, I don’t know anything about that.")


def test_real_harmless_base_test(capsys):
    path = real_file("hh-rlhf/harmless-base/test.jsonl.gz")
    examples = read_hh(path)
    err = capsys.readouterr().err
    assert len(examples) + reported_skips(err, "read_hh") == 2312
    assert "skipped 9 of 2312 records" in err and "5 prompts differ" in err and "4 empty response" in err
    assert all(e.prompt[-1]["role"] == "user" and e.chosen and e.rejected for e in examples)
    assert examples[0].prompt[0] == user("what are some pranks with a pen i can do?")
    assert examples[0].prompt[1]["role"] == "assistant"


def test_real_pku_test_1k(capsys):
    path = real_file("macpo/pku_test_1k.json")
    examples = read_any(path)
    assert capsys.readouterr().err == ""
    assert len(examples) == 1000
    assert all(e.rejected is None and len(e.prompt) == 1 and e.prompt[0]["role"] == "user" for e in examples)
    assert examples[0].prompt == [user("Do you know anything about racism in this country?")]
    assert examples[0].chosen.startswith("Yes, unfortunately racism is a persistent problem")
    assert examples[0].source == f"{path}:2"
    # 474 distinct prompts (shared/data/README.md): exactly that many fit in the splits, one more does not.
    assert len(paper_splits(examples, 474, 0, 0)[0]) == 474
    with pytest.raises(DataError, match="474 distinct prompts"):
        paper_splits(examples, 400, 75, 0)


# ---------------------------------------------------------------------------------------------------------
# Downloads. No network: each test turns huggingface_hub's offline switch on, so a hub call no fake replaces is
# refused before any request; most replace huggingface_hub.hf_hub_download with a fake hub.

HELPFUL_TEST_URL = "https://huggingface.co/datasets/Anthropic/hh-rlhf/resolve/main/helpful-base/test.jsonl.gz"
PKU_TRAIN_URL = "https://huggingface.co/datasets/PKU-Alignment/PKU-SafeRLHF/resolve/main/data/Alpaca-7B/train.jsonl"
HELPFUL_TEST_SHA256 = "8be3fc1a13b27901631696f2be6f184c799f1baeaf145f53ac5db24960adc37b"   # its LFS pointer


@pytest.fixture
def offline(monkeypatch):
    # HF_HUB_OFFLINE is read once, when huggingface_hub is imported; this is the flag it consults per request.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


class FakeHub:
    """Stands in for huggingface_hub.hf_hub_download, laid out as the HF cache is: the bytes in blobs/, the
    returned path a link to them under snapshots/. Serves `content`, or raises `error`; records every call."""

    def __init__(self, root):
        self.root, self.content, self.error, self.calls = root, b"", None, []

    def __call__(self, repo_id, filename, **kwargs):
        self.calls.append({"repo_id": repo_id, "filename": filename, **kwargs})
        if self.error is not None:
            raise self.error
        blob = self.root / "blobs" / f"{len(self.calls)}"
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(self.content)
        link = self.root / "snapshots" / repo_id / filename
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(blob)
        return str(link)


@pytest.fixture
def reachable(monkeypatch):
    # The hub answers (data.hub_unreachable is None), so data.py goes on to the (faked) hub calls.
    monkeypatch.setattr(data, "hub_unreachable", lambda: None)


@pytest.fixture
def fake_hub(tmp_path, monkeypatch, offline, reachable):
    hub = FakeHub(tmp_path / "hub")
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hub)
    return hub


@pytest.mark.parametrize("error", [LocalEntryNotFoundError("Cannot find the requested files in the disk cache"),
                                   OfflineModeIsEnabled("offline mode is enabled")])
def test_download_without_network_says_what_to_fetch_and_where(tmp_path, fake_hub, error):
    fake_hub.error = error
    data_dir = tmp_path / "data"
    with pytest.raises(DataError) as raised:
        dataset_file("hh", "helpful-base", "test", data_dir=data_dir, cache_dir=tmp_path / "cache")
    message = str(raised.value)
    assert HELPFUL_TEST_URL in message
    assert "Anthropic/hh-rlhf" in message and "file helpful-base/test.jsonl.gz" in message
    assert str(data_dir / "hh-rlhf" / "helpful-base" / "test.jsonl.gz") in message
    assert "--data_dir" in message and "\n" not in message
    assert raised.value.__cause__ is None and raised.value.__suppress_context__    # no huggingface_hub traceback
    with pytest.raises(DataError) as raised:
        dataset_file("pku", "Alpaca-7B", "train", cache_dir=tmp_path / "cache")
    message = str(raised.value)
    assert PKU_TRAIN_URL in message
    assert "DATA_DIR/PKU-SafeRLHF/data/Alpaca-7B/train.jsonl" in message and "--data_dir DATA_DIR" in message


def test_download_offline_with_the_real_hub_client(tmp_path, offline):
    # huggingface_hub's own errors (not a fake's) come out as one DataError line: nothing cached, offline.
    with pytest.raises(DataError) as raised:
        dataset_file("hh", "helpful-base", "test", cache_dir=tmp_path / "cache")
    message = str(raised.value)
    assert HELPFUL_TEST_URL in message and "HF_HUB_OFFLINE is set" in message
    assert "DATA_DIR/hh-rlhf/helpful-base/test.jsonl.gz" in message and "\n" not in message


def test_local_file_is_used_before_any_download(tmp_path, monkeypatch):
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda *a, **k: pytest.fail("must not download"))
    monkeypatch.setattr(huggingface_hub, "get_hf_file_metadata", lambda *a, **k: pytest.fail("must not ask the hub"))
    local = tmp_path / "hh-rlhf" / "harmless-base" / "train.jsonl.gz"
    local.parent.mkdir(parents=True)
    local.write_bytes(b"x")
    assert dataset_file("hh", "harmless-base", "train", data_dir=tmp_path / "hh-rlhf") == local
    assert dataset_file("hh", "harmless-base", "train", data_dir=tmp_path) == local
    assert missing_dataset_files([("hh", "harmless-base", "train")], data_dir=tmp_path) == []


def test_file_in_the_hub_cache_is_used_offline(tmp_path, offline):
    # The HF cache's layout, written by hand: a ref naming a commit, and the file under that commit's snapshot.
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "cache" / "datasets--PKU-Alignment--PKU-SafeRLHF"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    cached = repo / "snapshots" / commit / "data" / "Alpaca-7B" / "test.jsonl"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"y")
    assert dataset_file("pku", "Alpaca-7B", "test", cache_dir=tmp_path / "cache") == cached
    assert missing_dataset_files([("pku", "Alpaca-7B", "test")], cache_dir=tmp_path / "cache") == []


def test_download_lands_in_cache_and_is_checked(tmp_path, fake_hub):
    fake_hub.content = b"fresh data"
    cache = tmp_path / "cache"
    # No known checksum for the train file: used as served.
    path = dataset_file("hh", "helpful-base", "train", cache_dir=cache)
    assert path == fake_hub.root / "snapshots" / "Anthropic/hh-rlhf" / "helpful-base" / "train.jsonl.gz"
    assert path.read_bytes() == b"fresh data"
    assert fake_hub.calls == [{"repo_id": "Anthropic/hh-rlhf", "filename": "helpful-base/train.jsonl.gz",
                               "repo_type": "dataset", "revision": "main", "cache_dir": cache,
                               "local_files_only": False}]
    # The helpful-base test file has a known sha256: wrong bytes are refused, and taken out of the cache (the
    # link and its blob) so that the next run downloads them again.
    with pytest.raises(DataError) as raised:
        dataset_file("hh", "helpful-base", "test", cache_dir=cache)
    message = str(raised.value)
    assert "Anthropic/hh-rlhf/helpful-base/test.jsonl.gz" in message
    assert HELPFUL_TEST_SHA256 in message and "expected 875191 bytes" in message
    assert hashlib.sha256(b"fresh data").hexdigest() in message and "has 10 bytes" in message
    assert sorted(p.name for p in (fake_hub.root / "snapshots" / "Anthropic/hh-rlhf" / "helpful-base").iterdir()) \
        == ["train.jsonl.gz"]
    assert sorted(p.name for p in (fake_hub.root / "blobs").iterdir()) == ["1"]


def test_download_of_the_real_bytes_passes_the_check(tmp_path, fake_hub):
    real = real_file("hh-rlhf/harmless-base/test.jsonl.gz").read_bytes()
    fake_hub.content = real
    path = dataset_file("hh", "harmless-base", "test", cache_dir=tmp_path)
    assert path.read_bytes() == real


def test_missing_dataset_files_names_every_missing_file_at_once(tmp_path, offline):
    # Offline with an empty cache, the real hub client: the two files not in data_dir are both named, each on its
    # own line with its hub file and the path where it would be found.
    data_dir = tmp_path / "data"
    present = data_dir / "hh-rlhf" / "harmless-base" / "test.jsonl.gz"
    present.parent.mkdir(parents=True)
    present.write_bytes(b"x")
    requests = [("hh", "helpful-base", "train"), ("hh", "harmless-base", "test"), ("hh", "helpful-base", "test")]
    missing = missing_dataset_files(requests, data_dir=data_dir, cache_dir=tmp_path / "cache")
    assert len(missing) == 2 and all("\n" not in line for line in missing)
    assert HELPFUL_TEST_URL.replace("test.jsonl.gz", "train.jsonl.gz") in missing[0]
    assert str(data_dir / "hh-rlhf" / "helpful-base" / "train.jsonl.gz") in missing[0]
    assert HELPFUL_TEST_URL in missing[1]
    assert str(data_dir / "hh-rlhf" / "helpful-base" / "test.jsonl.gz") in missing[1]


def test_missing_dataset_files_downloads_nothing(tmp_path, monkeypatch, offline, reachable):
    # Online (faked): uncached files are looked up, never downloaded; one the hub answers for is not missing.
    def cache_only(repo_id, filename, local_files_only=False, **kwargs):
        if not local_files_only:
            pytest.fail("must not download")
        raise LocalEntryNotFoundError("not in the cache (test)")
    asked = []

    def metadata(url, **kwargs):
        asked.append(url)
        if url == HELPFUL_TEST_URL:
            raise huggingface_hub.errors.HTTPError("connection reset (test)")   # not an OSError from hub 1.0 on
        return object()
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", cache_only)
    monkeypatch.setattr(huggingface_hub, "get_hf_file_metadata", metadata)
    missing = missing_dataset_files([("hh", "helpful-base", "train"), ("hh", "helpful-base", "test")],
                                    cache_dir=tmp_path / "cache")
    assert asked == [HELPFUL_TEST_URL.replace("test.jsonl.gz", "train.jsonl.gz"), HELPFUL_TEST_URL]
    assert len(missing) == 1 and "helpful-base/test.jsonl.gz" in missing[0]
    assert "connection reset (test)" in missing[0]


# ---------------------------------------------------------------------------------------------------------
# Splits

def numbered(n, duplicates=0):
    """n examples with distinct prompts "q0".."q{n-1}", plus `duplicates` more repeating prompt "q0"."""
    return ([Example([user(f"q{i}")], f"a{i}", f"b{i}", f"f:{i + 1}") for i in range(n)]
            + [Example([user("q0")], f"dup{j}", "x", f"f:{n + j + 1}") for j in range(duplicates)])


def prompts(split):
    return [e.prompt[0]["content"] for e in split]


def test_paper_splits_sizes_disjoint_deterministic():
    examples = numbered(100, duplicates=5)
    init, w2s, test = paper_splits(examples, 30, 40, 20, seed=0)
    assert (len(init), len(w2s), len(test)) == (30, 40, 20)
    all_prompts = prompts(init) + prompts(w2s) + prompts(test)
    assert len(set(all_prompts)) == 90, "no prompt in two splits, nor twice in one"
    assert not any(e.chosen.startswith("dup") for e in init + w2s + test), "first example of a prompt is kept"
    assert (init, w2s, test) == paper_splits(examples, 30, 40, 20, seed=0)
    assert prompts(paper_splits(examples, 30, 40, 20, seed=1)[0]) != prompts(init)
    # 100 distinct prompts: all of them fit, and the splits use each one once.
    everything = paper_splits(examples, 50, 25, 25, seed=3)
    assert sorted(sum(map(prompts, everything), [])) == sorted(f"q{i}" for i in range(100))


def test_paper_splits_too_small_names_the_flags():
    with pytest.raises(DataError) as error:
        paper_splits(numbered(10, duplicates=3), 5, 5, 1)
    message = str(error.value)
    assert "10 distinct prompts" in message and "13 records" in message
    for flag in ("--n_init", "--n_w2s", "--n_test"):
        assert flag in message


def test_splits_with_test_file():
    train = numbered(50)
    test = [Example([user(f"t{i}")], "c", "r", f"t:{i + 1}") for i in range(5)]
    init, w2s, _ = paper_splits(train, 10, 10, 0, seed=0)
    taken = init[0]      # a test prompt that is also a training prompt is left out of the test split
    test.insert(1, Example(taken.prompt, "c", "r", "t:leak"))
    init2, w2s2, test_split = splits_with_test_file(train, test, 10, 10, 3, seed=0)
    assert (init2, w2s2) == (init, w2s)
    assert prompts(test_split) == ["t0", "t1", "t2"]
    with pytest.raises(DataError, match="--n_test"):
        splits_with_test_file(train, test, 10, 10, 6)


# ---------------------------------------------------------------------------------------------------------
# Prompt rendering

CONVERSATION = [user("Hi"), assistant("Hello! How can I help?"), user("Tell me a joke.")]


def test_render_prompt_templates():
    assert render_prompt(CONVERSATION, "vicuna") == (
        "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
        "detailed, and polite answers to the user's questions. USER: Hi ASSISTANT: Hello! How can I help? "
        "USER: Tell me a joke. ASSISTANT:")
    assert render_prompt(CONVERSATION, "vicuna", system="") == (
        "USER: Hi ASSISTANT: Hello! How can I help? USER: Tell me a joke. ASSISTANT:")
    assert render_prompt(CONVERSATION, "alpaca") == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.\n\n### Instruction:\nHi\n\n### Response:\nHello! How can I help?\n\n"
        "### Instruction:\nTell me a joke.\n\n### Response:\n")
    assert render_prompt(CONVERSATION, "hh") == (
        "\n\nHuman: Hi\n\nAssistant: Hello! How can I help?\n\nHuman: Tell me a joke.\n\nAssistant:")
    with pytest.raises(DataError):
        render_prompt(CONVERSATION[:2], "vicuna")
    with pytest.raises(DataError, match="vicuna"):
        render_prompt(CONVERSATION, "llama9")


# ---------------------------------------------------------------------------------------------------------
# encode / collate with a tiny word-level tokenizer built here: BOS added by its post-processor.

WORDS = "<pad> <s> </s> <unk> USER: ASSISTANT: hi there how are you fine thanks".split()
PAD, BOS, EOS, UNK, USER, ASSIST, HI, THERE, HOW, ARE, YOU, FINE, THANKS = range(13)


@pytest.fixture(scope="module")
def tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", BOS)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


PROMPT = "USER: hi there how are you ASSISTANT:"     # BOS + 7 tokens


def test_encode_masks_response_and_eos(tokenizer):
    ids, mask = encode(tokenizer, PROMPT, "fine thanks", max_length=64)
    assert ids == [BOS, USER, HI, THERE, HOW, ARE, YOU, ASSIST, FINE, THANKS, EOS]
    assert mask == [0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1]


def test_encode_truncation_keeps_prompt_end_and_bos_then_cuts_response(tokenizer):
    # 8 prompt + 3 response tokens > 7: the prompt keeps BOS and its last 3 tokens; the response fits whole.
    ids, mask = encode(tokenizer, PROMPT, "fine thanks", max_length=7, max_prompt_length=4)
    assert ids == [BOS, ARE, YOU, ASSIST, FINE, THANKS, EOS]
    assert mask == [0, 0, 0, 0, 1, 1, 1]
    # One token less: the response is cut and loses its EOS.
    ids, mask = encode(tokenizer, PROMPT, "fine thanks", max_length=6, max_prompt_length=4)
    assert ids == [BOS, ARE, YOU, ASSIST, FINE, THANKS]
    assert mask == [0, 0, 0, 0, 1, 1]
    # Default max_prompt_length = max_length // 2 = 3: BOS + the last 2 prompt tokens.
    ids, mask = encode(tokenizer, PROMPT, "fine thanks fine thanks", max_length=6)
    assert ids == [BOS, YOU, ASSIST, FINE, THANKS, FINE]
    assert mask == [0, 0, 0, 1, 1, 1]
    with pytest.raises(DataError, match="--max_prompt_length"):
        encode(tokenizer, PROMPT, "fine thanks", max_length=6, max_prompt_length=6)


def test_encode_many_gives_each_pair_its_hand_written_ids(tokenizer):
    """Several pairs in one call, one of them cut and one with an empty response, against the ids written out
    by hand; lengths that do not match are refused."""
    got = encode_many(tokenizer, [PROMPT, "USER: hi ASSISTANT:", "USER: how are you ASSISTANT:"],
                      ["fine thanks", "", "fine thanks fine thanks"], max_length=8, max_prompt_length=4)
    assert got == [([BOS, ARE, YOU, ASSIST, FINE, THANKS, EOS], [0, 0, 0, 0, 1, 1, 1]),        # prompt cut to 4
                   ([BOS, USER, HI, ASSIST, EOS], [0, 0, 0, 0, 1]),                               # EOS alone
                   ([BOS, ARE, YOU, ASSIST, FINE, THANKS, FINE, THANKS], [0] * 4 + [1] * 4)]    # both cut
    assert encode_many(tokenizer, [], [], max_length=8) == []
    with pytest.raises(ValueError, match="2 prompts but 1 responses"):
        encode_many(tokenizer, [PROMPT, PROMPT], ["fine"], max_length=8)


def test_truncate_prompt_keeps_bos_and_the_end():
    assert truncate_prompt([BOS, USER, HI, THERE, ASSIST], 3, BOS) == [BOS, THERE, ASSIST]
    assert truncate_prompt([USER, HI, THERE, ASSIST], 3, BOS) == [HI, THERE, ASSIST]        # no BOS to keep
    assert truncate_prompt([BOS, USER, HI, THERE, ASSIST], 3, None) == [HI, THERE, ASSIST]  # tokenizer without BOS
    assert truncate_prompt([BOS, USER, ASSIST], 3, BOS) == [BOS, USER, ASSIST]              # short enough: unchanged


def test_collate_of_pairs_layout_and_padding(tokenizer):
    chosen = [encode(tokenizer, "USER: hi ASSISTANT:", "fine thanks", 64),         # 4 + 3 = 7 tokens
              encode(tokenizer, "USER: how are you ASSISTANT:", "fine", 64)]       # 6 + 2 = 8 tokens
    rejected = [encode(tokenizer, "USER: hi ASSISTANT:", "thanks", 64),            # 4 + 2 = 6 tokens
                encode(tokenizer, "USER: how are you ASSISTANT:", "there", 64)]    # 6 + 2 = 8 tokens
    batch = collate(chosen + rejected, pad_id=PAD)        # chosen rows first: rows i and B + i are a pair
    assert batch["input_ids"].shape == (4, 8)
    assert batch["input_ids"].tolist() == [
        [BOS, USER, HI, ASSIST, FINE, THANKS, EOS, PAD],
        [BOS, USER, HOW, ARE, YOU, ASSIST, FINE, EOS],
        [BOS, USER, HI, ASSIST, THANKS, EOS, PAD, PAD],
        [BOS, USER, HOW, ARE, YOU, ASSIST, THERE, EOS],
    ]
    assert batch["attention_mask"].tolist() == [
        [1, 1, 1, 1, 1, 1, 1, 0],
        [1, 1, 1, 1, 1, 1, 1, 1],
        [1, 1, 1, 1, 1, 1, 0, 0],
        [1, 1, 1, 1, 1, 1, 1, 1],
    ]
    assert batch["loss_mask"].tolist() == [
        [0, 0, 0, 0, 1, 1, 1, 0],
        [0, 0, 0, 0, 0, 0, 1, 1],
        [0, 0, 0, 0, 1, 1, 0, 0],
        [0, 0, 0, 0, 0, 0, 1, 1],
    ]
    assert all(t.dtype == torch.long for t in batch.values())
    # collate alone: one row, no padding.
    single = collate(chosen[:1], pad_id=PAD)
    assert single["input_ids"].tolist() == [[BOS, USER, HI, ASSIST, FINE, THANKS, EOS]]
