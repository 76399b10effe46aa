"""Running models over text: batched sequence log-probs, perplexity scoring and sampling.

    logps, n_tokens = sequence_logps(model, input_ids, attention_mask, loss_mask)   # one padded batch
    logps, n_tokens = packed_logps(model, encoded_pairs, pad_id)                    # many pairs, prompts shared
    ppl = perplexity(model, tokenizer, prompts, responses)                          # one float per pair
    chosen_logps, rejected_logps = reference_logps(model, tokenizer, rows)          # DPO's reference, once
    texts = generate(model, tokenizer, prompts, max_new_tokens=64, temperature=0)   # one string per prompt

Prompts are passed already rendered (data.render_prompt); every (prompt, response) pair becomes ids through
data.encode_many, the same split the training loss mask uses. Pairs that share a prompt (MACPO's K responses per
prompt, a chosen and a rejected response) are scored after one pass of it (pack_rows, below).
"""
import bisect
import functools
import inspect
from typing import NamedTuple

import torch
from tqdm.auto import tqdm

import data
import parallel
from data import collate, encode_many
from losses import token_logps


def _backbone(model):
    """The transformer stack under the LM head (model.model for Llama, Mistral, Qwen...). Calling it and the
    head separately lets us apply the [H, V] output projection only where a token is scored.
    Models that post-process logits (e.g. Gemma-2's soft-capping) are not special-cased here."""
    return getattr(model, model.base_model_prefix)


def _cache_kwarg(module):
    # transformers renamed `past_key_values` to `cache` in the 5.2x series; accept either.
    return "cache" if "cache" in inspect.signature(module.forward).parameters else "past_key_values"


def sequence_logps(model, input_ids, attention_mask, loss_mask):
    """Sum of log-probabilities of the masked tokens and their count, from one forward pass.

    input_ids, attention_mask [B, T] on the model's device; loss_mask [B, T] 0/1 (may stay on the CPU: the
    gather indices are computed where it lives, so a CPU mask costs no device sync).
    Returns (logps [B] float32, n_tokens [B] long). Differentiable: training calls it with gradients on.
    """
    B = input_ids.shape[0]
    logits, targets, rows = scored_logits(model, input_ids, attention_mask, loss_mask)
    scored = token_logps(logits, targets)                                               # [N] float32
    logps = torch.zeros(B, dtype=torch.float32, device=input_ids.device).index_add(0, rows, scored)
    n_tokens = torch.bincount(rows, minlength=B)
    return logps, n_tokens


class ScoredLM(torch.nn.Module):
    """A causal LM whose output projection runs only at the scored positions (rows, cols).

    The token at position p + 1 is predicted from the hidden state at p; prompts are long and V is the widest
    matrix of a small model, so most of the head's FLOPs would go to unscored prompt positions. A module rather
    than a function so that DistributedDataParallel and FSDP can wrap it: their hooks run on forward()."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, rows, cols, position_ids=None, cache=None, use_cache=False,
                float32_head=True):
        backbone = _backbone(self.model)
        kv = {"use_cache": True, _cache_kwarg(backbone): cache} if use_cache else {}
        out = backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, **kv)
        logits = head_logits(self.model, out.last_hidden_state[rows, cols], float32_head)  # [B, T, H] -> [N, V]
        return (logits, out.past_key_values) if use_cache else logits


def head_logits(model, hidden, float32=True):
    """The LM head on hidden states [N, H] -> logits [N, V]; float32: computed in float32 from the weights as
    they are (bf16 -> float32 is exact), so the logits are not rounded to bf16.

    A bf16 logit z keeps 8 significant bits: at |z| = 10 it is off by up to 2^-5 = 0.03, which log p(y) =
    z_y - logsumexp(z) takes whole, token after token, and which makes one sequence score differently in two
    batch layouts when the rounding falls either side. Scoring, reference log-probs and the training loss all
    use this float32 head, so the DPO policy and its reference see one function (the MiniMax-M1 report,
    arXiv:2506.13585, traced its training/inference probability mismatch to the bf16 head). Costs a float32 copy of
    the [V, H] weight per call and float32 matrix products for the head; generation (float32=False) skips it:
    it would pay the copy at every decoding step, and sampling needs only the logits' order. A head that is not
    a plain nn.Linear (LoRA on lm_head) runs as it is."""
    head = model.get_output_embeddings()
    if not float32 or hidden.dtype == torch.float32 or type(head) is not torch.nn.Linear:
        return head(hidden)
    bias = None if head.bias is None else head.bias.float()
    return torch.nn.functional.linear(hidden.float(), head.weight.float(), bias)


def scorer_for(model):
    """The ScoredLM every forward pass of `model` goes through: for a model sharded with FSDP (sharding.wrap, or
    loaded sharded) the one its hooks are registered on, so that generation, scoring and training all run
    through the sharded root; otherwise a fresh wrapper (it holds no state)."""
    return getattr(model, "_macpo_scorer", None) or ScoredLM(model)


def is_sharded(model):
    """Is `model` sharded across ranks with FSDP (sharding.wrap or sharding.load_sharded gave it its root)? Then every
    forward pass is a collective: every rank must make the same calls, so ranks with less work run padding
    batches and decoding stops when every rank's batch is done."""
    return getattr(model, "_macpo_scorer", None) is not None


def inference(fn):
    """Decorator: run fn(model, ...) under torch.inference_mode, or under torch.no_grad for a sharded model,
    whose FSDP buffers (the gathered weights) are made once and reused by training: made under inference_mode
    they could never be written again outside it."""
    @functools.wraps(fn)
    def run(model, *args, **kwargs):
        with torch.no_grad() if is_sharded(model) else torch.inference_mode():
            return fn(model, *args, **kwargs)
    return run


def _reshard(scorer, sharded):
    """FSDP keeps the root's parameters (embeddings, final norm, head) gathered after a forward pass, expecting a
    backward; after inference, shard them again so that each rank holds its 1/W share only."""
    if sharded:
        scorer.reshard()


def scored_logits(model, input_ids, attention_mask, loss_mask):
    """Logits at the scored positions only: (logits [N, V], target ids [N], row of each [N]), N = the number
    of masked-in tokens. `model` is a transformers causal LM, or a ScoredLM already wrapped for several
    processes (parallel.wrap). Used by sequence_logps and by token-level losses (losses.confident_loss)."""
    rows, cols = loss_mask[:, 1:].nonzero(as_tuple=True)                                # [N], [N]
    rows, cols = rows.to(input_ids.device), cols.to(input_ids.device)
    scorer = scorer_for(model) if hasattr(model, "get_output_embeddings") else model
    return scorer(input_ids, attention_mask, rows, cols), input_ids[rows, cols + 1], rows


def length_sorted_batches(lengths, batch_size, max_padding=1.0):
    """Indices grouped into batches of similar length (longest first, so an out-of-memory shows up at once).
    A batch also ends where the next item is more than `max_padding` shorter than the batch's longest, so at
    most that share of it is padding. Scoring uses 0.1: on a GPU, with thousands of items, batches stay full;
    on a CPU, where one long row already fills the matrix products, a smaller batch costs nothing. Generation
    keeps full batches (1.0): each decoding step reads every weight once per batch."""
    batches = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        if not batches or len(batches[-1]) == batch_size or lengths[i] < (1 - max_padding) * lengths[batches[-1][0]]:
            batches.append([])
        batches[-1].append(i)
    return batches


def _device(model):
    return next(model.parameters()).device


def activation_dtype(model):
    """The hidden states' dtype, which an additive attention mask must share: the input embeddings' (a model's
    first parameter may be something else, e.g. a float32 LoRA adapter)."""
    return model.get_input_embeddings().weight.dtype


# ---------------------------------------------------------------------------------------------------------
# Scoring many responses to one prompt: the prompt runs through the model once.
#
# MACPO scores K responses per prompt (the student's perplexity of each weak teacher's answer) and the reference
# log-probs of a chosen and a rejected response to one prompt. One pair at a time, the prompt (often most of the
# tokens) goes through the model K times. Packed, a row holds the prompt once followed by each of its responses,
# and the attention mask lets a response see the prompt and its own earlier tokens only. Positions restart after
# the prompt for every response, so each response scores exactly as in its own (prompt, response) sequence.
# Several prompts share a row when they fit, so rows are nearly full and little compute goes to padding:
#
#   tokens     p p p a a b b b q q c      (prompt p with responses a and b; prompt q with response c)
#   position   0 1 2 3 4 3 4 5 0 1 2
#   doc        0 0 0 0 0 0 0 0 1 1 1      token i may attend to j <= i when doc[j] == doc[i]
#   seg        0 0 0 1 1 2 2 2 0 0 1                                   and (seg[j] == 0 or seg[j] == seg[i])
#
# A response's first token is predicted from its prompt's last position, the others from the previous token of
# the same response.

def packable(model):
    """Packing passes an additive [B, 1, T, T] mask. The eager and SDPA attentions of transformers 5.x (and of
    Llama-like models in 4.4x) take it as it is; some older model code inverts a 4D mask, and flash-attention-2
    takes none. So the first call checks: two responses to one prompt (random ids), scored packed and padded,
    must agree; the answer is kept on the model. A model that fails gets one padded pair per row instead."""
    if getattr(model, "_macpo_packable", None) is None:
        ok = getattr(model.config, "_attn_implementation", None) in ("eager", "sdpa")
        if ok:
            g, V = torch.Generator().manual_seed(0), model.get_input_embeddings().num_embeddings
            prompt = torch.randint(V, (6,), generator=g).tolist()
            encoded = [(prompt + torch.randint(V, (4,), generator=g).tolist(), [0] * 6 + [1] * 4) for _ in range(2)]
            device, dtype, training = _device(model), activation_dtype(model), model.training
            model.eval()
            with torch.no_grad():
                packed, _ = packed_sequence_logps(scorer_for(model), pack_rows(encoded, 16), 2, 0, dtype, device)
                b = collate(encoded, 0)
                padded, _ = sequence_logps(model, b["input_ids"].to(device), b["attention_mask"].to(device),
                                           b["loss_mask"])
            model.train(training)
            tol = 1e-4 if dtype == torch.float32 else 2e-2                            # bf16 keeps ~3 digits
            ok = bool(torch.allclose(packed, padded, rtol=tol, atol=10 * tol))
        model._macpo_packable = ok
    return model._macpo_packable


class Response(NamedTuple):
    """One scored response in a packed row."""
    pair: int           # its index in the encoded list: where its log-prob goes
    ids: list           # its token ids
    mask: list          # its loss mask (1 = scored)


class Document(NamedTuple):
    """A prompt, run once, and the responses that follow it; a packed row is a list of documents."""
    prompt: list        # prompt token ids
    responses: list     # [Response], each seeing the prompt and its own earlier tokens only


def doc_length(doc):
    return len(doc.prompt) + sum(len(r.ids) for r in doc.responses)


def row_length(row):
    """Tokens in a packed row: each document's prompt once plus its responses."""
    return sum(doc_length(doc) for doc in row)


def pack_rows(encoded, row_tokens, share_prompts=True):
    """[(input_ids, loss_mask)] pairs -> rows, each a list of Documents of at most row_tokens tokens in all.
    Pairs whose prompt tokens are identical share a document (one whose responses do not fit together is split,
    the prompt repeated); documents are placed best-fit, longest first. The prompt is what precedes the first
    scored token. share_prompts=False gives every pair its own document (packing without sharing, for the
    benchmark)."""
    row_tokens = max([row_tokens] + [len(ids) for ids, _ in encoded])
    by_prompt = {}                                                  # prompt key -> (prompt ids, [Response])
    for i, (ids, mask) in enumerate(encoded):
        p = mask.index(1) if 1 in mask else len(ids)
        key = tuple(ids[:p]) if share_prompts else i
        by_prompt.setdefault(key, (ids[:p], []))[1].append(Response(i, ids[p:], mask[p:]))
    docs = []
    for prompt, responses in by_prompt.values():
        doc = None
        for response in responses:                                  # a new document when the last one is full
            if doc is None or doc_length(doc) + len(response.ids) > row_tokens:
                doc = Document(list(prompt), [])
                docs.append(doc)
            doc.responses.append(response)
    rows, free = [], []                                             # free: sorted [(tokens left, row index)]
    for doc in sorted(docs, key=lambda d: -doc_length(d)):
        n = doc_length(doc)
        k = bisect.bisect_left(free, (n, -1))                       # the fullest row it still fits in
        left, r = free.pop(k) if k < len(free) else (row_tokens, len(rows))
        if r == len(rows):
            rows.append([])
        rows[r].append(doc)
        bisect.insort(free, (left - n, r))
    return rows


def packed_batch(rows, pad_id, dtype=torch.float32, device="cpu"):
    """Packed rows -> a batch on `device`: input_ids, position_ids [B, T]; attention_mask [B, 1, T, T] additive
    (0 where a token may attend, dtype's minimum where not; built on the device from [B, T] ids, so no T x T
    copy crosses the bus); and the scored tokens as four [N] tensors: row, the column that predicts it, its id,
    its pair index. Padding attends to itself only (a row of -inf gives NaN)."""
    T = max(row_length(row) for row in rows)
    input_ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    position_ids = torch.zeros((len(rows), T), dtype=torch.long)
    doc = -1 - torch.arange(T).repeat(len(rows), 1)                # padding: a document per position
    seg = torch.zeros((len(rows), T), dtype=torch.long)
    scored = []                                                     # (row, column, target, pair)
    for b, row in enumerate(rows):
        start = 0
        for d, (prompt, responses) in enumerate(row):
            P, end = len(prompt), start + len(prompt)
            input_ids[b, start:end] = torch.tensor(prompt, dtype=torch.long)
            position_ids[b, start:end] = torch.arange(P)
            doc[b, start:end] = d
            for k, r in enumerate(responses, 1):
                R = len(r.ids)
                input_ids[b, end:end + R] = torch.tensor(r.ids, dtype=torch.long)
                position_ids[b, end:end + R] = torch.arange(P, P + R)      # as if it followed the prompt alone
                doc[b, end:end + R], seg[b, end:end + R] = d, k
                for j in range(R):
                    if not r.mask[j] or (j == 0 and P == 0):           # unscored, or nothing to predict it from
                        continue
                    # token j is predicted by the column before it; the first, by the prompt's last column
                    scored.append((b, end + j - 1 if j else start + P - 1, r.ids[j], r.pair))
                end += R
            start = end
    doc, seg = doc.to(device), seg.to(device)
    allowed = (torch.ones(T, T, dtype=torch.bool, device=device).tril() & (doc[:, :, None] == doc[:, None, :])
               & ((seg[:, None, :] == 0) | (seg[:, :, None] == seg[:, None, :])))            # [B, T, T]
    attention_mask = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill_(~allowed, torch.finfo(dtype).min)
    scored = torch.tensor(scored, dtype=torch.long).reshape(-1, 4).to(device)
    return (input_ids.to(device), position_ids.to(device), attention_mask[:, None], *scored.unbind(1))


def packed_sequence_logps(scorer, rows, n_pairs, pad_id, dtype, device):
    """sequence_logps over packed rows: (logps [n_pairs] float32, n_tokens [n_pairs] long) on the device, the
    scored tokens of each pair index in `rows` summed (indices not in them: 0 over 0 tokens). `scorer` is a
    ScoredLM, maybe wrapped for several processes. Differentiable: the preference update calls it too."""
    input_ids, position_ids, mask, rows_, cols, targets, pairs = packed_batch(rows, pad_id, dtype, device)
    logits = scorer(input_ids, mask, rows_, cols, position_ids)
    logps = torch.zeros(n_pairs, dtype=torch.float32, device=device).index_add(0, pairs, token_logps(logits, targets))
    return logps, torch.bincount(pairs, minlength=n_pairs)


def batch_logps(scorer, rows, pad_id, pack, row_tokens, dtype, device):
    """Summed log-probs and token counts of one batch of encoded rows [(input_ids, loss_mask)] through `scorer`
    (a ScoredLM, maybe wrapped for several processes; gradients flow: the training loop's forward pass)
    -> (logps [N] float32, n_tokens [N], tokens the model ran). pack: responses to one prompt (a pair's chosen
    and rejected) follow one pass of it (pack_rows, rows of at most row_tokens); otherwise one right-padded row
    each."""
    if pack:
        packed = pack_rows(rows, row_tokens)
        logps, n = packed_sequence_logps(scorer, packed, len(rows), pad_id, dtype, device)
        return logps, n, sum(row_length(row) for row in packed)
    b = collate(rows, pad_id)
    logps, n = sequence_logps(scorer, b["input_ids"].to(device), b["attention_mask"].to(device), b["loss_mask"])
    return logps, n, int(b["attention_mask"].sum())


@inference
def packed_logps(model, encoded, pad_id, batch_size=32, row_tokens=1024, progress=False, desc="scoring",
                 share_prompts=True):
    """Summed log-probs of the loss-masked tokens of each encoded pair and their count: (logps [N] float32,
    n_tokens [N] long) on the CPU, in input order, from packed rows (above) of at most row_tokens tokens, at
    most batch_size rows at a time, batches cut at 10% padding. Equal to sequence_logps on each pair alone, without
    re-running shared prompts. Identical pairs are scored once and get the very same value."""
    device, dtype = _device(model), activation_dtype(model)
    pack, sharded = packable(model), is_sharded(model)
    # Identical pairs (K teachers who gave one answer; a chosen equal to its rejected) are scored once: in bf16
    # two copies in different places of a batch differ in their last bits, and the perplexity pick's argmin
    # would then choose between equal texts by that noise instead of by the lowest teacher index.
    slots = {}                                                      # (input_ids, loss_mask) -> its unique index
    of = [slots.setdefault((tuple(ids), tuple(mask)), len(slots)) for ids, mask in encoded]     # [N]
    unique = [(list(ids), list(mask)) for ids, mask in slots]
    rows = pack_rows(unique, row_tokens, share_prompts) if pack else [[i] for i in range(len(unique))]
    lengths = [row_length(row) for row in rows] if pack else [len(ids) for ids, _ in unique]
    batches = length_sorted_batches(lengths, batch_size, 0.1)
    done = []
    # with several processes each rank scores its share of the batches; gather restores the input order
    for idx in tqdm(parallel.mine(batches, padded=sharded), desc=desc, disable=not progress, leave=False):
        padding, idx = idx is None, batches[0] if idx is None else idx
        batch = [rows[r] for r in idx]
        if pack:
            ids = [r.pair for row in batch for doc in row for r in doc.responses]
            logps, n = packed_sequence_logps(scorer_for(model), batch, len(unique), pad_id, dtype, device)
            logps, n = logps[ids], n[ids]
        else:
            ids = [row[0] for row in batch]
            b = collate([unique[i] for i in ids], pad_id)
            logps, n = sequence_logps(model, b["input_ids"].to(device), b["attention_mask"].to(device), b["loss_mask"])
        if not padding:
            done += zip(ids, zip(logps.float().cpu().tolist(), n.tolist()))      # one sync per batch
    _reshard(scorer_for(model), sharded)
    gathered = parallel.gather(done)
    assert [i for i, _ in gathered] == list(range(len(unique))), "packed_logps lost or repeated a pair"
    logps, n = zip(*[v for _, v in gathered]) if unique else ((), ())
    of = torch.tensor(of, dtype=torch.long)
    return torch.tensor(logps, dtype=torch.float32)[of], torch.tensor(n, dtype=torch.long)[of]


def perplexity(model, tokenizer, prompts, responses, batch_size=32, max_length=1024, max_prompt_length=None,
               progress=False):
    """PPL(response | prompt) = exp(-(1/|y|) sum_t log p(y_t | x, y_<t)) for each pair, in input order.
    The response's tokens are the ones data.encode_many puts in the loss mask (response + EOS). The responses to one
    prompt are scored against one pass of it (packed_logps)."""
    assert len(prompts) == len(responses)
    encoded = encode_many(tokenizer, prompts, responses, max_length, max_prompt_length)
    pad_id = data.pad_id(tokenizer)
    logps, n = packed_logps(model, encoded, pad_id, batch_size, max_length, progress, desc="perplexity")
    return torch.exp(-logps / n.clamp(min=1)).tolist()


@inference
def reference_logps(model, tokenizer, rows, batch_size=32, max_length=1024, max_prompt_length=None):
    """Summed log-probs of every chosen and rejected response under the reference model: two [N] float32
    tensors on the CPU. Computed once before the update, so the reference model need not stay in memory.
    A chosen and a rejected response to one prompt are scored against one pass of it (packed_logps)."""
    chosen, rejected = data.encode_rows(tokenizer, rows, max_length, max_prompt_length)
    logps, _ = packed_logps(model, chosen + rejected, data.pad_id(tokenizer), batch_size, max_length)
    return logps[:len(chosen)], logps[len(chosen):]


def _sample(logits, temperature, top_p, generator):
    """Next token per row from logits [B, V]. temperature 0 is greedy; top_p keeps the smallest set of tokens
    whose probability mass reaches top_p (nucleus sampling, Holtzman et al. 2020)."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, sorted_ids = probs.sort(dim=-1, descending=True)
        # drop a token when the mass before it already reaches top_p (the top token always survives)
        drop = sorted_probs.cumsum(-1) - sorted_probs >= top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        return sorted_ids.gather(-1, torch.multinomial(sorted_probs, 1, generator=generator)).squeeze(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@inference
def generate(model, tokenizer, prompts, max_new_tokens=128, temperature=1.0, top_p=1.0, batch_size=32, seed=0,
             max_prompt_length=1024, progress=True, desc="generate"):
    """One response string per prompt, in input order (prompt stripped, special tokens removed).

    Prompts are sorted by length and left-padded into batches so that every row's last prompt token sits in
    the last column; decoding uses the KV cache, so each step feeds one token per row. A row stops at EOS
    (later positions are padding); the batch stops when every row has. Deterministic for a seed: batch b
    samples from its own generator seeded with seed + b, so the same prompts give the same responses however
    many processes share the batches.
    """
    device, scorer, sharded = _device(model), scorer_for(model), is_sharded(model)
    eos_id = tokenizer.eos_token_id
    pad_id = data.pad_id(tokenizer)
    encoded = data.encode_prompts(tokenizer, prompts, max_prompt_length)
    done = []
    batches = list(enumerate(length_sorted_batches([len(e) for e in encoded], batch_size)))
    bar = tqdm(total=len(prompts), desc=desc, disable=not progress or not parallel.is_main(), leave=False)
    for item in parallel.mine(batches, padded=sharded):
        padding, (b, idx) = item is None, batches[0] if item is None else item
        generator = torch.Generator(device=device).manual_seed(seed + b)
        B, P = len(idx), max(len(encoded[i]) for i in idx)
        input_ids = torch.full((B, P), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((B, P), dtype=torch.long)
        for r, i in enumerate(idx):
            input_ids[r, P - len(encoded[i]):] = torch.tensor(encoded[i])
            attention_mask[r, P - len(encoded[i]):] = 1
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)                   # [B, P], pads at 0
        new_tokens = torch.full((B, max_new_tokens), pad_id, dtype=torch.long, device=device)
        finished = torch.full((B,), padding, dtype=torch.bool, device=device)     # a padding batch waits, done
        cache, step_ids, last = None, input_ids, torch.arange(B, device=device)
        for t in range(max_new_tokens):
            # the head at each row's last position only: [B, V]
            logits, cache = scorer(step_ids, attention_mask, last, torch.full_like(last, step_ids.shape[1] - 1),
                                   position_ids, cache=cache, use_cache=True, float32_head=False)
            token = _sample(logits, temperature, top_p, generator).masked_fill(finished, pad_id)     # [B]
            new_tokens[:, t] = token
            finished |= token == eos_id
            # checking `finished` on the host is a device sync: do it every 8 steps, not every step; sharded,
            # every rank decodes until every rank's batch is done (each step is a collective)
            if t % 8 == 7 and (parallel.all_true(finished.all()) if sharded else bool(finished.all())):
                break
            step_ids = token[:, None]                                                   # [B, 1]
            attention_mask = torch.cat([attention_mask, torch.ones_like(step_ids)], dim=1)
            position_ids = position_ids[:, -1:] + 1
        for r, row in enumerate([] if padding else new_tokens.tolist()):
            row = row[:row.index(eos_id)] if eos_id in row else row
            done.append((idx[r], tokenizer.decode(row, skip_special_tokens=True).strip()))
        bar.update(B * parallel.world_size())
    bar.close()
    _reshard(scorer, sharded)
    return [text for _, text in parallel.gather(done)]
