"""LoRA, written out: low-rank adapters on chosen nn.Linear layers of any transformers causal LM.

The paper aligns its 70B student with LoRA (Hu et al. 2021, arXiv:2106.09685): rank-8 adapters on q_proj and
v_proj, alpha 16, no dropout, the release's defaults. A wrapped layer computes

    y = W x + b + (alpha / r) * B A dropout(x)        A: [r, in], B: [out, r], B = 0 at the start

so an adapted model starts out exactly equal to its base. Only A and B train; the base stays frozen.

    names = add_lora(model)                          # wrap q_proj / v_proj, freeze everything else
    opt = torch.optim.AdamW(p for p in model.parameters() if p.requires_grad)    # the adapters only
    with adapters_disabled(model): ...               # the base model again: DPO reference log-probs, no 2nd copy
    save_adapters(model, "out/adapter", {"base_model": "meta-llama/Llama-2-70b-hf"})
    load_adapters(model, "out/adapter")
    merge_adapters(model); model.save_pretrained("out/merged")   # a plain checkpoint, no LoRA code needed

Needs torch and safetensors; from the project only data.atomic_write (a checkpoint is never half-written).
"""
import json
import math
import os
import zlib
from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from data import atomic_write

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"


class LoRALinear(nn.Module):
    """A frozen nn.Linear `base` plus a trainable low-rank update scaling * B @ A; `enabled = False` gives
    exactly the base layer's output."""

    def __init__(self, base, rank=8, alpha=16, dropout=0.0, seed=0, name=""):
        super().__init__()
        self.base = base
        self.rank, self.alpha = rank, alpha
        self.scaling = alpha / rank
        self.dropout = nn.Dropout(dropout)
        self.enabled = True
        # The adapters live in float32 even when the base is bf16: AdamW steps on a bf16 weight round away
        # updates smaller than ~1/256 of it. They are tiny (r * (in + out) per layer), so this costs nothing.
        device = base.weight.device
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=device, dtype=torch.float32))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=device, dtype=torch.float32))
        # A: random (initial_A, from `seed` and the module's `name`); B: zeros, so B A = 0 and training starts
        # from the base model exactly (LoRA paper, section 4.1). On the meta device (sharding.load_sharded) there
        # is no storage yet: each rank later writes its rows of the same initial_A.
        if device.type != "meta":
            with torch.no_grad():
                self.lora_A.copy_(initial_A(seed, name, rank, base.in_features))

    def forward(self, x):                                      # x: [..., in]
        y = self.base(x)                                       # [..., out]
        if not self.enabled:
            return y
        h = self.dropout(x).to(self.lora_A.dtype)
        # y + (alpha / r) * x A^T B^T, computed in float32 and added back in the base's dtype
        return y + (self.scaling * F.linear(F.linear(h, self.lora_A), self.lora_B)).to(y.dtype)


def initial_A(seed, name, rank, in_features):
    """A's starting value [rank, in_features] for the adapter on module `name`: kaiming-uniform (a = sqrt(5)),
    nn.Linear's own init and the reference loralib's choice, drawn from a generator seeded by (seed, name) rather
    than from torch's global one. So a stage's adapters start the same in every process, whatever ran before it
    there, and a sharded model (each rank cuts its rows from this tensor) starts where one process does. With
    the global generator two runs of one command started from different adapters: the toy's naive student
    moved by up to 0.12 between them."""
    generator = torch.Generator().manual_seed(zlib.crc32(f"{seed}/{name}".encode()))
    return nn.init.kaiming_uniform_(torch.empty(rank, in_features, dtype=torch.float32, device="cpu"), a=math.sqrt(5),
                                    generator=generator)


def lora_modules(model):
    """(module name, LoRALinear) for every adapter in the model, in module order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, LoRALinear)]


def adapter_tensors(model):
    """{"<module name>.lora_A" / ".lora_B": parameter} for every adapter: the keys of adapter_model.safetensors."""
    return {f"{name}.{kind}": getattr(m, kind) for name, m in lora_modules(model) for kind in ("lora_A", "lora_B")}


def _replace(model, name, new):
    """Put `new` where the submodule called `name` (dotted path) sits."""
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, new)


def add_lora(model, targets=("q_proj", "v_proj"), rank=8, alpha=16, dropout=0.0, seed=0):
    """Wrap every nn.Linear whose last name component is in `targets` ("model.layers.3.self_attn.q_proj"
    matches "q_proj"; "dq_proj" does not) in a LoRALinear, and freeze every other parameter. `seed` decides the
    adapters' starting A (initial_A): the same seed gives the same adapters in any process.
    Returns the wrapped module names. Fails before touching the model when nothing matches."""
    if lora_modules(model):
        raise ValueError("the model already has LoRA adapters; merge_adapters first or load onto a fresh model")
    linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    names = [name for name in linears if name.rpartition(".")[2] in targets]
    if not names:
        raise ValueError(f"no nn.Linear module is named like any of the LoRA targets {list(targets)}; "
                         f"some Linear modules of this model: {linears[:8]}")
    # A tied weight (lm_head sharing the embedding matrix) would make merge_adapters change the other
    # module as well; refuse instead of silently rewriting it.
    owners = {}
    for pname, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(pname)
    for name in names:
        shared = owners[id(model.get_submodule(name).weight)]
        if len(shared) > 1:
            raise ValueError(f"LoRA target {name} shares its weight with {shared}; leave it out of the targets")

    for p in model.parameters():
        p.requires_grad_(False)
    for name in names:                          # new parameters: requires_grad True, the only trainable ones
        _replace(model, name, LoRALinear(model.get_submodule(name), rank, alpha, dropout, seed, name))
    return names


@contextmanager
def adapters_disabled(model):
    """Inside the block the model computes exactly its base model; the adapters' previous on/off states come
    back afterwards, also when the block raises."""
    modules = [m for _, m in lora_modules(model)]
    states = [m.enabled for m in modules]
    for m in modules:
        m.enabled = False
    try:
        yield model
    finally:
        for m, state in zip(modules, states):
            m.enabled = state


def _lora_settings(model):
    """rank, alpha, dropout and targets read off the model's adapters (add_lora makes them all alike)."""
    modules = lora_modules(model)
    if not modules:
        raise ValueError("the model has no LoRA adapters (call add_lora or load_adapters first)")
    settings = {(m.rank, m.alpha, m.dropout.p) for _, m in modules}
    if len(settings) > 1:
        raise ValueError(f"adapters with different rank/alpha/dropout {sorted(settings)}; one config can't hold them")
    rank, alpha, dropout = settings.pop()
    targets = sorted({name.rpartition(".")[2] for name, _ in modules})
    return {"rank": rank, "alpha": alpha, "dropout": dropout, "targets": targets}


def save_adapters(model, directory, config_dict=None, tensors=None):
    """Adapter weights -> directory/adapter_model.safetensors (keys "<module name>.lora_A" / ".lora_B") and
    the settings -> directory/adapter_config.json. The settings are read off the model; `config_dict` adds
    fields such as {"base_model": name or path} and may not contradict them. `tensors`: the weights under
    those keys when the model's own are not whole (sharded: train.save_model gathers them)."""
    config, extra = _lora_settings(model), dict(config_dict or {})
    for key in ("rank", "alpha", "dropout"):
        if key in extra and extra[key] != config[key]:
            raise ValueError(f"save_adapters: config {key}={extra[key]!r} but the model's adapters have {config[key]!r}")
    # The targets written are those that matched a module, a subset of the ones asked for.
    if "targets" in extra and not set(config["targets"]) <= set(extra["targets"]):
        raise ValueError(f"save_adapters: config targets {extra['targets']} but the model adapts {config['targets']}")
    config = {**extra, **config}
    tensors = {k: v.detach().contiguous() for k, v in (adapter_tensors(model) if tensors is None else tensors).items()}
    os.makedirs(directory, exist_ok=True)
    atomic_write(os.path.join(directory, WEIGHTS_NAME), lambda tmp: save_file(tensors, tmp))

    def write_config(tmp):
        with open(tmp, "w") as f:
            json.dump(config, f, indent=2)
    atomic_write(os.path.join(directory, CONFIG_NAME), write_config)


def base_model_of(path):
    """The base model an adapter checkpoint folder was trained on (its adapter_config.json), or None when
    `path` is not an adapter checkpoint."""
    config = os.path.join(str(path), CONFIG_NAME)
    return json.load(open(config))["base_model"] if os.path.isfile(config) else None


def load_adapters(model, directory):
    """Adapter weights from `directory` (safetensors only, never pickle) into the model, adding the adapters
    described by adapter_config.json first when the model has none. Strict: a missing or unexpected key, or a
    shape that differs, is an error naming the file. Returns the config dict."""
    with open(os.path.join(directory, CONFIG_NAME)) as f:
        config = json.load(f)
    if not lora_modules(model):
        add_lora(model, tuple(config["targets"]), config["rank"], config["alpha"], config["dropout"])
    path = os.path.join(directory, WEIGHTS_NAME)
    tensors = load_file(path)
    params = {f"{name}.{kind}": getattr(m, kind) for name, m in lora_modules(model) for kind in ("lora_A", "lora_B")}
    missing, unexpected = sorted(params.keys() - tensors.keys()), sorted(tensors.keys() - params.keys())
    if missing or unexpected:
        raise ValueError(f"{path}: missing adapter keys {missing[:4]}, unexpected keys {unexpected[:4]} "
                         f"({len(missing)} missing, {len(unexpected)} unexpected)")
    with torch.no_grad():
        for key, p in params.items():
            # copy_ would broadcast a [1, in] tensor into [r, in] without a word; check shapes ourselves.
            if tensors[key].shape != p.shape:
                raise ValueError(f"{path}: {key} has shape {list(tensors[key].shape)}, the model expects {list(p.shape)}")
            p.copy_(tensors[key])
    return config


def merge_adapters(model):
    """W <- W + (alpha / r) * B @ A for every adapter, then put the plain nn.Linear back, so the model is an
    ordinary transformers model again and save_pretrained writes a checkpoint anyone can load. The base
    weights keep requires_grad False."""
    with torch.no_grad():
        for name, m in lora_modules(model):
            W = m.base.weight                                             # [out, in]
            W += (m.scaling * (m.lora_B @ m.lora_A)).to(W.dtype)          # [out, r] @ [r, in], in float32
            _replace(model, name, m.base)
    return model
