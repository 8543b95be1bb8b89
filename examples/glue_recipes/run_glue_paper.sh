#!/usr/bin/env bash
# FlexLoRA on GLUE with DeBERTaV3-base, hyper-parameters of the paper's Appendix D, Table 8.
#
#   bash examples/glue_recipes/run_glue_paper.sh TASK [extra run_glue.py arguments]
#   TASK: cola | mnli | mrpc | rte | qnli | sst2 | stsb | qqp
#
# Needs the Hugging Face Hub (microsoft/deberta-v3-base and nyu-mll/glue) and, realistically, a GPU
# (MNLI: 12 epochs over 393k examples). Shared by every task (Table 8): AdamW, linear schedule, warmup ratio 0.1,
# r = 8, alpha = 16, b = 4, batch size 32. Per task: max sequence length, learning rate, epochs, T_warmup, T_final
# and Delta_T. Adapted matrices: the paper's DeBERTa targets (query/key/value projections, attention output,
# intermediate and output dense layers); the classification head and DeBERTa's pooler (not in the pretrained
# checkpoint) are trained in full, as in AdaLoRA's GLUE code. The orthogonality weight (gamma, not given in the
# paper) stays at flexlora_hf's default 0.1 (AdaLoRA's GLUE value).
#
# Extra arguments are appended, so they override the defaults, e.g.:
#   bash examples/glue_recipes/run_glue_paper.sh rte --seed 1 --bf16 true --output_dir outputs/rte_seed1
set -euo pipefail
cd "$(dirname "$0")/../.."

task="${1:?usage: run_glue_paper.sh TASK [extra args]; TASK in cola mnli mrpc rte qnli sst2 stsb qqp}"
shift

#                 max_len  lr      epochs  T_warmup  T_final  Delta_T  metric_for_best_model
case "$task" in
  cola) set -- 64  8e-4   20 1000 1000  200 matthews_correlation "$@" ;;
  mnli) set -- 256 5e-4   12 5000 5000 1000 accuracy             "$@" ;;
  mrpc) set -- 256 1e-3   30  500  500  100 combined_score       "$@" ;;
  rte)  set -- 512 1.2e-3 50  500  500  100 accuracy             "$@" ;;
  qnli) set -- 256 5e-4    5 1000 1000  200 accuracy             "$@" ;;
  sst2) set -- 256 8e-4   20 5000 5000 1000 accuracy             "$@" ;;
  stsb) set -- 256 2.2e-3 20 1000 1000  200 combined_score       "$@" ;;
  qqp)  set -- 320 8e-4    5 5000 5000 1000 combined_score       "$@" ;;
  *) echo "unknown GLUE task '$task' (cola mnli mrpc rte qnli sst2 stsb qqp)" >&2; exit 2 ;;
esac
max_len=$1 lr=$2 epochs=$3 t_warmup=$4 t_final=$5 delta_t=$6 metric=$7
shift 7

PYTHON="${PYTHON:-python}"
[ -x .venv/bin/python ] && [ "$PYTHON" = python ] && PYTHON=.venv/bin/python

exec "$PYTHON" examples/run_glue.py \
  --model_name_or_path microsoft/deberta-v3-base \
  --task_name "$task" \
  --do_train --do_eval \
  --max_seq_length "$max_len" \
  --per_device_train_batch_size 32 \
  --per_device_eval_batch_size 128 \
  --learning_rate "$lr" \
  --num_train_epochs "$epochs" \
  --optim adamw_torch \
  --lr_scheduler_type linear \
  --warmup_steps 0.1 \
  --weight_decay 0.0 \
  --r 8 --lora_alpha 16 --b0 4 \
  --t_warmup "$t_warmup" --t_final "$t_final" --delta_t "$delta_t" \
  --target_modules query_proj,key_proj,value_proj,attention.output.dense,intermediate.dense,output.dense \
  --modules_to_save classifier,pooler \
  --eval_strategy epoch --save_strategy epoch --save_total_limit 1 \
  --load_best_model_at_end --metric_for_best_model "$metric" \
  --logging_steps 100 --report_to none \
  --seed 42 \
  --output_dir "outputs/glue/$task" \
  "$@"
