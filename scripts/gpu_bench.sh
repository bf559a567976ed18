#!/usr/bin/env bash
# Paper-scale speed on a GPU: the VGG16 config (benchmarks/configs/vgg16_voc07.yaml: 2000 selective-search
# proposals, scale 600 / max 1000) on synthetic images of VOC size, every pipeline trained for a short
# schedule, timed per image and stage with CUDA events, at fp32 (IEEE float32, the papers') and then at
# bf16 with channels-last (each precision in GPU_BENCH_PRECISIONS: fp32, tf32, bf16 or fp16; the 16-bit
# ones with channels-last).
#
#   scripts/gpu_bench.sh prepare    # where selective search runs (it needs opencv-contrib): the images
#                                   # and their proposal cache, under $GPU_BENCH_DIR
#   scripts/gpu_bench.sh run        # on the GPU machine, with $GPU_BENCH_DIR carried over
#   scripts/gpu_bench.sh plan       # anywhere: `rcnn-bench run --dry-run` with run's settings, for each
#                                   # precision (checks the settings, prints the plan, trains nothing)
#   scripts/gpu_bench.sh check      # on the GPU machine, in one short call: issue 27's targets
#                                   # (benchmarks/gate/targets.yaml): R-CNN and Fast R-CNN at tf32, then
#                                   # Fast R-CNN at bf16 with channels-last, not deterministic, 10 SGD
#                                   # iterations, no variants, 8 timed images, swept at 2000 proposals
#                                   # (median of 3 runs of 2 images); each run stopped at the time left
#                                   # of GPU_BENCH_BUDGET [420] seconds; then one line per target, met or
#                                   # not met (`rcnn-bench targets` on the run folders)
#   scripts/gpu_bench.sh check-plan # anywhere: check's settings as dry runs (GPU_BENCH_PLAN_FOR=h100:
#                                   # at the H100's measured rates)
#
# A GPU machine without network or opencv-contrib needs only the folder `prepare` wrote: the cache is keyed
# by the images and the settings, so `run` reads it and computes nothing. The results go to
# $GPU_BENCH_DIR/reports/<run-id>/ (results.json, report.html, report.md); the figures belong in
# benchmarks/NOTES.md with the device name. Settings (environment variables, defaults in brackets):
#   GPU_BENCH_DIR [datasets/data/gpu-bench]   GPU_BENCH_DEVICE [cuda]   GPU_BENCH_PRECISIONS ["fp32 bf16"]
#   GPU_BENCH_TRAIN [20] / GPU_BENCH_TEST [24] images   GPU_BENCH_TIMED [16]   GPU_BENCH_ITERS [40]
#   GPU_BENCH_WEIGHTS [none: VGG16 initialised from backbone.seed; a path: a torchvision state dict]
#   GPU_BENCH_PIPELINES [all of the config's]
#   GPU_BENCH_SET [more KEY=VALUE overrides, space-separated, given last: they win over the above]
# Timing does not depend on the weights' values, so random weights give the paper setting's speed; their
# mAP is not the paper's.
set -euo pipefail
cd "$(dirname "$0")/.."

mode=${1:-}
dir=${GPU_BENCH_DIR:-datasets/data/gpu-bench}
device=${GPU_BENCH_DEVICE:-cuda}
iters=${GPU_BENCH_ITERS:-40}
if [[ -x .venv/bin/python ]]; then py=.venv/bin/python; else py=${PYTHON:-python3}; fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

settings=(
  --config benchmarks/configs/vgg16_voc07.yaml
  --set data.kind=synthetic --set "data.root=$dir/voc"
  --set "data.synthetic.train_images=${GPU_BENCH_TRAIN:-20}"
  --set "data.synthetic.test_images=${GPU_BENCH_TEST:-24}"
  --set "cache_dir=$dir/cache" --set "output_dir=$dir/reports"
)
extra=()  # GPU_BENCH_SET's overrides, given last so that they win
for key in ${GPU_BENCH_SET:-}; do extra+=(--set "$key"); done

case $mode in
  prepare)
    settings+=("${extra[@]}")
    "$py" -m rcnn_bench.benchmarks.cli proposals "${settings[@]}"
    ;;
  check|check-plan)
    iters=${GPU_BENCH_ITERS:-10}
    settings+=(
      --set "device=$device" --set "backbone.weights=${GPU_BENCH_WEIGHTS:-none}"
      --set "bench.timed_images=${GPU_BENCH_TIMED:-8}" --set bench.warmup_images=2
      --set bench.sweep_images=2 --set bench.sweep_repeats=3 --set "bench.sweep_proposals=[2000]"
      --set deterministic=false --set "pipelines.rcnn.variants=[]" --set "pipelines.fast_rcnn.variants=[]"
    )
    for name in rcnn fast_rcnn; do settings+=(--set "pipelines.$name.solver.iters=$iters"); done
    settings+=("${extra[@]}")
    dry=()
    [[ $mode == check-plan ]] && dry=(--dry-run ${GPU_BENCH_PLAN_FOR:+--plan-for "$GPU_BENCH_PLAN_FOR"})
    [[ $mode == check && $device == cuda* ]] && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    budget=${GPU_BENCH_BUDGET:-420}
    runs=()
    for spec in "tf32 [rcnn,fast_rcnn] rcnn false" "bf16 [fast_rcnn] fast_rcnn true"; do
      read -r precision pipelines baseline channels_last <<<"$spec"
      left=$((budget - SECONDS))
      if ((left < 30)); then echo "== $precision: not run, ${left} s of GPU_BENCH_BUDGET left"; continue; fi
      echo "== $precision, pipelines $pipelines, channels_last=$channels_last (at most $left s)"
      latest="$dir/reports/latest"
      before=$(readlink -f "$latest" 2>/dev/null || true)
      timeout "$left" "$py" -m rcnn_bench.benchmarks.cli run "${dry[@]}" "${settings[@]}" \
        --set "pipelines=$pipelines" --set "bench.baseline=$baseline" \
        --set "bench.precision=$precision" --set "bench.channels_last=$channels_last" || true
      run=$(readlink -f "$latest" 2>/dev/null || true)
      [[ $mode == check && -n $run && $run != "$before" ]] && runs+=("$run")
    done
    if [[ $mode == check ]]; then
      if ((${#runs[@]} == 0)); then echo "no run finished: no target checked" >&2; exit 1; fi
      echo "== targets (${SECONDS} s so far)"
      "$py" -m rcnn_bench.benchmarks.cli targets "${runs[@]}"
    fi
    ;;
  run|plan)
    settings+=(
      --set "device=$device" --set "backbone.weights=${GPU_BENCH_WEIGHTS:-none}"
      --set "bench.timed_images=${GPU_BENCH_TIMED:-16}" --set bench.warmup_images=2
      --set bench.sweep_images=2 --set "bench.sweep_proposals=[300,2000]"
    )
    [[ -n ${GPU_BENCH_PIPELINES:-} ]] && settings+=(--set "pipelines=$GPU_BENCH_PIPELINES")
    for name in rcnn fast_rcnn sppnet faster_rcnn; do
      settings+=(--set "pipelines.$name.solver.iters=$iters")
    done
    settings+=(--set "pipelines.sppnet.pretrain_iters=$iters" "${extra[@]}")
    dry=()
    [[ $mode == plan ]] && dry=(--dry-run)
    [[ $mode == run && $device == cuda* ]] && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    for precision in ${GPU_BENCH_PRECISIONS:-fp32 bf16}; do
      channels_last=false
      [[ $precision == bf16 || $precision == fp16 ]] && channels_last=true
      echo "== $precision, channels_last=$channels_last"
      "$py" -m rcnn_bench.benchmarks.cli run "${dry[@]}" "${settings[@]}" \
        --set "bench.precision=$precision" --set "bench.channels_last=$channels_last"
    done
    ;;
  *)
    echo "usage: scripts/gpu_bench.sh prepare|run|plan|check|check-plan (settings: the comment at the top of this script)" >&2
    exit 2
    ;;
esac
