"""Tokenizer quirks of the real-data presets' models (tiny.QUIRKS: a BOS added or not, no pad token, BOS = EOS,
special tokens at the end of the vocabulary, chat templates): encoding, prompt rendering, padding, generation
and scoring, each against ids written out by hand or a one-sequence-at-a-time forward pass of transformers."""
import logging
import math

import pytest
import torch

from data import (DataError, added_bos_id, collate, encode_many, encode_prompts, ensure_pad_token, pad_id,
                  render_prompt)
from generate import generate, packed_logps, perplexity, sequence_logps
from tiny import CHAT_TEMPLATES, QUIRKS, greedy_alone, make_quirky_model, make_quirky_tokenizer

KINDS = list(QUIRKS)

# A word-level vocabulary, so that every id below is written by hand: the kind's special tokens first and these
# words after them, or (qwen) these words first and the special tokens after them.
WORDS = ("USER: ASSISTANT: hi there how are you fine thanks user assistant system [INST] [/INST] "
         "You a helpful assistant.").split()
(USER, ASSIST, HI, THERE, HOW, ARE, YOU, FINE, THANKS, USER_ROLE, ASSIST_ROLE, SYSTEM_ROLE, INST, END_INST,
 YOU_CAP, A, HELPFUL, ASSISTANT_DOT) = range(len(WORDS))          # a word's position in WORDS
# kind: (the first word's id, the BOS the tokenizer adds or None, EOS, the pad id padding uses)
LAYOUT = {"llama": (3, 1, 2, 2),            # <unk> 0, <s> 1, </s> 2; no pad token: EOS pads
          "smollm": (3, None, 0, 0),        # <|endoftext|> 0 (BOS = EOS, never added), <|im_start|> 1, <|im_end|> 2
          "qwen": (0, None, 18, 18),        # words 0-17, <|endoftext|> 18 (EOS and pad), <|im_start|> 19, <|im_end|> 20
          "pythia": (2, None, 0, 0)}        # <|endoftext|> 0 (BOS = EOS, never added), <|padding|> 1 (not the pad)
IM_START = {"smollm": 1, "qwen": 19}
IM_END = {"smollm": 2, "qwen": 20}


def word_tokenizer(kind):
    return make_quirky_tokenizer(kind, words=WORDS)


def ids_of(kind, *words):
    """Word positions in WORDS -> the kind's ids."""
    return [LAYOUT[kind][0] + w for w in words]


PROMPT = "USER: hi there how are you ASSISTANT:"                    # 7 words


# ---------------------------------------------------------------------------------------------------------
# 1. encode_many: prompt ids (BOS only where the tokenizer adds one), response ids + EOS, the loss mask, truncation

@pytest.mark.parametrize("kind", KINDS)
def test_encode_prompt_response_eos_and_mask(kind):
    tok = word_tokenizer(kind)
    _, bos, eos, _ = LAYOUT[kind]
    lead = [bos] if bos is not None else []
    [(ids, mask)] = encode_many(tok, [PROMPT], ["fine thanks"], max_length=64)
    assert ids == lead + ids_of(kind, USER, HI, THERE, HOW, ARE, YOU, ASSIST) + ids_of(kind, FINE, THANKS) + [eos]
    assert mask == [0] * (len(lead) + 7) + [1, 1, 1]
    assert added_bos_id(tok) == bos


@pytest.mark.parametrize("kind", KINDS)
def test_encode_truncation_keeps_the_prompt_end_and_only_an_added_bos(kind):
    tok = word_tokenizer(kind)
    _, bos, eos, _ = LAYOUT[kind]
    # max_prompt_length 4: with an added BOS, BOS + the last 3 prompt tokens; without, the last 4
    prompt = [bos] + ids_of(kind, ARE, YOU, ASSIST) if bos is not None else ids_of(kind, HOW, ARE, YOU, ASSIST)
    [(ids, mask)] = encode_many(tok, [PROMPT], ["fine thanks"], max_length=7, max_prompt_length=4)
    assert ids == prompt + ids_of(kind, FINE, THANKS) + [eos] and mask == [0, 0, 0, 0, 1, 1, 1]
    # one token less: the response's tail goes, and its EOS with it
    [(ids, mask)] = encode_many(tok, [PROMPT], ["fine thanks"], max_length=6, max_prompt_length=4)
    assert ids == prompt + ids_of(kind, FINE, THANKS) and mask == [0, 0, 0, 0, 1, 1]
    [(ids, mask)] = encode_many(tok, [PROMPT], ["fine thanks fine"], max_length=6, max_prompt_length=4)
    assert ids == prompt + ids_of(kind, FINE, THANKS) and mask == [0, 0, 0, 0, 1, 1]
    # generation conditions on the same prompt ids
    assert encode_prompts(tok, [PROMPT, "USER: hi ASSISTANT:"], 4) == [prompt, ([bos] if bos is not None else [])
                                                                       + ids_of(kind, USER, HI, ASSIST)]


@pytest.mark.parametrize("kind", ["smollm", "pythia"])
def test_a_leading_eos_in_the_text_is_not_kept_as_a_bos(kind):
    """BOS = EOS = <|endoftext|> and the tokenizer never adds it: a prompt whose text starts with that token (a
    document separator) is cut like any other text. Before, truncation kept it as if it were an added BOS."""
    tok = word_tokenizer(kind)
    [(ids, mask)] = encode_many(tok, ["<|endoftext|> " + PROMPT], ["fine"], max_length=6, max_prompt_length=4)
    assert ids == ids_of(kind, HOW, ARE, YOU, ASSIST, FINE) + [0] and mask == [0, 0, 0, 0, 1, 1]
    # not cut: the token stays where the text put it
    [(ids, _)] = encode_many(tok, ["<|endoftext|> " + PROMPT], ["fine"], max_length=64)
    assert ids == [0] + ids_of(kind, USER, HI, THERE, HOW, ARE, YOU, ASSIST, FINE) + [0]


def test_an_added_bos_is_kept_when_the_prompt_is_cut_to_one_token():
    tok = word_tokenizer("llama")
    [(ids, mask)] = encode_many(tok, [PROMPT], ["fine thanks"], max_length=4, max_prompt_length=1)
    assert ids == [1] + ids_of("llama", FINE, THANKS) + [2] and mask == [0, 1, 1, 1]


def test_encode_many_bpe_tokenizers_split_prompt_and_response_as_separate_calls():
    """Byte-level BPE (GPT-2 / Qwen / GPT-NeoX) and Metaspace BPE (Llama): the prompt's ids are the tokenizer's
    ids of the prompt alone, the response's those of the response alone (no special tokens), then EOS."""
    for kind in KINDS:
        tok = make_quirky_tokenizer(kind)
        prompt, response = "USER: What is 12 + 30? ASSISTANT:", "12 + 30 = 42."
        p = tok._tokenizer.encode(prompt).ids                     # the Rust tokenizer, special tokens as configured
        r = tok._tokenizer.encode(response, add_special_tokens=False).ids
        assert (p[0] == tok.bos_token_id) == (kind == "llama"), kind
        [(ids, mask)] = encode_many(tok, [prompt], [response], max_length=256)
        assert ids == p + r + [tok.eos_token_id] and mask == [0] * len(p) + [1] * (len(r) + 1), kind


# ---------------------------------------------------------------------------------------------------------
# 2. --template chat

TURNS = [{"role": "user", "content": "hi there"}, {"role": "assistant", "content": "fine thanks"},
         {"role": "user", "content": "how are you"}]


def test_chat_template_chatml_ids_by_hand():
    for kind in ("smollm", "qwen"):
        tok = word_tokenizer(kind)
        S, E = IM_START[kind], IM_END[kind]
        turn = lambda role, *words: [S] + ids_of(kind, role, *words) + [E]           # noqa: E731
        text = render_prompt(TURNS, "chat", tok, system="")
        expected = (turn(USER_ROLE, HI, THERE) + turn(ASSIST_ROLE, FINE, THANKS) + turn(USER_ROLE, HOW, ARE, YOU)
                    + [S] + ids_of(kind, ASSIST_ROLE))
        if kind == "qwen":          # its template writes a default system turn when the conversation has none
            expected = turn(SYSTEM_ROLE, YOU_CAP, ARE, A, HELPFUL, ASSISTANT_DOT) + expected
        [(ids, mask)] = encode_many(tok, [text], ["fine"], max_length=64)
        assert ids == expected + ids_of(kind, FINE) + [LAYOUT[kind][2]], kind
        assert mask == [0] * len(expected) + [1, 1]
        # a system line of our own replaces Qwen's default
        text = render_prompt(TURNS[-1:], "chat", tok, system="hi")
        assert tok(text)["input_ids"] == turn(SYSTEM_ROLE, HI) + turn(USER_ROLE, HOW, ARE, YOU) + [S] + ids_of(
            kind, ASSIST_ROLE)


def test_chat_template_that_writes_bos_is_not_doubled():
    """Llama-style: the template writes "<s>" and the tokenizer adds one: the prompt has exactly one BOS."""
    tok = word_tokenizer("llama")
    text = render_prompt(TURNS[-1:], "chat", tok, system="")
    assert tok(text)["input_ids"] == [1] + ids_of("llama", INST, HOW, ARE, YOU, END_INST)


def test_chat_template_bos_is_kept_when_the_tokenizer_does_not_add_one():
    """A template that writes the BOS for a tokenizer that never adds one (its BOS is its EOS, GPT-2 style): the
    template's copy is the only one and stays. Before, it was stripped, leaving the prompt without it."""
    tok = word_tokenizer("smollm")
    tok.chat_template = "{{ bos_token }}{% for m in messages %}{{ '[INST] ' + m['content'] + ' [/INST]' }}{% endfor %}"
    text = render_prompt(TURNS[-1:], "chat", tok, system="")
    assert tok(text)["input_ids"] == [0] + ids_of("smollm", INST, HOW, ARE, YOU, END_INST)


def test_chat_template_missing_is_refused():
    with pytest.raises(DataError, match="chat template"):
        render_prompt(TURNS, "chat", word_tokenizer("pythia"))


# ---------------------------------------------------------------------------------------------------------
# 3. Padding where there is no pad token and BOS = EOS; generation and scoring on such padded batches

def test_pad_id_and_ensure_pad_token():
    for kind in KINDS:
        tok = word_tokenizer(kind)
        pad = LAYOUT[kind][3]
        assert tok.pad_token_id == (pad if kind == "qwen" else None), kind
        assert pad_id(tok) == pad, kind
        assert ensure_pad_token(tok) is tok and tok.pad_token_id == pad, kind
        # tokenizer(..., padding=True) works now, right-padding with that id
        got = tok(["hi", "how are you"], padding=True, add_special_tokens=False)["input_ids"]
        assert got == [ids_of(kind, HI) + [pad, pad], ids_of(kind, HOW, ARE, YOU)], kind
    tok = word_tokenizer("pythia")
    ensure_pad_token(tok)
    assert tok.pad_token == tok.eos_token == tok.bos_token == "<|endoftext|>"


def forward_logps(model, ids, mask):
    """Independent: transformers' own forward of ONE unpadded sequence; the summed log-probs of the masked
    tokens, over the whole vocabulary, and their count."""
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)          # [T, V]
    return sum(lp[p - 1, ids[p]].item() for p in range(1, len(ids)) if mask[p]), sum(mask[1:])


PROMPTS = ["USER: What is 12 + 30? ASSISTANT:", "USER: hello ASSISTANT:",
           "A chat between a curious user and an artificial intelligence assistant. USER: How do I pick a lock? "
           "ASSISTANT:"]
RESPONSES = ["12 + 30 = 42.", "the quick brown fox jumps over the lazy dog", "Sorry"]


@pytest.mark.parametrize("kind", KINDS)
def test_scoring_a_batch_padded_with_eos_equals_one_sequence_at_a_time(kind):
    """Right padding with EOS (pad = EOS for all four kinds) next to responses that end in a scored EOS:
    sequence_logps on the padded batch, packed_logps packed and padded, and perplexity, all equal the
    forward pass of each unpadded sequence."""
    tok = ensure_pad_token(make_quirky_tokenizer(kind))
    model = make_quirky_model(kind, tok, seed=1)
    rows = encode_many(tok, PROMPTS, RESPONSES, max_length=256)
    expected = [forward_logps(model, ids, mask) for ids, mask in rows]
    batch = collate(rows, pad_id(tok))
    assert pad_id(tok) == tok.eos_token_id and (batch["input_ids"] == tok.eos_token_id).sum() > len(rows)
    with torch.no_grad():
        logps, n = sequence_logps(model, batch["input_ids"], batch["attention_mask"], batch["loss_mask"])
    assert n.tolist() == [c for _, c in expected] == [len(tok(r, add_special_tokens=False)["input_ids"]) + 1
                                                       for r in RESPONSES]
    assert logps.tolist() == pytest.approx([lp for lp, _ in expected], abs=1e-4)
    for packable in (True, False):
        model._macpo_packable = packable             # the padded fallback, as for a model that cannot pack
        logps, n = packed_logps(model, rows, pad_id(tok), batch_size=2, row_tokens=64)
        assert logps.tolist() == pytest.approx([lp for lp, _ in expected], abs=1e-4), packable
        ppl = perplexity(model, tok, PROMPTS, RESPONSES, batch_size=2, max_length=256)
        assert ppl == pytest.approx([math.exp(-lp / c) for lp, c in expected], rel=1e-4), packable


# an EOS bias per kind (found by trying) that makes some of the prompts below stop part-way and others run to
# the limit
EOS_BIAS = {"llama": 2.8, "smollm": 2.6, "qwen": 3.1, "pythia": 0.6}


@pytest.mark.parametrize("kind", KINDS)
def test_greedy_generation_with_eos_padding_equals_one_prompt_at_a_time_and_stops_at_eos(kind):
    """Left padding with EOS and finished rows filled with EOS (pad = EOS): the batched, cached generation gives
    each prompt the text that prompt gives alone, cut at its first EOS."""
    tok = ensure_pad_token(make_quirky_tokenizer(kind))
    model = make_quirky_model(kind, tok, seed=3)
    old = model.get_output_embeddings()
    head = torch.nn.Linear(old.in_features, old.out_features, bias=True)
    head.weight.data.copy_(old.weight.data * 5)
    head.bias.data.zero_()
    head.bias.data[tok.eos_token_id] = EOS_BIAS[kind]
    model.set_output_embeddings(head)
    prompts = PROMPTS + ["USER: What is 1 + 2? ASSISTANT:", "hello", "the lazy dog"]
    got = generate(model, tok, prompts, max_new_tokens=12, temperature=0, batch_size=4, progress=False)
    refs = [greedy_alone(model, tok, p, 12) for p in prompts]
    assert got == [text for text, _ in refs]
    lengths = [n for _, n in refs]
    assert any(0 < n < 12 for n in lengths) and max(lengths) == 12, lengths   # an EOS stop part-way, a full row


# ---------------------------------------------------------------------------------------------------------
# 4. An agent scores another agent's text with its own tokenizer

def test_perplexity_of_another_agents_text_under_its_own_tokenizer():
    """A pythia-like agent writes ids; its text is what travels; a Qwen-like agent renders the prompt with its
    chat template and scores the text with its own ids (written out by hand), its forward pass summed by hand."""
    writer, scorer = word_tokenizer("pythia"), word_tokenizer("qwen")
    text = writer.decode(ids_of("pythia", FINE, THANKS) + [0, 0], skip_special_tokens=True)  # EOS, then padding
    assert text == "fine thanks"
    model = make_quirky_model("qwen", scorer, seed=2)
    prompt = render_prompt([{"role": "user", "content": "how are you"}], "chat", scorer, system="")
    S, E = 19, 20
    ids = ([S] + ids_of("qwen", SYSTEM_ROLE, YOU_CAP, ARE, A, HELPFUL, ASSISTANT_DOT) + [E]
           + [S] + ids_of("qwen", USER_ROLE, HOW, ARE, YOU) + [E] + [S] + ids_of("qwen", ASSIST_ROLE))
    ids += ids_of("qwen", FINE, THANKS) + [18]
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].double()
    P = len(ids) - 3
    token_logps = [torch.log_softmax(logits[p - 1], -1)[ids[p]].item() for p in range(P, len(ids))]
    expected = math.exp(-sum(token_logps) / 3)
    got = perplexity(model, scorer, [prompt, prompt], [text, "fine"])
    assert got[0] == pytest.approx(expected, rel=1e-5)
    assert got[1] != pytest.approx(expected, rel=1e-3)          # a different response scores differently


def test_cross_tokenizer_perplexity_with_bpe_tokenizers_and_models():
    """Each of the four agents scores the same response strings with its own tokenizer and model: perplexity
    equals exp(-mean log-prob) of the forward pass over that agent's own ids of prompt + response + EOS."""
    for kind in KINDS:
        tok = ensure_pad_token(make_quirky_tokenizer(kind))
        model = make_quirky_model(kind, tok, seed=4)
        prompts = [render_prompt([{"role": "user", "content": "What is 12 + 30?"}], "vicuna", tok, system="")] * 2
        responses = ["12 + 30 = 42.", "Sorry, I can't help with that."]
        got = perplexity(model, tok, prompts, responses)
        for prompt, response, g in zip(prompts, responses, got):
            p = tok._tokenizer.encode(prompt).ids
            r = tok._tokenizer.encode(response, add_special_tokens=False).ids + [tok.eos_token_id]
            lp, n = forward_logps(model, p + r, [0] * len(p) + [1] * len(r))
            assert n == len(r) and g == pytest.approx(math.exp(-lp / n), rel=1e-4), kind


# ---------------------------------------------------------------------------------------------------------
# The "Token indices sequence length is longer than the specified maximum" warning: prompts longer than the
# tokenizer's model_max_length are cut by encode_many / encode_prompts, so the warning does not apply.

class Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture()
def transformers_log():
    handler, logger = Records(), logging.getLogger("transformers")
    logger.addHandler(handler)
    yield handler.messages
    logger.removeHandler(handler)


def long_prompt_tokenizer(kind):
    tok = ensure_pad_token(make_quirky_tokenizer(kind))
    tok.model_max_length = 16
    return tok


LONG_PROMPT = "A chat between a curious user and an artificial intelligence assistant. " * 3 + "USER: hello ASSISTANT:"


def test_the_detector_sees_the_warning(transformers_log):
    tok = long_prompt_tokenizer("qwen")
    tok(LONG_PROMPT)                                       # a plain call on a long text does warn
    assert any("sequence length is longer" in m for m in transformers_log)


@pytest.mark.parametrize("kind", KINDS)
def test_no_sequence_length_warning_for_prompts_cut_later(kind, transformers_log):
    tok = long_prompt_tokenizer(kind)
    assert len(tok(LONG_PROMPT, verbose=False)["input_ids"]) > 16
    encode_many(tok, [LONG_PROMPT] * 2, ["hello world " * 10, "hi"], max_length=32, max_prompt_length=16)
    assert encode_prompts(tok, [LONG_PROMPT], 16)[0][-1] == tok(LONG_PROMPT, verbose=False)["input_ids"][-1]
    model = make_quirky_model(kind, tok)
    perplexity(model, tok, [LONG_PROMPT], ["hello world"], max_length=32, max_prompt_length=16)
    generate(model, tok, [LONG_PROMPT], max_new_tokens=2, temperature=0, max_prompt_length=16, progress=False)
    assert not [m for m in transformers_log if "sequence length is longer" in m]


# ---------------------------------------------------------------------------------------------------------
# End to end: `--task hh-helpful` with three quirky teachers (SmolLM2-, Qwen2.5- and pythia-like) and a
# Llama-like student (the BOS-adding kind), each saved with save_pretrained and named by folder, on a small HH
# fixture, scored by a tiny local reward model.

def hh_dialogue(i):
    """The i-th fixture record in HH's format: a prompt of one or (every third) three turns, and two replies."""
    a, b = 3 + i % 17, 5 + (i * 7) % 23
    human = f"What is {a} plus {b}?" if i % 2 else f"How do I say hello number {i} to a friend?"
    prompt = f"\n\nHuman: {human}"
    if i % 3 == 0:
        prompt = f"\n\nHuman: Hi there, question {i}.\n\nAssistant: Sure, ask away.{prompt}"
    good = f"{a} plus {b} is {a + b}." if i % 2 else "Just smile and say hello, how are you today?"
    return {"chosen": f"{prompt}\n\nAssistant: {good}", "rejected": f"{prompt}\n\nAssistant: I do not know."}


def write_hh_fixture(folder, n_train, n_test):
    """FOLDER/hh-rlhf/helpful-base/{train,test}.jsonl.gz as on the hub (data.dataset_file's --data_dir layout)."""
    import gzip
    import json
    base = folder / "hh-rlhf" / "helpful-base"
    base.mkdir(parents=True)
    for split, rows in (("train", range(n_train)), ("test", range(1000, 1000 + n_test))):
        with gzip.open(base / f"{split}.jsonl.gz", "wt") as f:
            f.writelines(json.dumps(hh_dialogue(i)) + "\n" for i in rows)
    return folder / "hh-rlhf"


def save_agent(folder, kind, texts, vocab_size, hidden, seed):
    tok = make_quirky_tokenizer(kind, texts, vocab_size)
    tok.model_max_length = 24             # below --max_prompt_length: longer prompts are cut by encode_many
    model = make_quirky_model(kind, tok, hidden=hidden, seed=seed)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


def save_reward_model(folder, texts):
    """A tiny LlamaForSequenceClassification (one label) with its own tokenizer, as --reward_models takes."""
    from transformers import LlamaConfig, LlamaForSequenceClassification
    tok = make_quirky_tokenizer("llama", texts, 300)
    torch.manual_seed(7)
    model = LlamaForSequenceClassification(LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, num_labels=1, bos_token_id=1, eos_token_id=2))
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


def finite(x):
    return isinstance(x, (int, float)) and math.isfinite(x)


AGENTS = ["teacher0", "teacher1", "teacher2", "student"]
ROUNDS = ["round1", "round2", "round3"]                                # T = K = 3


@pytest.mark.slow                                                      # about 100 s on 2 CPU cores
def test_hh_run_end_to_end_with_quirky_tokenizers(tmp_path, transformers_log):
    import json

    from transformers import AutoTokenizer

    import macpo
    hh = write_hh_fixture(tmp_path / "data", 48, 24)
    texts = [json.dumps(hh_dialogue(i)) for i in range(48)] + ["USER: ASSISTANT:"] * 5
    kinds = {"teacher0": "smollm", "teacher1": "qwen", "teacher2": "pythia", "student": "llama"}
    folders = {a: save_agent(tmp_path / kinds[a], kinds[a], texts, 400 + 20 * k, 48 if a == "student" else 32, k)
               for k, a in enumerate(AGENTS)}
    rm = save_reward_model(tmp_path / "rm", texts)
    out = tmp_path / "run"
    macpo.main(["--task", "hh-helpful", "--data_dir", str(hh), "--teachers", ",".join(folders[a] for a in AGENTS[:3]),
                "--student", folders["student"], "--reward_models", rm, "--n_init", "16", "--n_w2s", "16",
                "--n_test", "16", "--template", "vicuna", "--system", "", "--max_length", "64",
                "--max_prompt_length", "40", "--max_new_tokens", "8", "--batch_size", "8", "--teacher_sft_epochs",
                "1", "--student_sft_epochs", "1", "--sft_lr", "1e-3", "--dpo_lr", "1e-4", "--log_every", "1",
                "--device", "cpu", "--out", str(out)])

    # every stage of Algorithm 1 finished (DONE inside it), none left half-written
    done = {str(p.parent.relative_to(out)) for p in out.rglob("DONE")}
    trained = ([f"init/{a}" for a in AGENTS] + [f"init/{a}_neg" for a in AGENTS] + ["ceiling/student"]
               + [f"{r}/{a}" for r in ROUNDS for a in AGENTS])
    expected = set(trained) | {"init/weak_labels", "init/weak_negatives"} | {f"init/negatives_{a}" for a in AGENTS}
    expected |= {f"{r}/pairs_student" for r in ROUNDS} | {f"{r}/{a}/samples" for r in ["init"] + ROUNDS[:-1]
                                                          for a in AGENTS}
    expected |= {f"eval/{r}/{a}" for r in ["init"] + ROUNDS for a in AGENTS} | {"eval/ceiling/student"}
    assert expected <= done, sorted(expected - done)
    assert not list(out.rglob("*.partial"))

    # finite losses for every training stage; each DPO update starts at its reference: DPO loss ln 2
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {m["stage"] for m in metrics} == set(trained)
    assert all(finite(m["loss"]) for m in metrics)
    for r in ROUNDS:
        for a in AGENTS:
            first = next(m for m in metrics if m["stage"] == f"{r}/{a}")
            assert first["dpo"] == pytest.approx(math.log(2), abs=1e-4), (r, a)

    # the reward model scored every agent's test generations, every round
    results = json.loads((out / "results.json").read_text())
    assert results["metric"] == rm
    assert list(results["results"]) == ["init"] + ROUNDS + ["ceiling"]
    for stage, row in results["results"].items():
        assert list(row) == (["student"] if stage == "ceiling" else AGENTS), stage
        assert all(finite(v) for v in row.values()), (stage, row)
    assert results["results_by_scorer"] == {rm: results["results"]}
    for versus in ("vs_naive_sft", "vs_weak"):
        w = results["win_rates"][rm][versus]
        assert all(finite(w[k]) for k in ("win", "tie", "lose")) and w["win"] + w["tie"] + w["lose"] == pytest.approx(1)
    for a in AGENTS:
        lines = (out / "eval" / "round3" / a / "generations.jsonl").read_text().splitlines()
        gens = [json.loads(line) for line in lines]
        assert len(gens) == 16 and all(g["prompt"][-1]["role"] == "user" for g in gens)

    # the student scored every teacher's text with its own tokenizer
    for r in ROUNDS:
        pairs = [json.loads(line) for line in (out / r / "pairs_student" / "pairs.jsonl").read_text().splitlines()]
        assert len(pairs) == 16
        assert all(finite(v) and v >= 1 for p in pairs for v in p["perplexities"].values())
        assert all(set(p["perplexities"]) == set(AGENTS[:3]) for p in pairs)

    # the trained checkpoints keep their tokenizers' quirks
    final = {a: AutoTokenizer.from_pretrained(out / "round3" / a) for a in AGENTS}
    assert final["teacher1"].bos_token is None and final["teacher1"].pad_token == "<|endoftext|>"
    assert added_bos_id(final["teacher0"]) is None and added_bos_id(final["teacher2"]) is None
    assert final["teacher2"].eos_token == final["teacher2"].bos_token == "<|endoftext|>"
    assert added_bos_id(final["student"]) == final["student"].bos_token_id == 1
    assert final["teacher1"].chat_template == CHAT_TEMPLATES["qwen"]

    # prompts ran past the tokenizers' model_max_length (24), and no warning said so: encode_many cuts them
    prompt = render_prompt(gens[2]["prompt"], "vicuna", system="")
    assert all(len(final[a](prompt, verbose=False)["input_ids"]) > 24 for a in AGENTS)
    assert not [m for m in transformers_log if "sequence length is longer" in m]
