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
