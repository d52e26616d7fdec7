#!/usr/bin/env bash
# Rebuild the trained parts of the embedded default model from the installed packages (`make default-model`):
#   1. the projector, trained on easy-VQA, starting from the untrained build;
#   2. self-distilled features: chit-chat prompts, instruction prompts and real photos with description prompts,
#      answered by the target with the new projector;
#   3. the MSD draft (both stages) and, on the same samples in the same order, the non-decoupled ablation.
# Every step resumes where it stopped when the script runs again, so it can be spread over several sittings.
# Outputs: src/msd/embedded/weights/projector.safetensors, src/msd/embedded/weights/draft/ and
# benchmarks/default_model/ablation-draft/; intermediate files go under $WORK (default runs/default-model).
set -euo pipefail
cd "$(dirname "$0")/../.."

WORK=${WORK:-runs/default-model}
PROJECTOR_STEPS=${PROJECTOR_STEPS:-300}
TEXT_ROWS=${TEXT_ROWS:-1500}  # the committed draft used the first 1,500 chit-chat prompts
# One torch thread per process: on a 2-core machine, two single-threaded processes finish more work than one process
# with two threads (self-distillation ran about 4x slower per row with two threads next to another job).
THREADS=${THREADS:-1}
PROJECTOR=src/msd/embedded/weights/projector.safetensors
DRAFT=src/msd/embedded/weights/draft
ABLATION=benchmarks/default_model/ablation-draft

log() { printf '\n== %s\n' "$*" >&2; }

log "1/6 projector ($PROJECTOR_STEPS steps of 16 easy-VQA examples)"
base=$(msd embedded build --untrained-projector --output "$WORK/untrained-target")
msd embedded train-projector --target "$base" --work-dir "$WORK/projector" --output "$PROJECTOR" \
    --steps "$PROJECTOR_STEPS" --warmup-steps 20 --batch-size 16
target=$(msd embedded build)  # the default target, now with the trained projector
# The answers and features come from the target in the dtype `msd embedded options` serves it in on this CPU
# (bfloat16 with AMX, float32 elsewhere), so the draft learns the outputs of the target it will serve.
DTYPE=${DTYPE:-$(msd embedded options | sed -n 's/.*--dtype \([a-z0-9]*\).*/\1/p')}

log "2/6 prompts"
python benchmarks/default_draft/make_text_rows.py --output "$WORK/text-rows.jsonl" --rows "$TEXT_ROWS"
for set in main extra; do
    python benchmarks/default_draft/make_instruction_rows.py --template-set "$set" \
        --output "$WORK/instruction-rows-$set.jsonl"
    python benchmarks/default_draft/make_image_rows.py --prompt-set "$set" --prompts-per-image 6 \
        --output "$WORK/image-rows-$set.jsonl" --image-folder "$WORK/images"
done

log "3/6 self-distilled features (two processes side by side, 16 prompts answered per generate call)"
# Each process takes one half of every row file except the chit-chat and the first photo set, so the two finish at
# about the same time. The halves of a file are parts of one feature folder.
distill() {  # distill ROWS KIND OUTPUT MAX_TOKENS [prepare-data options]: self-distilled features of ROWS
    local rows=$1 kind=$2 output=$3 max_tokens=$4
    shift 4
    OMP_NUM_THREADS=$THREADS msd prepare-data --target "$target" --data "$WORK/$rows" --kind "$kind" \
        --image-root "$WORK/images" --regenerate --regenerate-max-tokens "$max_tokens" --dtype "$DTYPE" \
        --shard-size 16 --output "$WORK/$output" "$@"
}
lane() {  # lane PART: the shared row files' part PART, after this lane's own file
    distill instruction-rows-main.jsonl text instructions 96 --shard "$1"
    distill instruction-rows-extra.jsonl text instructions-extra 96 --shard "$1"
    distill image-rows-extra.jsonl vision vision-extra 96 --shard "$1"
}
(distill text-rows.jsonl text text 64 --limit "$TEXT_ROWS" && lane 0/2) &
first_lane=$!
(distill image-rows-main.jsonl vision vision 96 && lane 1/2) &
second_lane=$!
wait "$first_lane"
wait "$second_lane"

log "4/6 drafts: MSD and the non-decoupled ablation, side by side"
train() {
    local output=$1
    shift
    local resume=()
    if compgen -G "$output/checkpoint-*" > /dev/null; then resume=(--resume); fi
    OMP_NUM_THREADS=$THREADS msd train --config benchmarks/default_draft/train_two_stage.yaml --target "$target" \
        --text-data "$WORK/text" "$WORK/instructions" "$WORK/instructions-extra" \
        --vision-data "$WORK/vision" "$WORK/vision-extra" --output "$output" \
        "${resume[@]}" "$@"
}
train "$WORK/train-msd" &
msd_job=$!
train "$WORK/train-ablation" --no-decouple-visual &
ablation_job=$!
wait "$msd_job"
wait "$ablation_job"

log "5/6 finishing stage: three epochs with a constant 30% of multimodal samples, from each draft above"
finish() {
    local name=$1
    local resume=()
    if compgen -G "$WORK/finish-$name/checkpoint-*" > /dev/null; then resume=(--resume); fi
    OMP_NUM_THREADS=$THREADS msd train --config benchmarks/default_draft/train_mixed_finish.yaml --target "$target" \
        --init-draft "$WORK/train-$name/draft" \
        --text-data "$WORK/text" "$WORK/instructions" "$WORK/instructions-extra" \
        --vision-data "$WORK/vision" "$WORK/vision-extra" --output "$WORK/finish-$name" "${resume[@]}"
}
finish msd &
msd_job=$!
finish ablation &
ablation_job=$!
wait "$msd_job"
wait "$ablation_job"

log "6/6 copy the float16 drafts into the repository"
copy_draft() {
    mkdir -p "$2"
    cp "$1/config.json" "$1/model.safetensors" "$2/"
    echo "wrote $2"
}
copy_draft "$WORK/finish-msd/draft" "$DRAFT"
copy_draft "$WORK/finish-ablation/draft" "$ABLATION"
