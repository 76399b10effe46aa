"""A model over several processes (torchrun): DDP or FSDP wrapping for training, and a model larger than one
device sharded from loading to saving.

    scorer = wrap(model, "fsdp")                     # what the training loop runs forward through
    model, tokenizer = load_sharded("models/Llama-2-70b-hf", "cuda:0")     # each rank reads only its rows
    save_sharded(model, "runs/paper/round1/student")                         # streamed, one weight at a time

With one process nothing here is used: train.train wraps in a plain ScoredLM and stages.load_agent calls
train.load_model. docs/scaling.md says when to use which and what each costs in memory.
"""
import contextlib
import json
from pathlib import Path

import torch

import data
import lora
import parallel
from data import ModelLoadError
from generate import ScoredLM, is_sharded, scorer_for


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


def whole(t):
    """A parameter whole: a DTensor (FSDP's shard) gathered, an all-gather every rank joins; a tensor as it is."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


# ---------------------------------------------------------------------------------------------------------
# A model larger than one device, sharded from loading to saving. load_sharded builds the model with no storage
# (the meta device), shards it, and has each rank read only its own rows of every weight from the safetensors
# files; save_sharded gathers one weight at a time and streams it to disk from rank 0. Neither ever holds the
# whole model on any rank: a rank holds its 1/W of the weights plus, while saving, one whole weight and at most
# one file's worth of them (rank 0).

def load_sharded(name_or_path, device="cpu", trust_remote_code=False, new_lora=None, dtype="auto"):
    """A causal LM from a local folder with safetensors weights (model.safetensors or model.safetensors.index.json),
    split across the torchrun ranks as it loads -> (model, tokenizer). Every decoder layer and then the root are
    fully_shard-ed (FSDP2), so each parameter is a DTensor whose dim 0 is cut across the ranks as torch.chunk cuts
    it; model(...) gathers one layer at a time. Every rank calls this (the sharding is collective); with one
    process use train.load_model. dtype (--dtype) as load_model: "auto" is bf16 on CUDA, float32 on CPU. Weights missing from the
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
        # built in the weights' dtype, as load_model's from_pretrained: the rotary buffers stay float32
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code,
                                                 **parallel.dtype_kwargs(device, dtype))
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
                gathered = whole(t)                      # [whole shape] on every rank
                if parallel.is_main():
                    tensors[key] = gathered.detach().to("cpu").contiguous()
                del gathered                             # other ranks free it at once
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
