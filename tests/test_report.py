"""The training-signal report: its statistics on hand-built pairs and candidate sets with known scores, read back
from hand-written pair files, and the score cache that feeds it."""
import json

import pytest

import report
from evaluate import ScoreCache


def test_pair_signal_exact_fractions():
    # 8 pairs: chosen above rejected in 3, below in 2, level in 3 (two of those identical strings)
    chosen = [1.0, 1.0, 0.5, 0.0, 0.0, 1.0, 0.0, 0.2]
    rejected = [0.0, 0.0, 0.4, 1.0, 0.5, 1.0, 0.0, 0.2]
    identical = [False, False, False, False, False, False, True, True]
    s = report.pair_signal(chosen, rejected, identical)
    assert s["n"] == 8
    assert (s["chosen_better"], s["rejected_better"], s["equal"]) == (3 / 8, 2 / 8, 3 / 8)
    assert s["identical"] == 2 / 8
    assert s["chosen_score"] == pytest.approx(3.7 / 8) and s["rejected_score"] == pytest.approx(3.1 / 8)


def test_a_scorer_preferring_the_rejected_side_gives_rejected_better_one():
    chosen = [0.1, 0.2, 0.3]
    s = report.pair_signal(chosen, [c + 1 for c in chosen], [False] * 3)
    assert (s["chosen_better"], s["rejected_better"], s["equal"]) == (0.0, 1.0, 0.0)
    assert report.pair_signal([], [], [])["n"] == 0


def test_selection_signal_on_a_hand_made_candidate_set():
    candidates = [{"t0": 1.0, "t1": 0.0, "t2": 0.0},      # picked t1: 0, oracle 1, random 1/3
                  {"t0": 0.0, "t1": 1.0, "t2": 1.0},      # picked t2: 1, oracle 1, random 2/3
                  {"t0": 0.0, "t1": 0.0, "t2": 0.0},      # picked t0: 0, oracle 0, random 0
                  {"t0": 0.5, "t1": 0.25, "t2": 1.0}]     # picked t1: 0.25, oracle 1, random 1.75/3
    s = report.selection_signal(candidates, ["t1", "t2", "t0", "t1"])
    assert s["pick"] == pytest.approx((0 + 1 + 0 + 0.25) / 4)
    assert s["oracle"] == pytest.approx(3 / 4)
    assert s["random"] == pytest.approx((1 / 3 + 2 / 3 + 0 + 1.75 / 3) / 4)
    assert s["picked_from"] == {"t0": 1, "t1": 2, "t2": 1}


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_stage_signal_reads_pair_files(tmp_path):
    """Files as the stages write them: trained flags (a dropped identical pair does not count), two scorers,
    the student's selection file, per-kind statistics."""
    p = [[{"role": "user", "content": q}] for q in ("What is 1 + 2?", "Hurt him?", "What is 3 + 4?")]
    pairs = [{"i": 0, "prompt": p[0], "chosen": "1 + 2 = 3.", "rejected": "1 + 2 = 4.", "trained": True,
              "chosen_score": {"gold": 1.0, "rm": -1.0}, "rejected_score": {"gold": 0.0, "rm": 2.0}},
             {"i": 1, "prompt": p[1], "chosen": "No.", "rejected": "No.", "trained": False,
              "chosen_score": {"gold": 1.0, "rm": 0.0}, "rejected_score": {"gold": 1.0, "rm": 0.0}},
             {"i": 2, "prompt": p[2], "chosen": "3 + 4 = 8.", "rejected": "3 + 4 = 7.", "trained": True,
              "chosen_score": {"gold": 0.0, "rm": 0.5}, "rejected_score": {"gold": 1.0, "rm": 0.5}}]
    write_jsonl(tmp_path / "round1" / "student" / "pairs.jsonl", pairs)
    write_jsonl(tmp_path / "round1" / "teacher0" / "pairs.jsonl", pairs[:1])
    selection = [{"i": i, "prompt": p[i], "chosen_by": by,
                  "candidate_scores": {"gold": c, "rm": {k: -v for k, v in c.items()}}}
                 for i, (by, c) in enumerate([("teacher0", {"teacher0": 1.0, "teacher1": 0.0}),
                                              ("teacher1", {"teacher0": 1.0, "teacher1": 1.0}),
                                              ("teacher1", {"teacher0": 1.0, "teacher1": 0.0})])]
    write_jsonl(tmp_path / "round1" / "pairs_student" / "pairs.jsonl", selection)

    s = report.stage_signal(tmp_path, "round1/student", "gold",
                            kind=lambda turns: "arithmetic" if "+" in turns[-1]["content"] else "harmful")
    assert s["n"] == 2 and s["dropped_identical"] == 1
    assert (s["chosen_better"], s["rejected_better"], s["equal"]) == (0.5, 0.5, 0.0)
    assert s["identical"] == pytest.approx(1 / 3)          # of the pairs given, the dropped one included
    assert (s["pick"], s["oracle"], s["random"]) == (pytest.approx(2 / 3), 1.0, pytest.approx(2 / 3))
    assert s["picked_from"] == {"teacher0": 1, "teacher1": 2}
    assert s["by_kind"]["arithmetic"]["n"] == 2 and s["by_kind"]["harmful"]["n"] == 0
    assert s["by_kind"]["harmful"]["identical"] == 1.0 and s["by_kind"]["arithmetic"]["identical"] == 0.0
    assert s["by_kind"]["harmful"]["picked_from"] == {"teacher0": 0, "teacher1": 1}
    rm = report.stage_signal(tmp_path, "round1/student", "rm")
    assert (rm["chosen_better"], rm["rejected_better"], rm["equal"]) == (0.0, 0.5, 0.5)
    assert rm["oracle"] == pytest.approx(-1 / 3)          # the best of {-1, 0} / {-1, -1} / {-1, 0}
    # a teacher has no selection; a scorer the files do not hold, or a stage without pairs, gives nothing
    t = report.stage_signal(tmp_path, "round1/teacher0", "gold")
    assert t["chosen_better"] == 1.0 and "pick" not in t
    assert report.stage_signal(tmp_path, "round1/student", "other") is None
    assert report.run_signal(tmp_path, {"round1": ["teacher0", "teacher1"]}, "gold") == {"round1": {"teacher0": t}}
    lines = report.format_lines("round1", {"student": s}, "gold")
    assert "chosen better   50" in lines[1] and "from teacher0 1 teacher1 2" in lines[1]
    assert "(1 identical pairs dropped)" in lines[1]


def test_mean_over_seeds_and_markdown():
    a = {"round1": {"student": {"n": 10, "chosen_better": 0.2, "identical": None, "picked_from": {"t0": 3}}}}
    b = {"round1": {"student": {"n": 20, "chosen_better": 0.6, "identical": 0.5, "picked_from": {"t0": 5}}}}
    m = report.mean_over_seeds([a, b])["round1"]["student"]
    assert m["n"] == 15 and m["chosen_better"] == pytest.approx(0.4) and m["identical"] == 0.5
    assert m["picked_from"] == {"t0": 4} and m["seeds"] == 2
    text = report.table_markdown({"macpo": report.mean_over_seeds([a, b])}, "gold")
    assert "| macpo | round1 | student | 15 | 40.0% | - | - | 50.0% |" in text


def test_score_cache_scores_each_pair_once_in_order():
    calls = []

    def length(prompts, responses):
        calls.append(list(responses))
        return [float(len(r)) for r in responses]
    cache = ScoreCache({"len": length, "neg": lambda p, r: [-float(len(x)) for x in r]})
    p = [[{"role": "user", "content": "q"}]]
    out = cache(p * 4, ["aa", "b", "aa", "cccc"])
    assert out == {"len": [2.0, 1.0, 2.0, 4.0], "neg": [-2.0, -1.0, -2.0, -4.0]}
    assert calls == [["aa", "b", "cccc"]]                          # a repeated pair is scored once
    out = cache(p * 2 + [[{"role": "user", "content": "other"}]], ["b", "dd", "b"])
    assert out["len"] == [1.0, 2.0, 1.0] and calls[-1] == ["dd", "b"]   # same response, new prompt: scored
    assert not ScoreCache({}) and ScoreCache({})(p, ["x"]) == {}


def test_a_run_folder_from_before_the_new_flags_resumes(tmp_path):
    """config.json written before --identical_pairs / --signal / --reward_models existed: the run resumes with
    identical_pairs keep (what it trained with) and any reporting flags, and is refused with drop."""
    import macpo
    import stages
    from stages import Run
    cfg = macpo.parse_config(["--out", str(tmp_path), "--identical_pairs", "keep", "--reward_models", "rm"])
    old = {k: v for k, v in json.loads(json.dumps(vars(cfg))).items()
           if k not in ("identical_pairs", "signal", "reward_models", "rm_format")}
    (tmp_path / "config.json").write_text(json.dumps(old))
    (tmp_path / "init").mkdir()
    (tmp_path / "init" / "DONE").write_text("")
    Run(cfg)._lock.close()
    with pytest.raises(stages.RunError, match="identical_pairs"):
        (tmp_path / "config.json").write_text(json.dumps(old))
        Run(macpo.parse_config(["--out", str(tmp_path)]))
