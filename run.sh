#!/usr/bin/env bash
# macpo's one entry point. Creates .venv from requirements.txt on first use, then runs a preset.
#
#   bash run.sh toy        # MAIN JOB: the built-in offline toy task, K = 3 weak teachers, T = 3 rounds, CPU
#   bash run.sh test       # the test suite (CPU, offline); `bash run.sh test fast`: the fast tier (< 90 s)
#   bash run.sh table      # every baseline and ablation on the toy task, 5 seeds, CPU: results.md + rounds.png
#   bash run.sh table hh   # the same on HH-Helpful with real models and a reward model (GPU machines)
#   bash run.sh smoke      # the toy task at the smallest size that runs every stage (seconds)
#   bash run.sh hh         # HH-Helpful with real models (GPU + hub, or local folders)
#   bash run.sh harmless   # HH-Harmless
#   bash run.sh pku        # PKU-SafeRLHF
#   bash run.sh paper      # the paper's models (3 x 7-8B weak teachers, Llama-2-70b student)
#   bash run.sh bench      # speed vs the naive scripts, measured side by side; writes runs/bench/bench.json
#   bash run.sh gpu        # on a GPU machine: does it run, how fast (toy job in bf16, benchmark at 0.8B), < 8 min
#
# Extra arguments pass through as flags and override the preset's (python macpo.py --help lists them all), e.g.
#   bash run.sh hh --student models/Qwen2.5-1.5B --data_dir ../shared/data/hh-rlhf --train_split test
set -euo pipefail
cd "$(dirname "$0")"

# Real-data presets: openly downloadable base models that fit one GPU (80 GB) with full fine-tuning and
# different tokenizers, standing in for the paper's Llama2-7b / Mistral-7b / Llama3-8b and Llama2-70b.
HH_TEACHERS="HuggingFaceTB/SmolLM2-360M,Qwen/Qwen2.5-0.5B,EleutherAI/pythia-410m"
HH_STUDENT="Qwen/Qwen2.5-1.5B"
PAPER_TEACHERS="meta-llama/Llama-2-7b-hf,mistralai/Mistral-7B-v0.1,meta-llama/Meta-Llama-3-8B"
PAPER_STUDENT="meta-llama/Llama-2-70b-hf"

# --- environment: .venv from requirements.txt, rebuilt when requirements.txt changes. `gpu` first takes a
# python3 that already has torch with CUDA and transformers (a GPU machine's own, offline): a venv there would
# need downloads.
if [ "${1:-}" = gpu ] && python3 -c 'import torch, transformers; assert torch.cuda.is_available()' 2>/dev/null; then
  exec python3 -m bench.gpu "${@:2}"
fi
if [ ! -f .venv/.requirements ] || ! cmp -s requirements.txt .venv/.requirements; then
  echo "setting up .venv from requirements.txt ..."
  rm -rf .venv
  python3 -m venv .venv
  .venv/bin/pip install --quiet --disable-pip-version-check -r requirements.txt
  cp requirements.txt .venv/.requirements
fi
PY=.venv/bin/python

preset="${1:-toy}"
[ $# -gt 0 ] && shift
# the real-data presets share these: the release's template and lengths, full fine-tuning at rates suited to it
# (the release's 5e-5 / 1e-5 are LoRA rates)
REAL="--max_length 1024 --max_prompt_length 512 --max_new_tokens 256 --batch_size 4 --grad_accum 4
      --sft_lr 1e-5 --dpo_lr 1e-6 --temperature 0.7 --top_p 0.9 --gen_batch_size 32 --score_batch_size 16"
# the toy task's settings, shared by the toy and table presets; each value's measurement and how it was chosen
# (some after seeing results): results/README.md, section 3. In short: every agent trains rank-8 adapters on
# every linear layer over its pre-trained base, as the release trains LoRA; teachers SFT gently (2 epochs) so
# each keeps its own operation; the student SFTs 3 epochs on its weak labels, as released; the twins need many
# epochs at a higher rate to turn refusals into compliance and answers into near misses, and answer greedily.
TOY="--task toy --n_teachers 3 --toy_teacher_ops +,-,* --toy_teacher_sizes 64x2,64x2,64x2
     --toy_teacher_pretrain_steps 1200,1200,1200 --toy_student_size 80x2 --toy_student_pretrain_steps 1200
     --toy_pretrain_batch_size 64 --toy_student_pretrain_batch_size 192 --toy_pretrain_lr 3e-3
     --template vicuna --system= --max_length 64 --max_prompt_length 32 --max_new_tokens 16
     --batch_size 64 --score_batch_size 256 --gen_batch_size 256 --teacher_sft_epochs 2 --student_sft_epochs 3
     --neg_sft_epochs 32 --neg_sft_lr 3e-3 --negative_temperature 0 --length_window 1 --sft_lr 3e-4 --dpo_lr 2e-4 --warmup_ratio 0.05
     --lora all --lora_targets q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj --temperature 0.3 --top_p 1.0"
case "$preset" in
  toy)       # the README's main job: every stage of Algorithm 1 plus the ceiling, 10 minutes on 2 cores from a
             # fresh clone (1.3 for the venv, 6 pre-training the bases, which later runs reuse)
    exec $PY macpo.py --out runs/toy --n_init 700 --n_w2s 700 --n_test 1200 $TOY "$@" ;;
  smoke)     # the same pipeline at the smallest size that still runs every stage
    exec $PY macpo.py --out runs/smoke --task toy --n_teachers 3 --n_init 64 --n_w2s 64 --n_test 32 \
      --toy_teacher_sizes 32x1,32x1,32x1 --toy_student_size 32x1 --toy_teacher_pretrain_steps 5,5,5 \
      --toy_student_pretrain_steps 10 --toy_pretrain_batch_size 16 --toy_student_pretrain_batch_size 16 --template vicuna --system "" \
      --max_length 64 --max_prompt_length 32 --max_new_tokens 12 --batch_size 16 --teacher_sft_epochs 1 \
      --student_sft_epochs 1 --sft_lr 2e-3 --dpo_lr 2e-4 "$@" ;;
  hh)
    exec $PY macpo.py --out runs/hh --task hh-helpful --teachers "$HH_TEACHERS" --student "$HH_STUDENT" \
      --n_init 5000 --n_w2s 5000 --n_test 2000 --template vicuna $REAL "$@" ;;
  harmless)
    exec $PY macpo.py --out runs/harmless --task hh-harmless --teachers "$HH_TEACHERS" --student "$HH_STUDENT" \
      --n_init 5000 --n_w2s 5000 --n_test 2000 --template vicuna $REAL "$@" ;;
  pku)
    exec $PY macpo.py --out runs/pku --task pku --teachers "$HH_TEACHERS" --student "$HH_STUDENT" \
      --n_init 5000 --n_w2s 5000 --n_test 1000 --template alpaca $REAL "$@" ;;
  paper)     # the paper's agents; a 70B student needs several GPUs and LoRA (docs/scaling.md)
    exec $PY macpo.py --out runs/paper --task hh-helpful --teachers "$PAPER_TEACHERS" --student "$PAPER_STUDENT" \
      --n_init 5000 --n_w2s 5000 --n_test 2000 --template vicuna $REAL "$@" ;;
  bench)     # speed of scoring, generation and the preference step vs the naive scripts, side by side (CPU, <10 min)
    exec $PY -m bench "$@" ;;
  gpu)       # one H200, under 8 minutes: the toy job on CUDA in bf16 beside the CPU run, and scoring, generation,
             # update and bf16/fp32 pick agreement at a 0.8B random Llama; runs/gpu/gpu.json and gpu.md
             # (bench/gpu.py). `gpu --device cpu --tiny`: the same code paths at tiny sizes on a CPU
    exec $PY -m bench.gpu "$@" ;;
  test)      # everything (CI); `test fast`: losses, scoring, generation, data, LoRA, the toy task and one
             # smoke run, for someone changing a loss (tests marked slow left out)
    if [ "${1:-}" = fast ]; then
      shift
      exec $PY -m pytest tests -q -m "not slow" "$@"
    fi
    exec $PY -m pytest tests -q "$@" ;;
  table)     # MACPO, naive SFT, confident loss, SPIN, self-rewarding, -MP, -HN, K = 1, 2, MACPO with the
             # release's reference: 5 seeds, one folder each (runs/table/seed{S}) whose init stages every
             # method shares (the pre-trained bases are shared by every seed: runs/toy_bases); writes
             # runs/table/results.md and rounds.png and prints the table. Each seed is the toy preset's run.
    if [ "${1:-}" = hh ]; then
      shift        # real data, GPU: scored by a public HH reward model (pass --scorer PATH offline)
      exec $PY macpo.py table --out runs/table-hh --task hh-helpful --teachers "$HH_TEACHERS" \
        --student "$HH_STUDENT" --n_init 5000 --n_w2s 5000 --n_test 2000 --template vicuna $REAL \
        --self_judge llm --scorer OpenAssistant/reward-model-deberta-v3-large-v2 "$@"
    fi
    exec $PY macpo.py table --out runs/table --seeds 0,1,2,3,4 --n_init 700 --n_w2s 700 --n_test 1200 $TOY "$@" ;;
  *)
    echo "unknown preset '$preset': choose toy, smoke, hh, harmless, pku, paper, bench, gpu, table or test" >&2
    exit 2 ;;
esac
