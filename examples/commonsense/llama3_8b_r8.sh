#!/usr/bin/env bash
# Entropy-guided FlexLoRA, LLaMA3-8B on commonsense_170k, rank r = 8: the paper's Table 9 hyper-parameters
# (r 8, alpha 16, lr 3e-4 with a linear schedule and 100 warmup steps, AdamW, batch 16, 3 epochs, dropout 0.05,
# b = 4, T_warmup = 5000, T_final = 5000, Delta_T = 1000, adapters on Q, K, V, Up, Down).
# Not given by the paper and kept at our defaults: gamma (orthogonality weight) 0.1, cutoff length 256 and the
# 120 held-out rows of LLM-Adapters, weight decay 0 (LLM-Adapters' value).
#
# Environment (all optional):
#   BASE_MODEL   base model id or folder            (default meta-llama/Meta-Llama-3-8B)
#   DATA_PATH    LLM-Adapters commonsense_170k.json  (default ./commonsense_170k.json)
#   OUTPUT_DIR   where the adapter goes              (default outputs/llama3_8b_flexlora_r8)
#   NGPU         GPUs for torchrun                   (default 1)
#   MICRO_BATCH  per-GPU batch; gradient accumulation makes the global batch 16 (default 4)
#   LLM_ADAPTERS_DATA  LLM-Adapters' dataset/ folder: if set, the Table 2 protocol is evaluated afterwards
# Extra arguments are passed to finetune.py, e.g. --load_in_4bit (QLoRA) or --max_steps 200 for a smoke run.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
BASE_MODEL=${BASE_MODEL:-meta-llama/Meta-Llama-3-8B}
DATA_PATH=${DATA_PATH:-commonsense_170k.json}
OUTPUT_DIR=${OUTPUT_DIR:-outputs/llama3_8b_flexlora_r8}
NGPU=${NGPU:-1}
MICRO_BATCH=${MICRO_BATCH:-4}
GLOBAL_BATCH=16
if (( GLOBAL_BATCH % (MICRO_BATCH * NGPU) != 0 )); then
  echo "MICRO_BATCH x NGPU must divide the global batch of $GLOBAL_BATCH" >&2; exit 1
fi
GRAD_ACC=$(( GLOBAL_BATCH / (MICRO_BATCH * NGPU) ))

torchrun --standalone --nproc_per_node "$NGPU" "$HERE/finetune.py" \
  --model_name_or_path "$BASE_MODEL" \
  --data_path "$DATA_PATH" \
  --output_dir "$OUTPUT_DIR" \
  --cutoff_len 256 \
  --val_set_size 120 \
  --r 8 \
  --lora_alpha 16 \
  --lora_dropout 0.05 \
  --target_modules q_proj,k_proj,v_proj,up_proj,down_proj \
  --b0 4 \
  --t_warmup 5000 \
  --t_final 5000 \
  --delta_t 1000 \
  --learning_rate 3e-4 \
  --lr_scheduler_type linear \
  --warmup_steps 100 \
  --optim adamw_torch \
  --weight_decay 0.0 \
  --num_train_epochs 3 \
  --per_device_train_batch_size "$MICRO_BATCH" \
  --per_device_eval_batch_size "$MICRO_BATCH" \
  --gradient_accumulation_steps "$GRAD_ACC" \
  --bf16 \
  --eval_strategy steps \
  --eval_steps 1000 \
  --save_strategy steps \
  --save_steps 1000 \
  --save_total_limit 3 \
  --logging_steps 10 \
  --report_to none \
  --seed 42 \
  "$@"

if [[ -n "${LLM_ADAPTERS_DATA:-}" ]]; then
  # The paper's Table 2 protocol (generation + answer extraction) on LLM-Adapters' eight test sets.
  flexlora-hf eval --base "$BASE_MODEL" --adapter "$OUTPUT_DIR" --tasks flexlora_llm_adapters \
    --data_dir "$LLM_ADAPTERS_DATA" --batch_size 8 --output_dir "$OUTPUT_DIR/eval_llm_adapters"
fi
