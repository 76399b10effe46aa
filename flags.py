"""The command line from a config dataclass (macpo.Config): one flag per field, whose --help is the field's
comment, grouped as the dataclass's "# --- group" lines group them; flags that cannot work together are
refused before any compute, every problem named at once."""
import argparse
import dataclasses
import inspect
import re

import data
import evaluate
import parallel


def flag_help(config_class):
    """-> [(group title, [(field name, help)])] read from the dataclass's source: a field's comment, with the comment
    lines under it, is its help; a "# --- title" line starts a group. Nothing is written twice."""
    groups, last = [], None
    for line in inspect.getsource(config_class).splitlines():
        if m := re.match(r"\s+# --- (.*)", line):
            groups.append((m.group(1), []))
        elif m := re.match(r"\s+(\w+): \w+ = .*?\s+# (.*)", line):
            groups[-1][1].append([m.group(1), m.group(2)])
            last = groups[-1][1][-1]
        elif (m := re.match(r"\s+# (.*)", line)) and last is not None:
            last[1] += " " + m.group(1)
        else:
            last = None
    return groups



def parse(config_class, argv, description, methods):
    """argv -> config_class(...), or exit with argparse's usage error listing every problem (validate)."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    fields, groups = {f.name: f for f in dataclasses.fields(config_class)}, flag_help(config_class)
    silent = set(fields) - {name for _, flags in groups for name, _ in flags}
    assert not silent, f"{config_class.__name__} fields without a comment (their --help): {sorted(silent)}"
    for title, flags in groups:
        group = parser.add_argument_group(title)
        for name, text in flags:
            f = fields[name]
            # --data_dir and --data-dir alike, as HfArgumentParser accepts
            names = dict.fromkeys([f"--{name}", f"--{name.replace('_', '-')}"])
            if f.type in (bool, "bool"):
                group.add_argument(*names, dest=name, action=argparse.BooleanOptionalAction, default=f.default,
                                   help=text.replace("%", "%%"))
            else:
                group.add_argument(*names, dest=name, type=type(f.default), default=f.default, help=text.replace("%", "%%"))
    cfg = config_class(**vars(parser.parse_args(argv)))
    problems = validate(cfg, methods)
    if problems:
        parser.error("\n  ".join(problems))
    return cfg


def validate(cfg, methods):
    """Flags that cannot work together, refused before any compute, each with what to change."""
    p = []
    choices = {"task": ("toy", "hh-helpful", "hh-harmless", "pku", "file"), "template": data.TEMPLATES,
               "reference": ("previous", "init", "base"), "student_positive_from": ("before", "after"),
               "loss_type": ("sigmoid", "ipo"), "pku_order": ("safer", "better"),
               "identical_pairs": ("drop", "keep"), "rm_format": ("auto",) + evaluate.RM_FORMATS + tuple(data.TEMPLATES),
               "lora": ("none", "all", "student", "teachers"), "parallel": ("ddp", "fsdp"),
               "method": tuple(methods), "self_judge": ("likelihood", "llm"), "dtype": ("auto",) + tuple(parallel.DTYPES)}
    for name, allowed in choices.items():
        if getattr(cfg, name) not in allowed:
            p.append(f"--{name} {getattr(cfg, name)!r} is not one of {', '.join(allowed)}"
                     + (" (float16 needs loss scaling, which this code does not do; bfloat16 has float32's range)"
                        if name == "dtype" and getattr(cfg, name) in ("float16", "fp16", "half") else ""))
    if cfg.K < 1:
        p.append("--n_teachers must be at least 1")
    if not 0 <= cfg.weak_label_teacher < cfg.K:
        p.append(f"--weak_label_teacher {cfg.weak_label_teacher} must name one of the {cfg.K} teachers (0..{cfg.K - 1})")
    if cfg.n_init < 1 or cfg.n_w2s < 1 or cfg.n_test < 0:
        p.append("--n_init and --n_w2s must be at least 1, --n_test at least 0")
    if not 0 < cfg.max_prompt_length < cfg.max_length:
        p.append(f"--max_prompt_length {cfg.max_prompt_length} must be positive and below --max_length {cfg.max_length}")
    if "gold" in cfg.reward_models.split(",") and cfg.task != "toy":
        p.append(f"--reward_models gold is the toy task's reward; --task {cfg.task} needs reward models (or auto)")
    if not 0.0 <= cfg.toy_teacher_other_share < 1.0:
        p.append(f"--toy_teacher_other_share {cfg.toy_teacher_other_share} must be in [0, 1)")
    if cfg.task == "file" and not cfg.data_file:
        p.append("--task file needs --data_file PATH")
    if (cfg.teachers == "toy") != (cfg.student == "toy"):
        p.append("--teachers toy and --student toy go together (tiny models built here share the toy tokenizer)")
    if cfg.teachers == "toy" and cfg.task != "toy":
        p.append(f"--task {cfg.task} needs real models: pass --teachers A,B,C and --student S (names or folders)")
    if cfg.teachers == "toy":
        sizes, steps = cfg.toy_teacher_sizes.split(","), cfg.toy_teacher_pretrain_steps.split(",")
        ops = cfg.toy_teacher_ops.split(",")
        if len(sizes) < cfg.K or len(steps) < cfg.K or len(ops) < cfg.K:
            p.append(f"--toy_teacher_sizes, --toy_teacher_pretrain_steps and --toy_teacher_ops need {cfg.K} "
                     f"entries (one per teacher)")
        if any(not o or set(o) - set("+-*") for o in ops):
            p.append(f"--toy_teacher_ops {cfg.toy_teacher_ops!r}: each teacher's entry is one or more of + - *")
    for name in ("batch_size", "gen_batch_size", "score_batch_size", "grad_accum", "max_new_tokens", "log_every",
                 "length_window"):
        if getattr(cfg, name) < 1:
            p.append(f"--{name} must be at least 1")
    if not 0 <= cfg.neg_sft_lr < float("inf"):
        p.append(f"--neg_sft_lr must be 0 (= --sft_lr) or a positive finite number, got {cfg.neg_sft_lr}")
    for name in ("sft_lr", "dpo_lr", "toy_pretrain_lr"):
        if not 0 < getattr(cfg, name) < float("inf"):        # argparse takes "nan" and "inf" as floats
            p.append(f"--{name} must be a positive finite number, got {getattr(cfg, name)}")
    for name in ("temperature", "eval_temperature"):
        if not 0 <= getattr(cfg, name) < float("inf"):
            p.append(f"--{name} must be 0 (greedy) or a positive finite number, got {getattr(cfg, name)}")
    if not (cfg.negative_temperature == -1 or 0 <= cfg.negative_temperature < float("inf")):
        p.append(f"--negative_temperature must be -1 (= --temperature), 0 (greedy) or a positive finite number, "
                 f"got {cfg.negative_temperature}")
    if cfg.beta <= 0 or cfg.sft_weight < 0 or not 0 <= cfg.label_smoothing < 0.5:
        p.append("--beta must be > 0, --sft_weight >= 0, --label_smoothing in [0, 0.5)")
    return p
