"""Loading, saving and the one plain training loop used by every MACPO stage: SFT (initialisation, negative
twins, toy pre-training) and the contrastive update (DPO + SFT on the positive).

    model, tokenizer = load_model("runs/toy/init/student", device="cpu")
    reference = generate.reference_logps(model, tokenizer, rows)     # before the update
    train(model, tokenizer, rows, TrainSettings(kind="dpo", lr=1e-5), reference=reference)
"""
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
from data import ModelLoadError, collate, encode_rows
from generate import activation_dtype, batch_logps, is_sharded, packable, scored_logits
from losses import confident_loss, dpo_loss, sft_loss
from sharding import save_sharded, whole, wrap


class NonFiniteError(RuntimeError):
    """A NaN or infinite loss or gradient norm: the stage stops, its checkpoint is not written."""


def load_model(name_or_path, device="cpu", trust_remote_code=False, new_lora=None, dtype="auto"):
    """Any causal LM through the Auto classes, from a local folder or the hub, its weights in `dtype` (--dtype:
    "auto" is bf16 on CUDA, float32 on CPU, where bf16 matrix products run 10-100x slower; parallel.dtype_for),
    whatever dtype the checkpoint was saved in. Only safetensors / weights-only loading:
    transformers refuses pickled weights unless asked, and trust_remote_code stays off unless the user says so.
    new_lora = (targets, rank, alpha, dropout, seed): fresh adapters added (lora.add_lora), to a full-weight
    checkpoint only (a LoRA checkpoint brings its own)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    base = lora.base_model_of(name_or_path)
    if base is not None:
        # a LoRA checkpoint: its base model, then the adapters on top (a few MB instead of a whole model)
        model, tokenizer = load_model(base, device, trust_remote_code, dtype=dtype)
        lora.load_adapters(model, name_or_path)
        return model, tokenizer
    # a local folder with safetensors weights is read only through them, never through a pickle beside them
    safetensors = any((Path(name_or_path) / f).is_file() for f in ("model.safetensors", "model.safetensors.index.json"))
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(name_or_path, trust_remote_code=trust_remote_code,
                                                     **({"use_safetensors": True} if safetensors else {}),
                                                     **parallel.dtype_kwargs(device, dtype))
    except (OSError, ValueError) as e:
        raise _load_error(name_or_path, e) from None
    data.ensure_pad_token(tokenizer)
    model = model.to(device)
    if new_lora:                                # adapters are float32 whatever the weights' dtype (lora.LoRALinear)
        lora.add_lora(model, *new_lora)
    return model, tokenizer


def _load_error(name_or_path, e):
    return ModelLoadError(
        f"cannot load model {name_or_path!r}: it is not a local model folder and the Hugging Face hub is not "
        f"reachable ({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}).\n"
        f"On a machine with network: `hf download {name_or_path} --local-dir models/{name_or_path}` "
        f"(`huggingface-cli download ...` with huggingface_hub before 0.34), copy models/{name_or_path} here and "
        f"pass that folder instead of the name.")


def check_model(name_or_path, trust_remote_code=False, local_files_only=False):
    """The model's config and tokenizer, without its weights: every model a run names is checked this way before
    any training, so a typo in the third teacher does not surface hours in -> the tokenizer. local_files_only:
    a local folder or the hub cache, no request (the hub is unreachable)."""
    from transformers import AutoConfig, AutoTokenizer
    if lora.base_model_of(name_or_path) is not None:
        return check_model(lora.base_model_of(name_or_path), trust_remote_code, local_files_only)
    local = {"trust_remote_code": trust_remote_code, "local_files_only": local_files_only}
    try:
        AutoConfig.from_pretrained(name_or_path, **local)
        return AutoTokenizer.from_pretrained(name_or_path, **local)
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
        tensors = {key: whole(t) for key, t in lora.adapter_tensors(model).items()}
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
    kind: str = "sft"               # "sft": sft_loss on the chosen side; "dpo": dpo_loss + sft_weight x
                                    # sft_loss on chosen; "confident": Burns et al.'s confidence loss on the chosen side
    epochs: int = 1
    lr: float = 1e-5                # AdamW; linear warm-up, then cosine decay to 0 (the release: cosine, no warm-up)
    batch_size: int = 16            # rows per forward pass (all ranks together)
    grad_accum: int = 1             # forward passes per optimizer step
    max_length: int = 1024          # tokens per (prompt, response), prompt cut first (data.encode_many)
    max_prompt_length: int = None   # None = max_length // 2
    beta: float = 0.1               # DPO's beta
    sft_weight: float = 0.2         # the SFT term's weight in the update (the release's dpo_ftx)
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


class MasterWeights:
    """Float32 master copies of the trainable parameters that are not float32 (full fine-tuning of bf16 weights),
    for the optimizer to step (Micikevicius et al. 2018, "Mixed precision training", section 3.1).

    AdamW moves a weight by about lr per step. bf16 keeps 8 significant bits, so w + u rounds back to w whenever
    |u| < 2^-9 |w|: at the real presets' lr 1e-5 / 1e-6 an update to a weight of 0.02 (4e-5 would be needed)
    is lost every step, and plain bf16 AdamW would leave most weights where they started. Here the forward and
    backward passes stay in bf16, the gradients are summed over micro-batches in float32 (accumulate, after
    each backward), AdamW steps the float32 masters, and write_back rounds them into the model. Costs 8 bytes
    per such parameter (the float32 master and its float32 gradient), besides AdamW's state (float32: 8).
    Float32 parameters (a float32 model, LoRA adapters on any base) are their own masters: a no-op for them."""

    def __init__(self, params):
        self.params = params
        self.masters = [p if p.dtype == torch.float32 else p.detach().float() for p in params]   # what AdamW steps

    def accumulate(self):
        """masters' grad += params' grad in float32; the params' grads are freed (the next backward starts them
        again from zero)."""
        for p, m in zip(self.params, self.masters):
            if m is not p and p.grad is not None:
                m.grad = p.grad.float() if m.grad is None else m.grad.add_(p.grad)
                p.grad = None

    @torch.no_grad()
    def write_back(self):
        """params <- masters, rounded to the params' dtype (after the optimizer step)."""
        for p, m in zip(self.params, self.masters):
            if m is not p:
                p.copy_(m)


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
    device, dtype = next(model.parameters()).device, activation_dtype(model)
    pad_id = data.pad_id(tokenizer)
    pack = s.kind == "dpo" and s.share_prompts and packable(model)
    chosen, rejected = encode_rows(tokenizer, rows, s.max_length, s.max_prompt_length)
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
    master = MasterWeights(params)               # bf16 weights: AdamW steps float32 copies
    optimizer = torch.optim.AdamW(master.masters, lr=s.lr, weight_decay=s.weight_decay)
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
            # MACPO's update, as released (--stage dpo --dpo_ftx 0.2): L(x, y+, y-) = L_DPO + sft_weight * L_SFT(y+)
            dpo, chosen_rewards, rejected_rewards = dpo_loss(logps[:B], logps[B:], reference_chosen[j],
                                                             reference_rejected[j], s.beta, s.label_smoothing,
                                                             s.loss_type)
            sft = sft_loss(logps[:B], n[:B])
            losses = dpo + s.sft_weight * sft
            stats = {"dpo": dpo.detach(), "sft": sft.detach(), "chosen_rewards": chosen_rewards,
                     "rejected_rewards": rejected_rewards, "margin": chosen_rewards - rejected_rewards,
                     "accuracy": (chosen_rewards > rejected_rewards).float()}
            tokens += ran
        (losses.sum() * weight / s.grad_accum).backward()
        master.accumulate()
        for k, v in [("loss", losses.detach())] + list(stats.items()):
            sums[k] = sums.get(k, 0.0) + v.float().mean()
        n_logged += 1
        if (i + 1) % s.grad_accum and i + 1 < len(batches):
            continue
        grad_norm = torch.nn.utils.clip_grad_norm_(master.masters, s.grad_clip if s.grad_clip > 0 else float("inf"))
        grad_norms.append(grad_norm)
        optimizer.step()
        master.write_back()
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
