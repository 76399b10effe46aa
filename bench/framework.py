"""bench, section 4: TRL's DPOTrainer against train.train, when trl is installed (it is not a dependency).
Pairs/s per optimizer step and peak memory, both loops timed by the same StepMeter."""
import copy
import tempfile

from torch.optim.optimizer import register_optimizer_step_post_hook

from bench.timing import StepMeter
from generate import reference_logps
from train import TrainSettings, train


def bench_trl(policy, tokenizer, pairs, args):
    """TRL's DPOTrainer (DPO + 0.2 x SFT: loss_type ["sigmoid", "sft"], weights [1, 0.2]; reference log-probs
    precomputed; no padding-free) against train.train, back to back in this process on the same pairs, batch
    size, fresh copies of the same weights and learning rate; per-step medians and peaks from StepMeter.
    -> rows, or a string saying why it was skipped."""
    try:
        import trl
        from datasets import Dataset
        from transformers import TrainerCallback
        from trl import DPOConfig, DPOTrainer
    except ImportError:
        return "skipped: trl (with datasets) is not importable; it is not a dependency of macpo. To measure it: " \
               "python -m venv /tmp/trl && /tmp/trl/bin/pip install -r requirements.txt trl && /tmp/trl/bin/python -m bench"
    B, device = args.train_batch_size, policy.device
    passes = args.repeats + 1                       # over the pairs; the first step of each loop is dropped
    rows = pairs[:len(pairs) // B * B]
    trl_meter, ours_meter = StepMeter(device), StepMeter(device)

    # TRL: the Trainer's callbacks open and close each step (forward, backward, clipping, optimizer step)
    class Meter(TrainerCallback):
        def on_step_begin(self, *a, **k):
            trl_meter.step_begin()

        def on_step_end(self, *a, **k):
            trl_meter.step_end()
    with tempfile.TemporaryDirectory() as tmp:
        config = DPOConfig(output_dir=tmp, per_device_train_batch_size=B, gradient_accumulation_steps=1,
                           max_steps=passes * len(rows) // B, learning_rate=1e-9, beta=0.1,
                           loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.2], precompute_ref_log_probs=True,
                           max_length=args.train_max_length, report_to="none", save_strategy="no",
                           logging_strategy="no", disable_tqdm=True, use_cpu=not str(device).startswith("cuda"),
                           bf16=False, dataloader_num_workers=0, lr_scheduler_type="constant", warmup_steps=0,
                           max_grad_norm=1.0)
        data = Dataset.from_dict({"prompt": [p for p, _, _ in rows], "chosen": [c for _, c, _ in rows],
                                  "rejected": [r for _, _, r in rows]})
        trainer = DPOTrainer(model=copy.deepcopy(policy).train(), ref_model=copy.deepcopy(policy).eval(), args=config,
                             train_dataset=data, processing_class=tokenizer, callbacks=[Meter()])
        trainer.train()

    # ours: the same pairs and steps through train.train, which has no callbacks and builds its own AdamW. torch's
    # global optimizer-step post-hook (registered for this call only) closes a step and opens the next after each
    # optimizer.step(), so a step is the time from the end of one optimizer step to the end of the next: the whole
    # iteration (batching, forward, backward, clipping, the step), as TRL's callbacks bracket it. The interval
    # before the first step (train's set-up) is dropped by StepMeter.row, the one after the last step below.
    model = copy.deepcopy(policy)
    reference = reference_logps(model, tokenizer, rows, max_length=args.train_max_length)

    def next_step(*_):                          # called as hook(optimizer, args, kwargs)
        ours_meter.step_end()
        ours_meter.step_begin()
    ours_meter.step_begin()
    hook = register_optimizer_step_post_hook(next_step)
    try:
        # bench's one call of train.train
        train(model, tokenizer, rows * passes, TrainSettings(kind="dpo", epochs=1, lr=1e-9, batch_size=B,
                                                             max_length=args.train_max_length, progress=False,
                                                             grad_clip=1.0, log_every=10 ** 9),
              reference=tuple(r.repeat(passes) for r in reference))
    finally:
        hook.remove()
        ours_meter.step_end()
    del ours_meter.seconds[-1], ours_meter.peak_mb[-1]         # after the last step: train's end, not a step
    return [trl_meter.row(f"TRL {trl.__version__} DPOTrainer (sigmoid + 0.2 sft, reference precomputed)", B),
            ours_meter.row("macpo train.train (kind='dpo')", B)]
