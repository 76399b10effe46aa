"""Text to tensors: dataset readers, splits, prompt rendering, tokenization and collation.

(stub: the Example record every reader returns; the rest is being written)
"""
from dataclasses import dataclass


@dataclass
class Example:
    """One preference record. `prompt` is the conversation so far as role/content turns ending with a user
    turn; `chosen` / `rejected` are bare response texts (no template, no EOS). `rejected` is None for SFT-only
    records. `source` is "file:line" so any later error can point back at the record."""
    prompt: list            # [{"role": "user" | "assistant", "content": str}, ...], last role == "user"
    chosen: str
    rejected: str | None = None
    source: str = ""
