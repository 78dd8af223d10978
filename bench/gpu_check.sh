#!/usr/bin/env bash
# GPU check of the real-size IEDP segmentation model (see bench/gpu_check.py): first issue 15's comparison of
# our defaults (bf16 autocast, our attention) with VPD's configuration (fp32, classic attention) at batch 16, then
# bf16 inference and training throughput, peak memory, and the projected ADE20K 80k-iteration run time (2.3 minutes
# on one H200, 2026-11-29). 9.2 minutes at most in all, so it fits one 10-minute device call with the machine's
# start outside it. Writes OUT_DIR/gpu_check.json, OUT_DIR/gpu_check.md and
# OUT_DIR/gpu_check.log; then the peak training memory of iedp at 512x512, batch 2, bf16, with each memory-saving
# option (bench/memory.py: the 16 GB goal of issue 15) into OUT_DIR/gpu_memory.{json,md,log}; then eager against
# torch.compile (VAE, UNet, CUDA graphs; bench/compile_probe.py) into OUT_DIR/compile.{json,md,log}; then the VAE
# encoder whole and in slices of one and four images at batch 16 (bench/vae_slicing.py) into
# OUT_DIR/vae_slicing.{json,log}. How
# inference time grows with input side and batch was measured on an H200 (BENCHMARKS.md); `python3 -m bench.growth
# --device cuda --out OUT_DIR` measures it again.
#
# usage: bash bench/gpu_check.sh OUT_DIR [bench.gpu_check options, e.g. --skip-defaults]
#   It writes 11 files; where only a few files come back from the GPU machine, write elsewhere and pack them:
#   bash bench/gpu_check.sh /tmp/gpu && tar czf "$OUT/gpu.tgz" --exclude cache -C /tmp gpu
#   IEDP_BENCH_TINY=1  the tiny preset at 64x64 instead (a dry run that finishes in under a minute on a CPU)
#
# iedp is imported from this checkout (no install): the repository root is appended to PYTHONPATH, so
# packages put in front of it (e.g. diffusers wheels unpacked into /tmp/site) keep their precedence.
set -euo pipefail

out=${1:?usage: bash bench/gpu_check.sh OUT_DIR}
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
mkdir -p "$out"
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$root"

nvidia-smi -L || echo "nvidia-smi: no NVIDIA GPU visible"

tiny_flag=""
if [[ "${IEDP_BENCH_TINY:-0}" == 1 ]]; then
    tiny_flag="--tiny --repeats 2 --warmup 1"
    export IEDP_CACHE="${IEDP_CACHE:-$out/cache}"  # the tiny preset is built here, not in ~/.cache
    # Tiny ops on a shared CPU: one thread avoids OpenMP spin-wait stalls that make a dry run take minutes.
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
fi

cd "$root"
python3 -c 'import sys, torch, diffusers, transformers, huggingface_hub as hub
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, diffusers {diffusers.__version__}, "
      f"transformers {transformers.__version__}, huggingface_hub {hub.__version__}")'
# 3.3 minutes at most for the measurements; the script itself stops starting new ones after --budget-s.
# A step that fails or runs out of time is said so, and the next still runs.
timeout 200 python3 -m bench.gpu_check "$out" --budget-s 140 $tiny_flag "${@:2}" 2>&1 | tee "$out/gpu_check.log" \
    || echo "gpu_check.sh: bench.gpu_check failed or timed out (exit ${PIPESTATUS[0]})"

# frozen-bf16 is the bf16 baseline itself, so it is left out
memory_flags="--device cuda --size 512 --batch-size 2 --mixed-precision bf16 --methods iedp --repeats 1"
memory_flags+=" --variants baseline,checkpointing,adamw8bit,all"
if [[ "${IEDP_BENCH_TINY:-0}" == 1 ]]; then
    memory_flags="--device cpu --tiny --size 64 --batch-size 2 --methods iedp --repeats 1 --variants baseline,all"
fi
# each variant in a fresh process (a few seconds to build the real-size parts); 1.5 minutes at most
timeout 90 python3 -m bench.memory $memory_flags --json "$out/gpu_memory.json" --table "$out/gpu_memory.md" \
    2>&1 | tee "$out/gpu_memory.log" || echo "gpu_check.sh: bench.memory failed or timed out (exit ${PIPESTATUS[0]})"

compile_flags=""
if [[ "${IEDP_BENCH_TINY:-0}" == 1 ]]; then
    compile_flags="--tiny --backend eager --repeats 2"
fi
# eager vs torch.compile of the VAE encoder, then the UNet pass too, then CUDA graphs, at batch 1 and 16
# (bench/compile_probe.py; compile.json keeps what finished); 3 minutes at most
timeout 185 python3 -m bench.compile_probe "$out" $compile_flags 2>&1 | tee "$out/compile.log" \
    || echo "gpu_check.sh: bench.compile_probe failed or timed out (exit ${PIPESTATUS[0]})"

slicing_flags="--device cuda --dtype bf16 --sizes 512 --batches 16 --slices 0 1 4 --repeats 3"
if [[ "${IEDP_BENCH_TINY:-0}" == 1 ]]; then
    slicing_flags="--device cpu --sizes 64 --batches 2 --repeats 1 --threads 1"
fi
# the VAE encoder of a batch whole, one and four images at a time (bench/vae_slicing.py: model.vae_slicing)
timeout 75 python3 -m bench.vae_slicing $slicing_flags --json "$out/vae_slicing.json" 2>&1 | tee "$out/vae_slicing.log" \
    || echo "gpu_check.sh: bench.vae_slicing failed or timed out (exit ${PIPESTATUS[0]})"
