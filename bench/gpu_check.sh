#!/usr/bin/env bash
# The prepared GPU check: run as is, from anywhere, on a lent NVIDIA machine (H100/H200).
#
#     bash bench/gpu_check.sh                  # everything below, < 8 minutes
#     bash bench/gpu_check.sh --fetch-wheels   # HERE, with network: the wheels the device lacks
#
# Stages (each logged with a UTC timestamp and the seconds since the start; a failing stage
# is recorded and the next one runs; every command runs under `timeout`, and the time left
# is shared out so that the whole run ends within GPU_CHECK_BUDGET seconds, default 450):
#   0. GPU detection: without nvidia-smi, or when it lists no GPU, say so and exit 0
#      (nothing is installed).
#   1. environment: nvidia-smi, python, CuPy. The lent H200 image's python3 has CuPy
#      (cupy-cuda13x), numpy and pytest but not cffi, pycparser or gguf, and there is no
#      network: missing packages are installed from carried wheels (.whl/, wheelhouse/ or
#      shared/wheels/: pip --no-index --no-deps --target into a temporary folder put on
#      PYTHONPATH, never a second CuPy). Without CuPy in python3: a venv .venv-gpu with
#      `pip install -e '.[test,cuda12|cuda13]'` (the extra matching the driver's CUDA major;
#      from the wheel folders when they hold CuPy, else from the network). No CuPy, no wheels,
#      no network: say so and stop (exit 3).
#   2. the native library: python setup.py -q build_ext --inplace (falls back to a carried
#      .whl/_native.abi3.so when the build fails).
#   3. pytest -m gpu on every test file with a gpu marker (the kernels through
#      cupy.RawModule, the quantized products, the end-to-end test when its model is there).
#   4. compute-sanitizer memcheck, racecheck, synccheck on the GPU kernel tests (every
#      tests/test_cuda_*.py with a gpu marker but the end-to-end one; CuPy's memory pool
#      switched off so memcheck sees every allocation's real bounds).
#   5. bench/bench_gpu.py on the default Gemma model when present, the synthetic llama-3.2-1b
#      Q4_0 (also checked against the CPU backend: teacher-forced greedy) and the synthetic
#      llama-3.1-8b Q4_0 (3.7 GiB), both made here: --kv dense first, then --kv a2ats.
# Results: $OUT/gpu_check.log, $OUT/pytest_gpu.xml, $OUT/bench_gpu.json (dense) and
# $OUT/bench_gpu_a2ats.json when $OUT is set, else the same names under bench/results/.
# Exit status: 0 every stage passed (or no GPU); 1 some stage failed; 3 no way to get CuPy
# and the packages. Environment: PYTHON (default python3), GPU_CHECK_BUDGET (seconds).
#
# Before a device run (here): `bash bench/gpu_check.sh --fetch-wheels` downloads cffi,
# pycparser and gguf for CPython 3.12 manylinux x86-64 into .whl/ and builds a portable
# (x86-64-v3) native library there; then `echo /.whl/ >> .git/info/exclude` and run on the
# device with carry [".whl"] and the command `bash bench/gpu_check.sh`.
set -u
set -o pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
ROOT=$(pwd)
BUDGET=${GPU_CHECK_BUDGET:-450}
PY=${PYTHON:-python3}
WHEEL_DIR_NAMES=(.whl wheelhouse shared/wheels)

# ---------------------------------------------------------------------------------------
if [ "${1:-}" = "--fetch-wheels" ]; then
    dest=${2:-.whl}
    mkdir -p "$dest" || exit 2
    vpy=$PY
    [ -x .venv/bin/python ] && vpy=.venv/bin/python
    # the versions this checkout's venv uses, else the newest
    pins=()
    for p in cffi pycparser gguf; do
        v=$("$vpy" -m pip show "$p" 2>/dev/null | sed -n 's/^Version: //p')
        pins+=("$p${v:+==$v}")
    done
    wpy=${GPU_CHECK_WHEEL_PY:-3.12}   # the device image's python3 is 3.12
    echo "downloading ${pins[*]} for CPython $wpy manylinux x86-64 into $dest/"
    "$vpy" -m pip download --no-deps --only-binary=:all: --python-version "$wpy" --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d "$dest" "${pins[@]}" || exit 1
    echo "building a portable (x86-64-v3) native library into $dest/_native.abi3.so"
    tmp=$(mktemp -d) || exit 1
    if A2ATS_MARCH=-march=x86-64-v3 "$vpy" setup.py -q build_ext --build-lib "$tmp/lib" \
            --build-temp "$tmp/tmp" >/dev/null; then
        cp "$tmp"/lib/a2ats_lite/_native*.so "$dest/" && ls -la "$dest"
    else
        echo "native build failed (the device will build its own)"
    fi
    rm -rf "$tmp"
    case $dest in
        /*) echo "copy $dest into the repository (e.g. .whl/), ignore it and carry it in the device run" ;;
        *) echo "now: echo /${dest#./}/ >> .git/info/exclude; carry [\"${dest#./}\"] in the device run" ;;
    esac
    exit 0
fi

# ---------------------------------------------------------------------------------------
RES=${OUT:-bench/results}
mkdir -p "$RES" || exit 2
LOG=$RES/gpu_check.log
: >"$LOG" || exit 2
T0=$SECONDS
SUMMARY=()
FAILS=0

log() {
    local line
    line="$(date -u +%Y-%m-%dT%H:%M:%SZ) [+$((SECONDS - T0))s] $*"
    printf '%s\n' "$line" >>"$LOG"
    printf '%s\n' "$line"
}

left() { echo $((BUDGET - (SECONDS - T0))); }

# the log's lines after line $1 that match $2, the last $3 of them on one line
since() { tail -n "+$(($1 + 1))" "$LOG" | grep -E "$2" | tail -n "$3" | tr '\n' ' '; }

summary() {
    log "---- summary ($((SECONDS - T0))s of the ${BUDGET}s budget) ----"
    local s
    for s in ${SUMMARY[@]+"${SUMMARY[@]}"}; do
        log "  $s"
    done
    local f files=$LOG
    for f in pytest_gpu.xml bench_gpu.json bench_gpu_a2ats.json; do
        [ -f "$RES/$f" ] && files="$files, $RES/$f"
    done
    log "results: $files"
}

# stage NAME CAP RESERVE CMD...: run CMD under timeout min(CAP, time left - RESERVE), its
# output into the log (and stdout). RESERVE: seconds kept for the stages after this one, for
# the default 450 s budget (scaled with GPU_CHECK_BUDGET).
stage() {
    local name=$1 cap=$2 reserve=$(($3 * BUDGET / 450))
    shift 3
    local t rc start
    t=$(($(left) - reserve))
    ((t > cap)) && t=$cap
    if ((t < 10)); then
        log "SKIP  $name: no time left ($(left)s of the ${BUDGET}s budget, ${reserve}s kept for later stages)"
        SUMMARY+=("$name: skipped (no time left)")
        return 0
    fi
    log "START $name (timeout ${t}s): $*"
    start=$SECONDS
    timeout -k 10 "$t" "$@" 2>&1 | tee -a "$LOG"
    rc=${PIPESTATUS[0]}
    if ((rc == 0)); then
        log "OK    $name ($((SECONDS - start))s)"
        SUMMARY+=("$name: ok ($((SECONDS - start))s)")
    elif ((rc == 124 || rc == 137)); then
        log "FAIL  $name: timed out after ${t}s"
        SUMMARY+=("$name: TIMED OUT (${t}s)")
        FAILS=$((FAILS + 1))
    else
        log "FAIL  $name: exit status $rc ($((SECONDS - start))s)"
        SUMMARY+=("$name: FAILED, exit status $rc ($((SECONDS - start))s)")
        FAILS=$((FAILS + 1))
    fi
    return "$rc"
}

finish() {
    summary
    if ((FAILS > 0)); then
        log "gpu_check: $FAILS stage(s) failed"
        exit 1
    fi
    log "gpu_check: every stage that ran passed"
    exit 0
}

log "gpu_check in $ROOT: budget ${BUDGET}s, results in $RES"

# ---- 0. is there a GPU? (before anything is installed) -----------------------------------
if ! command -v nvidia-smi >/dev/null 2>&1; then
    log "no GPU: nvidia-smi not found on this machine; nothing to check, nothing installed"
    exit 0
fi
if ! timeout 20 nvidia-smi -L >>"$LOG" 2>&1; then
    log "no GPU: nvidia-smi lists no usable GPU here; nothing to check, nothing installed"
    exit 0
fi

# ---- 1. environment ------------------------------------------------------------------------
stage "nvidia-smi" 20 400 nvidia-smi
CUDA_MAJOR=$(timeout 20 nvidia-smi 2>/dev/null | sed -n 's/.*CUDA Version: *\([0-9]*\).*/\1/p' | head -n1)
log "driver's CUDA version major: ${CUDA_MAJOR:-unknown}"

[ -x .venv-gpu/bin/python ] && PY=.venv-gpu/bin/python
if ! command -v "$PY" >/dev/null 2>&1; then
    log "no python ($PY) on this machine: cannot run the GPU checks"
    SUMMARY+=("environment: no python")
    summary
    exit 3
fi
SITE=${TMPDIR:-/tmp}/a2ats-gpu-site
export PYTHONPATH="$SITE:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
log "python: $(command -v "$PY") $("$PY" -V 2>&1); PYTHONPATH=$PYTHONPATH"

# prints the missing modules (space separated); "cupy-no-gpu" when CuPy sees no device
probe() {
    timeout 60 "$PY" - <<'EOF' 2>>"$LOG"
import importlib
mods = ["numpy", "cffi", "gguf", "jinja2", "click", "sentencepiece", "tokenizers", "tqdm", "yaml",
        "google.protobuf", "pytest", "cupy"]
missing = []
for m in mods:
    try:
        importlib.import_module(m)
    except Exception:
        missing.append(m)
if "cupy" not in missing:
    import cupy
    try:
        n = cupy.cuda.runtime.getDeviceCount()
    except Exception:
        n = 0
    if n == 0:
        missing.append("cupy-no-gpu")
print(" ".join(missing))
EOF
}

WHEEL_DIRS=()
for d in "${WHEEL_DIR_NAMES[@]}"; do
    if compgen -G "$d/*.whl" >/dev/null; then WHEEL_DIRS+=("$d"); fi
done
n_wheels=0
for d in ${WHEEL_DIRS[@]+"${WHEEL_DIRS[@]}"}; do
    for w in "$d"/*.whl; do n_wheels=$((n_wheels + 1)); log "  wheel: $w"; done
done
log "wheel folders: ${WHEEL_DIRS[*]:-none} ($n_wheels wheels)"

# missing modules, minus the marker that CuPy imports but sees no GPU
probe_missing() {
    local m
    m=$(probe)
    if [[ " $m " == *" cupy-no-gpu "* ]]; then
        log "CuPy imports but sees no GPU (driver/runtime mismatch?): the GPU stages will fail" >&2
        timeout 30 "$PY" -c "import cupy; cupy.cuda.runtime.getDeviceCount()" >>"$LOG" 2>&1
        m=${m//cupy-no-gpu/}
    fi
    local words
    read -r -a words <<<"$m"
    echo "${words[*]}"
}

MISSING=$(probe_missing)
log "missing python modules: ${MISSING:-none}"

if [ -n "$MISSING" ] && [[ " $MISSING " != *" cupy "* ]]; then
    # CuPy is there (the image's): add what is missing, never a second CuPy or CUDA libraries
    wheels=()
    for d in ${WHEEL_DIRS[@]+"${WHEEL_DIRS[@]}"}; do
        for w in "$d"/*.whl; do
            case "$(basename "$w")" in cupy*|nvidia_*) ;; *) wheels+=("$w") ;; esac
        done
    done
    if ((${#wheels[@]})); then
        stage "install (carried wheels)" 90 360 "$PY" -m pip install -q --no-index --no-deps \
            --no-compile --no-cache-dir --upgrade --target "$SITE" "${wheels[@]}"
    else
        dists=()
        for m in $MISSING; do
            case $m in
                yaml) dists+=(pyyaml) ;; google.protobuf) dists+=(protobuf) ;;
                cffi) dists+=(cffi pycparser) ;; *) dists+=("$m") ;;
            esac
        done
        if ((${#dists[@]})); then
            stage "install (network)" 90 360 "$PY" -m pip install -q --no-cache-dir --timeout 10 \
                --retries 0 --target "$SITE" "${dists[@]}"
        fi
    fi
    MISSING=$(probe_missing)
    log "missing python modules now: ${MISSING:-none}"
elif [[ " $MISSING " == *" cupy "* ]]; then
    # no CuPy in this python: a venv with the project's extras (wheels preferred)
    extra=cuda12
    [ "${CUDA_MAJOR:-12}" -ge 13 ] 2>/dev/null && extra=cuda13
    have_cupy_wheel=0
    for d in ${WHEEL_DIRS[@]+"${WHEEL_DIRS[@]}"}; do
        compgen -G "$d/cupy*.whl" >/dev/null && have_cupy_wheel=1
    done
    links=()
    for d in ${WHEEL_DIRS[@]+"${WHEEL_DIRS[@]}"}; do links+=(--find-links "$d"); done
    if ((have_cupy_wheel)); then
        log "no CuPy in $PY: a venv .venv-gpu from the carried wheels (extra $extra)"
        stage "venv" 30 360 "$PY" -m venv --system-site-packages .venv-gpu &&
            stage "install (venv, carried wheels)" 240 200 .venv-gpu/bin/python -m pip install -q \
                --no-index "${links[@]}" -e ".[test,$extra]"
    else
        log "no CuPy in $PY and no CuPy wheel carried: trying the network (extra $extra)"
        stage "venv" 30 360 "$PY" -m venv .venv-gpu &&
            stage "install (venv, network)" 240 200 .venv-gpu/bin/python -m pip install -q \
                --timeout 10 --retries 0 ${links[@]+"${links[@]}"} -e ".[test,$extra]"
    fi
    [ -x .venv-gpu/bin/python ] && PY=.venv-gpu/bin/python
    MISSING=$(probe_missing)
    log "missing python modules now ($PY): ${MISSING:-none}"
fi

if [ -n "$MISSING" ]; then
    if [[ " $MISSING " == *" cupy "* ]]; then
        log "STOP: no CuPy and no way to install it here (no CuPy wheel carried, no network)."
    else
        log "STOP: python modules missing: $MISSING, and no wheels or network to install them."
    fi
    log "Here, with network: bash bench/gpu_check.sh --fetch-wheels; then carry .whl in the device run."
    SUMMARY+=("environment: missing $MISSING: stopped")
    summary
    exit 3
fi
SUMMARY+=("environment: $PY with CuPy $(timeout 60 "$PY" -c 'import cupy; print(cupy.__version__)' 2>/dev/null)")

# ---- 2. the native library --------------------------------------------------------------
stage "native build" 150 330 "$PY" setup.py -q build_ext --inplace
if ! timeout 60 "$PY" -c "import a2ats_lite.native" >>"$LOG" 2>&1; then
    for d in ${WHEEL_DIRS[@]+"${WHEEL_DIRS[@]}"}; do
        if compgen -G "$d/_native*.so" >/dev/null; then
            log "the native library does not import: using the carried $d/_native*.so"
            cp "$d"/_native*.so a2ats_lite/ && break
        fi
    done
fi
stage "native import" 60 320 "$PY" -c \
    "import a2ats_lite.native as n; print('native library ok, AVX2 kernels:', n.simd())"

# ---- 3. pytest -m gpu -------------------------------------------------------------------
GPU_TESTS=$(grep -l 'pytest\.mark\.gpu' tests/test_*.py 2>/dev/null | tr '\n' ' ')
log "test files with gpu tests: ${GPU_TESTS:-none}"
if [ -n "$GPU_TESTS" ]; then
    n0=$(wc -l <"$LOG")
    # shellcheck disable=SC2086  # one word per file
    stage "pytest -m gpu" 180 260 "$PY" -m pytest -m gpu -q -rs -p no:cacheprovider \
        --continue-on-collection-errors --junitxml="$RES/pytest_gpu.xml" $GPU_TESTS
    SUMMARY+=("  pytest: $(since "$n0" '[0-9]+ (passed|failed|skipped|error|deselected)' 1)")
fi

# ---- 4. compute-sanitizer ---------------------------------------------------------------
SAN=$(command -v compute-sanitizer || true)
[ -z "$SAN" ] && [ -x /usr/local/cuda/bin/compute-sanitizer ] && SAN=/usr/local/cuda/bin/compute-sanitizer
KERNEL_TESTS=""
for f in tests/test_cuda_*.py; do      # the kernel tests (not the end-to-end backend test)
    [ "$f" = tests/test_cuda_backend.py ] && continue
    grep -q 'pytest\.mark\.gpu' "$f" 2>/dev/null && KERNEL_TESTS="$KERNEL_TESTS $f"
done
if [ -z "$SAN" ]; then
    log "compute-sanitizer not found: sanitizer stages skipped"
    SUMMARY+=("compute-sanitizer: not found")
elif [ -z "$KERNEL_TESTS" ]; then
    log "no gpu-parametrized kernel tests: sanitizer stages skipped"
else
    # CuPy's pool hands out pieces of larger cudaMalloc blocks, hiding small overruns from
    # memcheck: a sitecustomize switches it off for these runs only
    SANSITE=${TMPDIR:-/tmp}/a2ats-san-site
    mkdir -p "$SANSITE"
    cat >"$SANSITE/sitecustomize.py" <<'EOF'
import os
if os.environ.get("A2ATS_CUPY_NO_POOL"):
    try:
        import cupy
        cupy.cuda.set_allocator(None)
        cupy.cuda.set_pinned_memory_allocator(None)
    except Exception as e:  # the run goes on with the pool
        print("sitecustomize: could not switch CuPy's pool off:", e)
EOF
    for tool in memcheck racecheck synccheck; do
        n0=$(wc -l <"$LOG")
        # shellcheck disable=SC2086
        stage "compute-sanitizer $tool" 100 190 env A2ATS_CUPY_NO_POOL=1 \
            PYTHONPATH="$SANSITE:$PYTHONPATH" "$SAN" --tool "$tool" --error-exitcode 99 \
            --target-processes all --print-limit 50 "$PY" -m pytest -m gpu -q -x -p no:cacheprovider $KERNEL_TESTS
        SUMMARY+=("  $tool: $(since "$n0" 'ERROR SUMMARY|[0-9]+ (passed|failed|skipped)' 2)")
    done
fi

# ---- 5. the benchmark ---------------------------------------------------------------------
mkdir -p models
M8=models/synth-llama-3.1-8b-q4_0.gguf
M1=models/synth-llama-3.2-1b-q4_0.gguf
GEMMA=models/gemma-3-270m-q4_k_m.gguf
if [ ! -f "$M1" ]; then
    stage "make $M1" 60 150 "$PY" bench/make_synth_gguf.py --shape llama-3.2-1b --type q4_0 -o "$M1" ||
        rm -f "$M1"
fi
if [ ! -f "$M8" ]; then
    stage "make $M8" 150 120 "$PY" bench/make_synth_gguf.py --shape llama-3.1-8b --type q4_0 -o "$M8" ||
        rm -f "$M8"
fi
MODELS=()
if [ -f "$GEMMA" ]; then MODELS+=("$GEMMA"); else log "default model $GEMMA not present: not benchmarked"; fi
[ -f "$M1" ] && MODELS+=("$M1")
[ -f "$M8" ] && MODELS+=("$M8")
if ((${#MODELS[@]})); then
    # dense first (the small models first: the greedy check against the CPU, then speed);
    # bench_gpu.py writes bench/results/bench_gpu.json and $OUT/bench_gpu.json after every cell
    stage "bench_gpu dense" 300 60 "$PY" bench/bench_gpu.py --device cuda --model "${MODELS[@]}" \
        --kv dense --greedy 8 --out bench/results/bench_gpu.json
    # then a2ats (random codebooks) with the time left, into its own file
    stage "bench_gpu a2ats" 300 5 env -u OUT "$PY" bench/bench_gpu.py --device cuda \
        --model "${MODELS[@]}" --kv a2ats --out "$RES/bench_gpu_a2ats.json"
else
    log "no model to benchmark"
    SUMMARY+=("bench_gpu: no model")
    FAILS=$((FAILS + 1))
fi
if [ "$RES" != bench/results ] && [ -f bench/results/bench_gpu.json ] && [ ! -f "$RES/bench_gpu.json" ]; then
    cp bench/results/bench_gpu.json "$RES/"
fi
finish
