#!/usr/bin/env bash
# The README's "Text is Text" table: both teachers, the CE-only union student, the distilled student and the four
# ablations (each distillation term dropped in turn), then the held-out-font evaluation of all of them.
#   bash benchmarks/textrec_table.sh [CONFIG] [key=value ...]      (default configs/textrec.yaml)
# Teachers run side by side, then the students PAR at a time (default: the number of cores), one thread each;
# every stage resumes from its checkpoint when rerun.
set -euo pipefail
CONFIG=${1:-configs/textrec.yaml}; shift || true
PAR=${PAR:-$(nproc)}
TR="python -m fastdistill.cli text-recognition"
export OMP_NUM_THREADS=1
$TR train-teacher --config "$CONFIG" --domain printed run.threads=1 "$@" &
$TR train-teacher --config "$CONFIG" --domain handwriting run.threads=1 "$@" &
wait
ZERO="distill.logits=0 distill.hint=0 distill.attention=0 distill.affinity=0"
STUDENTS=(
  "distill.name=student"
  "distill.name=ce_only $ZERO"
  "distill.name=no_logits distill.logits=0"
  "distill.name=no_hint distill.hint=0"
  "distill.name=no_attention distill.attention=0"
  "distill.name=no_affinity distill.affinity=0"
)
for ((i = 0; i < ${#STUDENTS[@]}; i += PAR)); do
  for s in "${STUDENTS[@]:i:PAR}"; do
    # shellcheck disable=SC2086
    $TR distill --config "$CONFIG" run.threads=1 $s "$@" &
  done
  wait
done
$TR evaluate --config "$CONFIG" run.threads=1 "$@"
