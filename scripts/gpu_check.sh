#!/usr/bin/env bash
# The project's GPU checks in one command, for a lent GPU whose time is short (one call, ~10 minutes): the GPU-only
# code paths' tests first, then the benchmarks in order of value. Each stage has a time limit and is skipped when
# too little of the budget is left, so that one slow stage cannot cost the output of the rest. Everything goes to
# $OUT/gpu_check.log and $OUT/*.json (OUT defaults to ./gpu_out), and the JAX step's optimized HLO to
# $OUT/step_jax.hlo.txt, to read its fusions after the GPU is gone; the tables are printed last.
#
#   bash scripts/gpu_check.sh [BUDGET_SECONDS [STAGE...]]   # default 540 s, every stage in the order below
#   bash scripts/gpu_check.sh 300 profile_jax step_          # only the stages these begin (environment always runs)
#   CONFIG=tiny COMPILE= bash scripts/gpu_check.sh           # a dry run of the stages on a CPU
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
BUDGET=${1:-540}
shift $(($# > 0))
ONLY=" $* "  # the stages asked for; none named: all
CONFIG=${CONFIG:-small}
COMPILE=${COMPILE---compile}
PY=${PYTHON:-python3}
LOG=$OUT/gpu_check.log
START=$SECONDS
# JAX would otherwise take 75% of the GPU up front and leave torch.compile's step too little (seen on an H100).
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false

wanted() {  # wanted NAME: whether the stage NAME runs: environment always; the rest when asked for by a prefix
    [[ $1 == environment || $ONLY == "  " ]] && return 0
    local word
    for word in $ONLY; do [[ $1 == "$word"* ]] && return 0; done
    return 1
}

stage() {  # stage NAME LIMIT_SECONDS COMMAND...: run it under a limit, its output into the log
    local name=$1 limit=$2 left
    shift 2
    wanted "$name" || return 0
    left=$((BUDGET - (SECONDS - START)))
    if ((left < limit / 2)); then
        echo "== $name: skipped, ${left}s of the budget left" | tee -a "$LOG"
        return
    fi
    ((limit > left)) && limit=$left
    echo "== $name (limit ${limit}s): $*" | tee -a "$LOG"
    local t0=$SECONDS
    timeout --kill-after=10 "$limit" "$@" >>"$LOG" 2>&1
    echo "== $name: exit $? after $((SECONDS - t0))s" | tee -a "$LOG"
}

bench() {  # bench NAME LIMIT ARGS...: scripts/bench.py on $CONFIG, its JSON to $OUT/NAME.json
    local name=$1 limit=$2
    shift 2
    stage "$name" "$limit" "$PY" scripts/bench.py --config "$CONFIG" --steps 10 --warmup 3 --repeats 3 \
        --json "$OUT/$name.json" "$@"
}

stage environment 60 bash -c "nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; $PY -c '
import jax, flax, optax, torch
print(\"jax\", jax.__version__, jax.devices(), \"flax\", flax.__version__, \"optax\", optax.__version__)
print(\"torch\", torch.__version__, torch.cuda.is_available() and torch.cuda.get_device_name())'"

# The tests that only a GPU runs (cuDNN attention), and the fused loss there; fp32 matmuls at full precision,
# since the tests hold fp32 to 1e-6 and a GPU's default is TF32.
stage tests 150 env JAX_PLATFORMS= XLA_FLAGS= JAX_DEFAULT_MATMUL_PRECISION=highest "$PY" -m pytest -q -p no:cacheprovider \
    tests/test_jax_model.py::test_cudnn_attention_matches_xla_on_gpu tests/test_jax_loss.py

# Where a step's time goes, by kind of kernel (scripts/profile_step.py), at the fastest setting measured so far.
stage profile_jax 120 "$PY" scripts/profile_step.py --config "$CONFIG" --framework jax --top 25 \
    --json "$OUT/profile_jax.json" --hlo "$OUT/step_jax.hlo.txt" \
    --set train.batch_size=32 train.micro_batch_size=32
# The issue's target run: small, 32 x 1024 tokens a step in one micro-batch, bf16, JAX and compiled PyTorch side by
# side. (The loss's chunk sizes, model.loss_exp and XLA's GEMM flags are settled: docs/benchmarks.md.)
bench step_micro32 240 --frameworks jax,torch --set train.batch_size=32 train.micro_batch_size=32 $COMPILE
# Whether cuBLASLt takes the bias and GELU into the matmuls' epilogues (custom calls "__cublas$lt$matmul" with an
# epilogue in their backend_config): --xla_gpu_enable_cublaslt=true changed nothing measurable, which suggests it
# does not; the HLO says which pattern fails.
XLA_FLAGS=--xla_gpu_enable_cublaslt=true stage hlo_cublaslt 100 "$PY" scripts/profile_step.py --config "$CONFIG" \
    --framework jax --steps 1 --top 10 --hlo "$OUT/step_jax_cublaslt.hlo.txt" \
    --set train.batch_size=32 train.micro_batch_size=32
# Twice the rows: the larger micro-batch was 1.03x the smaller before (docs/benchmarks.md).
bench step_micro64 120 --frameworks jax --set train.batch_size=64 train.micro_batch_size=64
stage profile_torch 200 "$PY" scripts/profile_step.py --config "$CONFIG" --framework torch $COMPILE --top 25 \
    --json "$OUT/profile_torch.json" --set train.batch_size=32 train.micro_batch_size=32
# Greedy KV-cached decoding in bf16 at batch 1 and 16, both generators beside transformers' generate() in turns
# (issue 20's GPU rows; the CPU figures are in docs/benchmarks.md).
stage decode_bf16 150 "$PY" scripts/bench_decode.py --config "$CONFIG" --precision bf16 --batch-sizes 1,16 \
    --repeats 2 --json "$OUT/decode_bf16.json"

# Issue 21's kernels, each behind its switch: the head and loss as Pallas/Triton kernels (model.loss_kernel=pallas,
# gpt2_jax/pallas_loss.py) and the GELU in fp32 (model.gelu_dtype=fp32), off, each on, and together, beside
# torch.compile in the same process. Their limits add up to more than one lent GPU's 15 minutes: docs/benchmarks.md
# ("Issue 21's kernels") lists them in three calls, by value.
export PY  # for the stages that run a bash -c script
KERNEL=jax:model.loss_kernel=pallas
GELU=jax:model.gelu_dtype=fp32
BOTH=jax:model.loss_kernel=pallas:model.gelu_dtype=fp32
sized() {  # sized NAME: a GPT-2 size on a real run; $CONFIG itself in a dry run (CONFIG=tiny)
    if [[ $CONFIG == small ]]; then echo "$1"; else echo "$CONFIG"; fi
}
# The timed windows: bench()'s on a real run; one short window in a dry run, where the kernels run in Pallas's
# interpreter (seconds a step on a CPU).
WINDOW="--steps 10 --warmup 3 --repeats 3"
[[ $CONFIG == small ]] || WINDOW="--steps 1 --warmup 1 --repeats 1"
kbench() {  # kbench NAME LIMIT CONFIG ARGS...: scripts/bench.py over $WINDOW, its JSON to $OUT/NAME.json
    local name=$1 limit=$2 config=$3
    shift 3
    stage "$name" "$limit" "$PY" scripts/bench.py --config "$config" $WINDOW --json "$OUT/$name.json" "$@"
}
# The compiled Triton kernels against the chunked loss on the GPU, fp32 (at full matmul precision) and bf16.
stage kernels_tests 120 env JAX_PLATFORMS= XLA_FLAGS= JAX_DEFAULT_MATMUL_PRECISION=highest "$PY" -m pytest -q \
    -p no:cacheprovider tests/test_pallas_kernels.py -k on_gpu
kbench kernels_small32 300 "$CONFIG" --frameworks jax,$KERNEL,$GELU,$BOTH,torch \
    --set train.batch_size=32 train.micro_batch_size=32 $COMPILE
kbench kernels_small64 240 "$CONFIG" --frameworks jax,$KERNEL,$BOTH,torch \
    --set train.batch_size=64 train.micro_batch_size=64 $COMPILE
# Where the time goes before and after: the loss's reductions and the GELU's fusions should shrink.
stage kernels_profile_before 120 "$PY" scripts/profile_step.py --config "$CONFIG" --framework jax --top 25 \
    --json "$OUT/kernels_profile_before.json" --set train.batch_size=32 train.micro_batch_size=32
stage kernels_profile_after 120 "$PY" scripts/profile_step.py --config "$CONFIG" --framework jax --top 25 \
    --json "$OUT/kernels_profile_after.json" --hlo "$OUT/step_jax_kernels.hlo.txt" \
    --set train.batch_size=32 train.micro_batch_size=32 model.loss_kernel=pallas model.gelu_dtype=fp32
# Whether the fp32 GELU lets cuBLASLt take bias + GELU into the c_fc matmul's epilogue: look for
# "__cublas$lt$matmul" with a GELU epilogue in the HLO (compare $OUT/step_jax_cublaslt.hlo.txt, the default GELU).
XLA_FLAGS=--xla_gpu_enable_cublaslt=true stage kernels_hlo_gelu 100 "$PY" scripts/profile_step.py \
    --config "$CONFIG" --framework jax --steps 1 --top 10 --hlo "$OUT/step_jax_cublaslt_gelu_fp32.hlo.txt" \
    --set train.batch_size=32 train.micro_batch_size=32 model.gelu_dtype=fp32
# medium and large at the largest micro-batch that fits (MICRO_MEDIUM, MICRO_LARGE: set them from
# kernels_memory's tables; the defaults fit an 80 GB GPU by the memory plan with the chunked loss).
MICRO_MEDIUM=${MICRO_MEDIUM:-16}
MICRO_LARGE=${MICRO_LARGE:-8}
kbench kernels_medium 240 "$(sized medium)" --frameworks jax,$BOTH,torch \
    --set train.batch_size=$MICRO_MEDIUM train.micro_batch_size=$MICRO_MEDIUM $COMPILE
kbench kernels_large 240 "$(sized large)" --frameworks jax,$BOTH,torch \
    --set train.batch_size=$MICRO_LARGE train.micro_batch_size=$MICRO_LARGE $COMPILE
# tokamax's LayerNorm (model.layer_norm=tokamax) against Flax's. The GPU machine cannot reach PyPI: if its image
# lacks tokamax, it installs from wheels carried along (here: pip download --no-deps -d .kernel_wheels tokamax==0.0.12
# einshape==1.0 immutabledict==4.3.1 jaxtyping==0.3.11 qwix==0.1.8 typeguard==2.13.3 wadler_lindig==0.1.8).
stage kernels_layernorm 240 bash -c '"$PY" -c "import tokamax" 2>/dev/null \
    || "$PY" -m pip install -q --no-deps --no-index .kernel_wheels/*.whl || exit
    exec "$PY" scripts/bench.py "$@"' bench --config "$CONFIG" $WINDOW --json "$OUT/kernels_layernorm.json" \
    --frameworks jax,jax:model.layer_norm=tokamax,$BOTH:model.layer_norm=tokamax \
    --set train.batch_size=32 train.micro_batch_size=32
# Memory with the logits gone: the compiler's buffers of one device's step (compiled, not run) at growing
# micro-batches of small and xl, the kernel on; the largest whose total fits the GPU is the answer.
MEMORY_PLAN='config=$1; shift; for n in "$@"; do "$PY" scripts/memory_plan.py --compiled --configs "$config" \
    --set train.batch_size=$n train.micro_batch_size=$n model.loss_kernel=pallas || exit; done'
stage kernels_memory_small 240 bash -c "$MEMORY_PLAN" memory_plan "$(sized small)" 64 128 192
stage kernels_memory_xl 300 bash -c "$MEMORY_PLAN" memory_plan "$(sized xl)" 16 24 32

echo "== done after $((SECONDS - START))s"
sed -n '/^== environment (/,/^== environment:/p' "$LOG" | sed 1d
grep -E "^(FAILED|ERROR)|[0-9]+ (passed|failed)" "$LOG"
grep -h -A6 "tokens a step" "$LOG"
grep -h "^batch " "$LOG"
awk '/^== kernels_memory_[a-z]+ \(/{on=1; next} /^== kernels_memory_[a-z]+:/{on=0} on && /^\|/' "$LOG"
# the profiles' tables, without the libraries' warnings
awk '/^== (kernels_)?profile_[a-z]+ \(/{on=1; next} /^== (kernels_)?profile_[a-z]+:/{on=0} on && !/Warning|warn|USDT|^[WI][0-9]{4} /' "$LOG"
