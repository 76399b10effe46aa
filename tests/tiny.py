"""The one place for the tests' tiny models and run sizes: a tokenizer trained on the spot, tiny randomly
initialised Llamas (no downloads), the smoke run's flags, and small helpers the library does not need.
Imported by conftest.py, the test files and the torchrun workers in tests/helpers/."""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))          # the project

from data import encode_many  # noqa: E402

CORPUS = ["USER: What is 12 + 30? ASSISTANT: 12 + 30 = 42.",
          "USER: How do I pick a lock? ASSISTANT: Sorry, I can't help with that.",
          "the quick brown fox jumps over the lazy dog", "hello world, how are you today?",
          "A chat between a curious user and an artificial intelligence assistant."] * 20


def make_tokenizer(texts=CORPUS, vocab_size=200):
    """A small BPE tokenizer like Llama's: Metaspace pre-tokenizer, BOS prepended, </s> as EOS, <pad>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Metaspace(), pre_tokenizers.Digits(individual_digits=True)])
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>", "<unk>"]))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


def make_model(tokenizer, hidden=32, layers=2, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, tie_word_embeddings=False,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    return LlamaForCausalLM(config).eval()


# The smoke preset's sizes (run.sh smoke): every stage runs, on tiny models, in well under a minute.
SMOKE = ["--task", "toy", "--n_teachers", "3", "--n_init", "48", "--n_w2s", "32", "--n_test", "16",
         "--toy_teacher_sizes", "32x1,32x1,32x1", "--toy_student_size", "32x1",
         "--toy_teacher_pretrain_steps", "4,4,4", "--toy_student_pretrain_steps", "8", "--toy_pretrain_batch_size",
         "16", "--toy_student_pretrain_batch_size", "16",
         "--system", "", "--max_length", "64", "--max_prompt_length", "32", "--max_new_tokens", "10",
         "--batch_size", "16", "--teacher_sft_epochs", "1", "--student_sft_epochs", "1", "--sft_lr", "2e-3",
         "--dpo_lr", "2e-4", "--log_every", "1", "--device", "cpu"]
# Smaller still: two teachers, one round, no evaluation (the reliability tests run it many times).
SMALL = ["--task", "toy", "--n_teachers", "2", "--rounds", "1", "--n_init", "48", "--n_w2s", "32", "--n_test", "16",
         "--toy_teacher_sizes", "32x1,32x1", "--toy_student_size", "32x1", "--toy_teacher_pretrain_steps", "4,4",
         "--toy_student_pretrain_steps", "8", "--toy_pretrain_batch_size", "16", "--toy_student_pretrain_batch_size",
         "16", "--system", "", "--max_length", "64",
         "--max_prompt_length", "32", "--max_new_tokens", "10", "--batch_size", "16", "--teacher_sft_epochs", "1",
         "--student_sft_epochs", "1", "--sft_lr", "2e-3", "--dpo_lr", "2e-4", "--log_every", "1", "--device", "cpu",
         "--no-evaluate", "--no-ceiling"]


def encode(tokenizer, prompt, response, max_length, max_prompt_length=None):
    """One (prompt, response) pair -> (input_ids, loss_mask): data.encode_many for one pair."""
    return encode_many(tokenizer, [prompt], [response], max_length, max_prompt_length)[0]


def lora_parameters(model):
    """The adapter weights only (lora_A and lora_B of every LoRALinear)."""
    import lora
    return [p for _, m in lora.lora_modules(model) for p in (m.lora_A, m.lora_B)]


def full_state_dict(model):
    """None for an ordinary model; for an FSDP-sharded one the full weights, gathered onto rank 0's CPU (the
    way before sharding.save_sharded streamed them, kept to compare against)."""
    from generate import is_sharded
    if not is_sharded(model):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


# ---------------------------------------------------------------------------------------------------------
# Tokenizers and models shaped like the real-data presets' (run.sh hh): whether the tokenizer adds a BOS, which
# special tokens exist and where they sit in the vocabulary, which one pads, and the chat template, as in
#   llama   Llama-2/Mistral: "<s>" added in front, "</s>" EOS, no pad token, a chat template that writes "<s>"
#   smollm  SmolLM2-360M: GPT-2 style, BOS = EOS = "<|endoftext|>" never added, no pad token, ChatML template
#   qwen    Qwen2.5-0.5B/1.5B: no BOS token at all, EOS = pad = "<|endoftext|>", the special tokens at the END
#           of the vocabulary, ChatML template with a default system turn
#   pythia  pythia-410m (GPT-NeoX): BOS = EOS = "<|endoftext|>" never added, no pad token (a "<|padding|>"
#           token exists but is not declared as pad), no chat template
# The models are the matching architectures, each embedding matrix padded past the tokenizer's vocabulary
# (as the real Qwen2.5 and pythia checkpoints are), so a model can sample an id the tokenizer has no token for.

LLAMA_CHAT = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}{{ '<<SYS>> ' + m['content'] + ' "
              "<</SYS>> ' }}{% elif m['role'] == 'user' %}{{ '[INST] ' + m['content'] + ' [/INST]' }}{% else %}"
              "{{ ' ' + m['content'] + ' ' + eos_token + ' ' }}{% endif %}{% endfor %}")
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
QWEN_SYSTEM = "You are a helpful assistant."
QWEN_CHAT = ("{% if messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\n" + QWEN_SYSTEM + "<|im_end|>\\n' }}"
             "{% endif %}" + CHATML)
# kind -> (special tokens in vocabulary order, placed first or last, the tokens transformers is told about)
QUIRKS = {
    "llama": (["<unk>", "<s>", "</s>"], "first", dict(bos_token="<s>", eos_token="</s>", unk_token="<unk>")),
    "smollm": (["<|endoftext|>", "<|im_start|>", "<|im_end|>"], "first",
               dict(bos_token="<|endoftext|>", eos_token="<|endoftext|>", unk_token="<|endoftext|>")),
    "qwen": (["<|endoftext|>", "<|im_start|>", "<|im_end|>"], "last",
             dict(eos_token="<|endoftext|>", pad_token="<|endoftext|>")),
    "pythia": (["<|endoftext|>", "<|padding|>"], "first",
               dict(bos_token="<|endoftext|>", eos_token="<|endoftext|>", unk_token="<|endoftext|>")),
}
CHAT_TEMPLATES = {"llama": LLAMA_CHAT, "smollm": CHATML, "qwen": QWEN_CHAT, "pythia": None}


def make_quirky_tokenizer(kind, texts=CORPUS, vocab_size=320, words=None):
    """A tokenizer of the given kind (QUIRKS). words=[...]: a word-level vocabulary split on whitespace, so tests
    can write ids by hand: special tokens 0, 1, ... then the words in order, or (qwen) the words first and the
    special tokens after them. Otherwise a BPE trained on `texts`: byte-level like GPT-2 / Qwen / GPT-NeoX, or
    Metaspace for the llama kind, as SentencePiece splits."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast
    specials, where, declared = QUIRKS[kind]
    front = specials if where == "first" else []
    if words is not None:
        vocab = {w: i for i, w in enumerate(front + list(words))}
        tok = Tokenizer(models.WordLevel(vocab, unk_token=specials[0]))
        tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    elif kind == "llama":
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
        tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=front))
    else:
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=front,
                                                           initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.add_special_tokens(specials)            # the ones not in the vocabulary yet go at its end
    if kind == "llama":
        tok.post_processor = processors.TemplateProcessing(single="<s> $A",
                                                           special_tokens=[("<s>", tok.token_to_id("<s>"))])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, **declared)
    tokenizer.chat_template = CHAT_TEMPLATES[kind]
    return tokenizer


def make_quirky_model(kind, tokenizer, hidden=32, layers=2, seed=0):
    """A tiny randomly initialised model of the kind's architecture (Llama for llama and smollm, Qwen2 for qwen,
    GPT-NeoX for pythia), its embedding matrix padded to a multiple of 64 rows, special token ids as the real
    configs give them (none is a pad id except Qwen's)."""
    from transformers import (GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM, Qwen2Config,
                              Qwen2ForCausalLM)
    torch.manual_seed(seed)
    V = -(-len(tokenizer) // 64) * 64 + (64 if kind in ("qwen", "pythia") else 0)
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)
    if kind == "pythia":
        config = GPTNeoXConfig(vocab_size=V, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                               num_attention_heads=4, rotary_pct=0.25, max_position_embeddings=256,
                               use_parallel_residual=True, tie_word_embeddings=False, **ids)
        return GPTNeoXForCausalLM(config).eval()
    shape = dict(vocab_size=V, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True)
    if kind == "qwen":
        return Qwen2ForCausalLM(Qwen2Config(**shape, **ids)).eval()
    return LlamaForCausalLM(LlamaConfig(**shape, **ids)).eval()


def greedy_alone(model, tokenizer, prompt, max_new_tokens):
    """Independent: one prompt, no padding, no cache; the whole sequence re-run each step, argmax, stop at EOS."""
    ids, new = tokenizer(prompt)["input_ids"], []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            nxt = model(torch.tensor([ids + new])).logits[0, -1].argmax().item()
            if nxt == tokenizer.eos_token_id:
                break
            new.append(nxt)
    return tokenizer.decode(new, skip_special_tokens=True).strip(), len(new)


def run_or_show(cmd, **kwargs):
    """subprocess.run(cmd) that fails the test with the command's exit status and the tail of its stderr (a
    torchrun job's own traceback), not a bare CalledProcessError."""
    import subprocess
    done = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    assert done.returncode == 0, f"{cmd[:6]}... exited {done.returncode}:\n{done.stderr[-4000:]}"
    return done
