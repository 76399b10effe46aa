"""Loading, saving and the one plain training loop used by every MACPO stage: SFT (initialisation, negative
twins, toy pre-training) and the contrastive update (DPO + SFT on the positive).

    model, tokenizer = load_model("runs/toy/init/student", device="cpu")
    train(model, tokenizer, rows, kind="dpo", reference=reference_logps(model, tokenizer, rows, ...), ...)
"""
import contextlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

import data
import lora
import parallel

from data import collate, encode_many
from generate import ScoredLM, batch_logps, inference, is_sharded, packable, packed_logps, scored_logits, scorer_for
from losses import confident_loss, macpo_loss, sft_loss


class ModelLoadError(RuntimeError):
    """A model name or path that cannot be loaded; the message says what to download and where to put it."""


class NonFiniteError(RuntimeError):
    """A NaN or infinite loss or gradient norm: the stage stops, its checkpoint is not written."""


def load_model(name_or_path, device="cpu", trust_remote_code=False, new_lora=None):
    """Any causal LM through the Auto classes, from a local folder or the hub. bf16 on CUDA, float32 on CPU
    (this CPU runs bf16 matrix products 10-100x slower than fp32). Only safetensors / weights-only loading:
    transformers refuses pickled weights unless asked, and trust_remote_code stays off unless the user says so.
    new_lora = (targets, rank, alpha, dropout, seed): fresh adapters added (lora.add_lora), to a full-weight
    checkpoint only (a LoRA checkpoint brings its own)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    base = lora.base_model_of(name_or_path)
    if base is not None:
        # a LoRA checkpoint: its base model, then the adapters on top (a few MB instead of a whole model)
        model, tokenizer = load_model(base, device, trust_remote_code)
        lora.load_adapters(model, name_or_path)
        return model, tokenizer
    # a local folder with safetensors weights is read only through them, never through a pickle beside them
    safetensors = any((Path(name_or_path) / f).is_file() for f in ("model.safetensors", "model.safetensors.index.json"))
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(name_or_path, trust_remote_code=trust_remote_code,
                                                     **({"use_safetensors": True} if safetensors else {}))
    except (OSError, ValueError) as e:
        raise _load_error(name_or_path, e) from None
    data.ensure_pad_token(tokenizer)
    model = model.to(device=device, dtype=parallel.dtype_for(device))
    if new_lora:                                # after the cast: adapters stay float32 (lora.LoRALinear)
        lora.add_lora(model, *new_lora)
    return model, tokenizer


def _load_error(name_or_path, e):
    return ModelLoadError(
        f"cannot load model {name_or_path!r}: it is not a local model folder and the Hugging Face hub is not "
        f"reachable ({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}).\n"
        f"On a machine with network: `hf download {name_or_path} --local-dir models/{name_or_path}` "
        f"(`huggingface-cli download ...` with huggingface_hub before 0.34), copy models/{name_or_path} here and "
        f"pass that folder instead of the name.")


def check_model(name_or_path, trust_remote_code=False):
    """The model's config and tokenizer, without its weights: every model a run names is checked this way before
    any training, so a typo in the third teacher does not surface hours in -> the tokenizer."""
    from transformers import AutoConfig, AutoTokenizer
    if lora.base_model_of(name_or_path) is not None:
        return check_model(lora.base_model_of(name_or_path), trust_remote_code)
    try:
        AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
        return AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise _load_error(name_or_path, e) from None


def save_model(model, tokenizer, directory):
    """save_pretrained (safetensors) + tokenizer: loadable by anyone with transformers; a model with LoRA
    adapters saves only them, with its base's name or path (load_model puts the two back together); an
    FSDP-sharded one is streamed to disk one weight at a time (save_sharded). The caller
    writes into a temporary stage folder and renames it when complete, so a kill never leaves a checkpoint that
    looks done."""
    if lora.lora_modules(model):
        # the adapters only (a few MB), each gathered whole when sharded: a collective every rank joins
        tensors = {key: _whole(t) for key, t in lora.adapter_tensors(model).items()}
        if parallel.is_main():
            lora.save_adapters(model, directory, {"base_model": model.name_or_path}, tensors)
            tokenizer.save_pretrained(directory)
        return
    if is_sharded(model):
        save_sharded(model, directory)              # streamed: no rank holds the whole model at once
    elif parallel.is_main():
        model.save_pretrained(directory)
    if parallel.is_main():
        tokenizer.save_pretrained(directory)


# ---------------------------------------------------------------------------------------------------------
# Several processes. DDP: every rank holds the whole model and computes gradients on its share of each batch;
# an all-reduce averages them before the step (overlapped with the backward pass). FSDP (fully_shard): each
# decoder layer's parameters, gradients and optimizer state are split across ranks and gathered layer by
# layer when needed. The FSDP root is a ScoredLM around the model (generate.scorer_for finds it), so that
# training, generation, perplexity and reference log-probs all run through the root's hooks.

def wrap(model, mode):
    """-> the module the training loop runs forward through: ScoredLM(model), wrapped for `mode` when there
    are several processes. The model's own parameters are the ones trained (FSDP shards them in place); a
    model already sharded (load_sharded, or an earlier wrap) keeps its root."""
    if is_sharded(model):
        return scorer_for(model)
    scorer = ScoredLM(model)
    if parallel.world_size() == 1 or mode == "none":
        return scorer
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel
        device = next(model.parameters()).device
        return DistributedDataParallel(scorer, device_ids=[device] if device.type == "cuda" else None)
    return _shard(model)


def _shard_layers(model):
    """fully_shard every decoder layer (transformers names its class in model._no_split_modules): a layer's
    weights are all-gathered just before its forward and freed after it, so only one layer is ever whole."""
    from torch.distributed.fsdp import fully_shard
    layers = set(getattr(model, "_no_split_modules", None) or [])
    for module in model.modules():
        if type(module).__name__ in layers:
            fully_shard(module)


def _shard(model):
    """fully_shard every decoder layer, then the root: a ScoredLM around the model, holding the rest (embeddings,
    final norm, head; tied ones once) -> the root, also kept on the model for generate.scorer_for. Not an
    attribute a Module would register: the root holds the model, so that would be a cycle."""
    from torch.distributed.fsdp import fully_shard
    scorer = ScoredLM(model)
    _shard_layers(model)
    fully_shard(scorer)
    object.__setattr__(model, "_macpo_scorer", scorer)
    return scorer


def _whole(t):
    """A parameter whole: a DTensor (FSDP's shard) gathered, an all-gather every rank joins; a tensor as it is."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def full_state_dict(model):
    """None for an ordinary model; for an FSDP-sharded one the full weights, gathered onto rank 0's CPU."""
    if not is_sharded(model):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


# ---------------------------------------------------------------------------------------------------------
# A model larger than one device, sharded from loading to saving. load_sharded builds the model with no storage
# (the meta device), shards it, and has each rank read only its own rows of every weight from the safetensors
# files; save_sharded gathers one weight at a time and streams it to disk from rank 0. Neither ever holds the
# whole model on any rank: a rank holds its 1/W of the weights plus, while saving, one whole weight and at most
# one file's worth of them (rank 0).

def load_sharded(name_or_path, device="cpu", trust_remote_code=False, new_lora=None):
    """A causal LM from a local folder with safetensors weights (model.safetensors or model.safetensors.index.json),
    split across the torchrun ranks as it loads -> (model, tokenizer). Every decoder layer and then the root are
    fully_shard-ed (FSDP2), so each parameter is a DTensor whose dim 0 is cut across the ranks as torch.chunk cuts
    it; model(...) gathers one layer at a time. Every rank calls this (the sharding is collective); with one
    process it is load_model. dtype as load_model: bf16 on CUDA, float32 on CPU. Weights missing from the
    checkpoint, or checkpoint tensors the model has no place for, are an error (from_pretrained would initialise
    the first at random). Its forward passes go through its FSDP root (generate.scorer_for): generate,
    perplexity, reference_logps and train() take it as they take any model.
    LoRA: a LoRA checkpoint (adapter_config.json) loads its base sharded and its adapters into their shards;
    new_lora = (targets, rank, alpha, dropout, seed) adds fresh adapters (B = 0, so the model is its base; A is
    lora.initial_A, the very values one process starts from). Either
    way the adapters are added on the meta device, before sharding, so that FSDP shards them with their layers
    and reduces their gradients; they stay float32 (lora.LoRALinear)."""
    adapters = None
    if lora.base_model_of(name_or_path) is not None:       # a LoRA checkpoint: its base, then its adapters
        adapters = Path(name_or_path)
        config = json.loads((adapters / lora.CONFIG_NAME).read_text())
        name_or_path, new_lora = lora.base_model_of(adapters), (tuple(config["targets"]), config["rank"],
                                                               config["alpha"], config["dropout"], 0)
    if parallel.world_size() == 1:                          # one process: nothing to share out
        return load_model(str(adapters or name_or_path), device, trust_remote_code, None if adapters else new_lora)
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig
    folder = Path(name_or_path)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (folder / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise ModelLoadError(f"load_sharded reads a local folder with safetensors weights (model.safetensors or "
                             f"model.safetensors.index.json); {str(folder)!r} has neither. Download the model first "
                             f"(`hf download NAME --local-dir models/NAME`) and pass that folder.")
    config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    with torch.device("meta"):                         # shapes and dtypes only, no storage, no random init
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    model.to(parallel.dtype_for(device))                 # still on meta; buffers too, as load_model's .to(dtype)
    if new_lora:
        lora.add_lora(model, *new_lora)                  # on meta too; float32 adapters, filled below
    _shard(model)
    model.to_empty(device=device)                        # each rank's shards get (uninitialised) storage
    # Persistent entries (parameters and saved buffers) by tensor: a tied lm_head.weight is the same Parameter
    # as embed_tokens.weight, and a checkpoint holds it under either name or both.
    persistent = set(model.state_dict().keys())          # DTensors are not gathered by state_dict
    names, adapter_params = {}, {}
    for name, t in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
        if name.endswith((".lora_A", ".lora_B")):
            adapter_params[name] = t
        elif name in persistent:                          # a LoRA-wrapped layer's weight: ".base." in the model only
            names.setdefault(id(t), (t, []))[1].append(name.replace(".base.", "."))
    with contextlib.ExitStack() as stack:
        handles = [stack.enter_context(safe_open(folder / f, framework="pt", device="cpu")) for f in files]
        where = {key: h for h in handles for key in h.keys()}           # tensor name -> its open file (headers only)
        missing = [aliases[0] for _, aliases in names.values() if not any(a in where for a in aliases)]
        # transformers moved rotary_emb.inv_freq out of each layer and stopped saving it; old checkpoints
        # still carry it, and from_pretrained ignores it too
        known = {a for _, aliases in names.values() for a in aliases}
        unexpected = [k for k in where if k not in known and not k.endswith("rotary_emb.inv_freq")]
        if missing or unexpected:
            raise ModelLoadError(f"{folder}: the checkpoint does not match {type(model).__name__.removeprefix('FSDP')}: "
                                 f"{len(missing)} weights missing {missing[:4]}, {len(unexpected)} unexpected "
                                 f"{unexpected[:4]}")
        with torch.no_grad():
            for t, aliases in names.values():
                key = next(a for a in aliases if a in where)
                piece = where[key].get_slice(key)                       # lazy: nothing read yet
                if list(piece.get_shape()) != list(t.shape):
                    raise ModelLoadError(f"{folder}: {key} has shape {piece.get_shape()}, the model expects {list(t.shape)}")
                if not hasattr(t, "full_tensor"):                       # a plain (replicated) buffer: read whole
                    t.copy_(where[key].get_tensor(key))
                    continue
                # a DTensor sharded on dim 0 over a 1-D mesh (fully_shard's Shard(0)); its local tensor is
                # [stop - start, ...], a view of FSDP's storage, so copy_ writes this rank's shard in place
                assert len(t.placements) == 1 and t.placements[0].is_shard(0), t.placements
                mesh = t.device_mesh
                start, stop = parallel.chunk_bounds(t.shape[0], mesh.get_local_rank(), mesh.size())
                local = t.to_local()
                assert local.shape[0] == stop - start, (key, local.shape, start, stop)
                local.copy_(piece[start:stop])                          # reads only rows [start, stop), cast to
                                                                        # the model's dtype
    if adapter_params:
        _fill_adapters(adapter_params, adapters, new_lora[4])
    # Buffers not in the checkpoint (persistent=False) were made on meta and are uninitialised now: Llama's
    # rotary inv_freq [head_dim / 2] and original_inv_freq. transformers' own initialiser recomputes them from the
    # config (what from_pretrained does for them in transformers 5); any other such buffer we would not know how
    # to fill, so it is an error rather than garbage.
    for prefix, module in model.named_modules():
        unsaved = [b for b, _ in module.named_buffers(prefix=prefix, recurse=False) if b not in persistent]
        if unsaved:
            if "RotaryEmbedding" not in type(module).__name__:
                raise NotImplementedError(f"load_sharded: {unsaved} of {type(module).__name__} is not saved in "
                                          f"checkpoints and load_sharded does not know how to rebuild it")
            model._init_weights(module)
    if (folder / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(folder)
    tokenizer = data.ensure_pad_token(AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code))
    return model.eval(), tokenizer


def _fill_adapters(params, adapters, seed):
    """Each rank's rows of every LoRA adapter {name: DTensor}: from the adapter checkpoint folder `adapters`
    (safetensors, keys "<module>.lora_A" / ".lora_B", as lora.save_adapters writes them), or, when None, fresh:
    A = lora.initial_A(seed, module name), the same whole A on every rank and in one process, B = 0."""
    from safetensors import safe_open
    with contextlib.ExitStack() as stack:
        f = stack.enter_context(safe_open(adapters / lora.WEIGHTS_NAME, framework="pt", device="cpu")) if adapters else None
        if f is not None and set(f.keys()) != set(params):
            raise ModelLoadError(f"{adapters}: adapter keys {sorted(set(f.keys()) ^ set(params))[:4]} do not match the "
                                 f"model's adapters")
        with torch.no_grad():
            for name, t in params.items():
                start, stop = parallel.chunk_bounds(t.shape[0], t.device_mesh.get_local_rank(), t.device_mesh.size())
                if f is not None:
                    rows = f.get_slice(name)[start:stop]
                elif name.endswith(".lora_A"):
                    rows = lora.initial_A(seed, name.removesuffix(".lora_A"), *t.shape)[start:stop]
                else:
                    rows = torch.zeros((stop - start, *t.shape[1:]))
                t.to_local().copy_(rows)


def save_sharded(model, directory, max_shard_bytes=5 * 2**30):
    """An FSDP-sharded model's weights -> `directory` as save_pretrained writes them (config.json,
    generation_config.json, model.safetensors, or model-0000i-of-0000n.safetensors files plus
    model.safetensors.index.json when they pass max_shard_bytes), so from_pretrained and load_sharded read it.
    Every rank calls this: each weight is gathered whole (full_tensor, an all-gather every rank joins, in the same
    order) one at a time, and rank 0 keeps at most one file's worth (or one weight larger than that) before
    writing it, so no rank ever holds the whole model."""
    from safetensors.torch import save_file
    # Tied weights once, under their first name (model.embed_tokens.weight before lm_head.weight), as
    # save_pretrained does; keep_vars keeps the Parameters themselves, so a tied pair is one object.
    state, seen = {}, set()
    for name, t in model.state_dict(keep_vars=True).items():
        if id(t) not in seen:
            seen.add(id(t))
            state[name] = t
    # The files are planned from shapes alone (a DTensor's numel is the whole weight's), so their names are
    # known before anything is gathered.
    files, size = [[]], 0
    for name, t in state.items():
        nbytes = t.numel() * t.element_size()
        if files[-1] and size + nbytes > max_shard_bytes:
            files.append([])
            size = 0
        files[-1].append(name)
        size += nbytes
    n = len(files)
    filenames = ["model.safetensors"] if n == 1 else [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    directory = Path(directory)
    if parallel.is_main():
        directory.mkdir(parents=True, exist_ok=True)
        # weights of an earlier save here would be read instead of (model.safetensors) or beside the new ones
        for old in [*directory.glob("model.safetensors*"), *directory.glob("model-?????-of-?????.safetensors")]:
            old.unlink()
    with torch.no_grad():
        for filename, keys in zip(filenames, files):
            tensors = {}
            for key in keys:
                t = state[key]
                whole = _whole(t)                        # [whole shape] on every rank
                if parallel.is_main():
                    tensors[key] = whole.detach().to("cpu").contiguous()
                del whole                                # other ranks free it at once
            if parallel.is_main():
                save_file(tensors, directory / filename, metadata={"format": "pt"})
            del tensors
    if not parallel.is_main():
        return
    if n > 1:
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values()),
                              "total_parameters": sum(p.numel() for p in model.parameters())},
                 "weight_map": {key: f for f, keys in zip(filenames, files) for key in keys}}
        (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    # as save_pretrained: the weights' dtype and the plain class name (fully_shard makes it FSDPLlamaForCausalLM)
    model.config.dtype = str(next(model.parameters()).dtype).split(".")[1]
    model.config.architectures = [type(model).__name__.removeprefix("FSDP")]
    model.config.save_pretrained(directory)
    if model.can_generate():
        model.generation_config.save_pretrained(directory)


def _encode_rows(tokenizer, rows, max_length, max_prompt_length):
    """rows: [(prompt_text, chosen, rejected or None)] -> chosen encodings, rejected encodings (or None)."""
    prompts = [p for p, _, _ in rows]
    chosen = encode_many(tokenizer, prompts, [c for _, c, _ in rows], max_length, max_prompt_length)
    rejected = None
    if rows and rows[0][2] is not None:
        rejected = encode_many(tokenizer, prompts, [r for _, _, r in rows], max_length, max_prompt_length)
    return chosen, rejected


@inference
def reference_logps(model, tokenizer, rows, batch_size=32, max_length=1024, max_prompt_length=None):
    """Summed log-probs of every chosen and rejected response under the reference model: two [N] float32
    tensors on the CPU. Computed once before the update, so the reference model need not stay in memory.
    A chosen and a rejected response to one prompt are scored against one pass of it (packed_logps)."""
    chosen, rejected = _encode_rows(tokenizer, rows, max_length, max_prompt_length)
    logps, _ = packed_logps(model, chosen + rejected, data.pad_id(tokenizer), batch_size, max_length)
    return logps[:len(chosen)], logps[len(chosen):]


def _bucketed_batches(lengths, batch_size, generator, window=16):
    """Shuffled batches of similar-length rows: shuffle, sort each window of `window` batches by length, cut,
    then shuffle the batch order. Padding (wasted compute) shrinks while the data order stays random."""
    perm = torch.randperm(len(lengths), generator=generator).tolist()
    batches = []
    for s in range(0, len(perm), batch_size * window):
        chunk = sorted(perm[s:s + batch_size * window], key=lambda i: lengths[i])
        batches += [chunk[j:j + batch_size] for j in range(0, len(chunk), batch_size)]
    return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]


@dataclass
class TrainSettings:
    """How one stage trains; train() reads nothing else. The stages fill it from macpo.Config."""
    kind: str = "sft"               # "sft": sft_loss on the chosen side; "dpo": macpo_loss (DPO + sft_weight x
                                    # SFT on chosen); "confident": Burns et al.'s confidence loss on the chosen side
    epochs: int = 1
    lr: float = 1e-5                # AdamW; linear warm-up, then cosine decay to 0 (the release: cosine, no warm-up)
    batch_size: int = 16            # rows per forward pass (all ranks together)
    grad_accum: int = 1             # forward passes per optimizer step
    max_length: int = 1024          # tokens per (prompt, response), prompt cut first (data.encode)
    max_prompt_length: int = None   # None = max_length // 2
    beta: float = 0.1               # DPO's beta
    sft_weight: float = 0.2         # the SFT term's weight in macpo_loss (the release's dpo_ftx)
    loss_type: str = "sigmoid"      # losses.dpo_loss's variants
    label_smoothing: float = 0.0
    warmup_ratio: float = 0.0
    weight_decay: float = 0.0
    grad_clip: float = 1.0          # 0 = no clipping (the norm is still logged)
    seed: int = 0                   # the data order
    log_every: int = 10             # optimizer steps between logged (and synchronised) statistics
    desc: str = "train"             # the stage's name in the progress bar, the log and error messages
    progress: bool = True
    confident_weight: float = 0.75  # kind="confident": alpha_max, warmed up linearly over the first
    confident_warmup: float = 0.2   # confident_warmup share of the steps (Burns et al. 2023: 0.75, 20%)
    parallel_mode: str = "ddp"      # several processes: "ddp" or "fsdp" (wrap)
    share_prompts: bool = True      # dpo: a pair's chosen and rejected follow one pass of their prompt
                                    # (generate.pack_rows); False = the [2B, T] padded batch (kept to compare)
    length_window: int = 16         # batches are cut from windows of this many batches sorted by length (less
                                    # padding); 1 keeps every batch a uniform sample, which pre-training on
                                    # mixed kinds of rows needs (when length tells kinds apart, sorted batches
                                    # each hold mostly one kind)


class _FiniteWatch:
    """Finds the first optimizer step whose loss or gradient norm was NaN or infinite, without a device sync
    per step: each step's flag stays on the device until the logged statistics show a non-finite value."""

    def __init__(self, desc, total_steps):
        self.desc, self.total_steps, self.steps = desc, total_steps, []

    def add(self, step, batch, rows, loss_sum, grad_norm):
        # the running loss sum stays non-finite once a NaN/inf enters it, so the first False names the step
        self.steps.append((step, batch, rows, torch.isfinite(grad_norm) & torch.isfinite(loss_sum)))

    def check(self, row):
        """Raise NonFiniteError naming the step when the logged row is not finite; forget the steps logged."""
        if not all(math.isfinite(v) for v in row.values()):
            ok = torch.stack([c[-1] for c in self.steps]).tolist()
            step, batch, rows, _ = self.steps[ok.index(False) if False in ok else -1]
            raise NonFiniteError(f"{self.desc}: non-finite loss or gradient at optimizer step {step} of "
                                 f"{self.total_steps} (batch {batch}, rows {rows[:8]}): {row}. The stage is "
                                 f"stopped and not saved; the previous stage's checkpoint is intact. Try a lower "
                                 f"--lr.")
        self.steps = []

    def check_weights(self, params):
        # The last update can overflow the weights even when its loss and gradient were finite: a model with a
        # non-finite weight is never returned, so never saved.
        if not bool(torch.stack([torch.isfinite(getattr(p, "_local_tensor", p)).all() for p in params]).all()):
            raise NonFiniteError(f"{self.desc}: non-finite weights after the last optimizer step ({self.total_steps}). "
                                 f"The stage is stopped and not saved; the previous stage's checkpoint is intact. "
                                 f"Try a lower --lr.")


def train(model, tokenizer, rows, settings, reference=None, log_file=None):
    """Train `model` in place on rows [(prompt_text, chosen, rejected)] as `settings` (TrainSettings) say and
    return the list of logged stats. kind="dpo" needs `reference`: the pair of [N] tensors from reference_logps,
    aligned with rows. Each example's loss is averaged over the batch (sft: sft_loss, the mean token NLL).
    Statistics stay on the device and are read (.item(), a sync) only every log_every optimizer steps.
    Under torchrun every rank builds the same global batches and takes its share of each (parallel_mode ddp
    or fsdp decides how gradients and state are shared); the update equals one process's on the whole batch.
    """
    s = settings
    assert s.kind in ("sft", "dpo", "confident")
    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    pad_id = data.pad_id(tokenizer)
    pack = s.kind == "dpo" and s.share_prompts and packable(model)
    chosen, rejected = _encode_rows(tokenizer, rows, s.max_length, s.max_prompt_length)
    if s.kind == "dpo":
        assert rejected is not None and reference is not None, "a preference update needs rejected responses and reference log-probs"
        reference_chosen, reference_rejected = (r.to(device) for r in reference)
    lengths = [len(c[0]) + (len(rejected[i][0]) if rejected else 0) for i, c in enumerate(chosen)]
    generator = torch.Generator().manual_seed(s.seed)
    # LoRA dropout draws from torch's global generator: reseeded here so that a stage is repeatable too (a side
    # effect on the caller's generator; every rank gets the same seed, so ranks share dropout masks)
    torch.manual_seed(s.seed)
    batches = [b for _ in range(s.epochs) for b in _bucketed_batches(lengths, s.batch_size, generator, s.length_window)]
    total_steps = max(1, math.ceil(len(batches) / s.grad_accum))
    warmup = int(s.warmup_ratio * total_steps)
    scorer = wrap(model, s.parallel_mode)        # after this, FSDP's parameters are the sharded ones
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=s.lr, weight_decay=s.weight_decay)
    # lr(step) = lr * step / warmup during warm-up, then lr * (1 + cos(pi * progress)) / 2
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda t: (t + 1) / (warmup + 1) if t < warmup else
                                                 0.5 * (1 + math.cos(math.pi * (t - warmup) / max(1, total_steps - warmup))))
    model.train()
    logged, sums, grad_norms, n_logged, tokens, t0 = [], {}, [], 0, 0, time.time()
    watch = _FiniteWatch(s.desc, total_steps)
    bar = tqdm(total=total_steps, desc=s.desc, disable=not s.progress or not parallel.is_main(), leave=False)
    step = 0
    for i, global_idx in enumerate(batches):
        # this rank's rows of the global batch; a rank left without rows runs one with weight 0 so that every
        # rank joins the gradient all-reduce. Loss = sum over my rows x W / |global batch|, so the average
        # over ranks that DDP / FSDP take is the mean over the global batch.
        idx = parallel.mine(global_idx) or global_idx[:1]
        weight = (len(parallel.mine(global_idx)) > 0) * parallel.world_size() / len(global_idx)
        if s.kind == "confident":                   # token-level: it needs the logits, not summed log-probs
            b = collate([chosen[j] for j in idx], pad_id)
            logits, targets, example_ids = scored_logits(scorer, b["input_ids"].to(device),
                                                         b["attention_mask"].to(device), b["loss_mask"])
            alpha = s.confident_weight * min(1.0, step / max(1.0, s.confident_warmup * total_steps))
            losses, stats = confident_loss(logits, targets, example_ids, len(idx), alpha)
            stats["alpha"] = torch.full_like(losses, alpha)
            tokens += int(b["attention_mask"].sum())
        elif s.kind == "sft":
            logps, n, ran = batch_logps(scorer, [chosen[j] for j in idx], pad_id, False, 0, dtype, device)
            losses, tokens = sft_loss(logps, n), tokens + ran
            stats = {"sft": losses.detach()}
        else:                                       # dpo: [2B] log-probs, chosen first (rows i and B + i a pair)
            logps, n, ran = batch_logps(scorer, [chosen[j] for j in idx] + [rejected[j] for j in idx], pad_id,
                                         pack, 2 * s.max_length, dtype, device)
            B, j = len(idx), torch.tensor(idx, device=device)
            losses, stats = macpo_loss(logps[:B], logps[B:], reference_chosen[j], reference_rejected[j], n[:B],
                                       beta=s.beta, sft_weight=s.sft_weight, label_smoothing=s.label_smoothing,
                                       loss_type=s.loss_type)
            tokens += ran
        (losses.sum() * weight / s.grad_accum).backward()
        for k, v in [("loss", losses.detach())] + list(stats.items()):
            sums[k] = sums.get(k, 0.0) + v.float().mean()
        n_logged += 1
        if (i + 1) % s.grad_accum and i + 1 < len(batches):
            continue
        grad_norm = torch.nn.utils.clip_grad_norm_(params, s.grad_clip if s.grad_clip > 0 else float("inf"))
        grad_norms.append(grad_norm)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        watch.add(step, i, idx, sums["loss"], grad_norm)
        bar.update(1)
        if step == 1 or step % s.log_every == 0 or step == total_steps:
            means = parallel.mean(torch.stack([v / n_logged for v in sums.values()]))    # over ranks
            row = dict(zip(sums, means.tolist()))
            row["grad_norm"] = float(torch.stack(grad_norms).mean())
            watch.check(row)
            row.update(step=step, lr=schedule.get_last_lr()[0], tokens_per_s=tokens / (time.time() - t0))
            logged.append(row)
            if log_file is not None and parallel.is_main():
                log_file.write(json.dumps({"stage": s.desc, **row}) + "\n")
            bar.set_postfix({k: f"{row[k]:.3g}" for k in ("loss", "accuracy", "margin") if k in row}
                            | {"tok/s": f"{row['tokens_per_s']:.0f}"})
            sums, grad_norms, n_logged = {}, [], 0
    bar.close()
    watch.check_weights(params)
    model.eval()
    return logged
