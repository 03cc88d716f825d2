// cuda_shim.h: run unmodified CUDA C kernels on the CPU (tests only).
//
// Force-included (g++ -std=c++20 -pthread -include cuda_shim.h) in front of the same text NVRTC
// compiles (a2ats_lite.backend.nvrtc.load_source). tests/cuda_shim/shim.py generates the launch
// wrappers and loads the result with ctypes. Model:
//   * blocks run one after another (x fastest, then y, z); every CUDA thread of a block is an OS
//     thread (std::thread), created once per launch and reused for every block;
//   * __syncthreads() = std::barrier::arrive_and_wait; a thread that returns from the kernel
//     calls arrive_and_drop, so early returns never deadlock the others (as on sm_70+);
//   * warp shuffles / votes: each lane writes its value into a per-warp slot array, a per-warp
//     barrier, reads its partner's slot, a second barrier. Only full masks (0xffffffff) and full
//     warps (32 live lanes) are supported: anything else aborts with a message;
//   * `__shared__` is `static` (one block at a time => one copy per block); shim.py follows each
//     such declaration with a shim::SharedPoison object, so the first thread of every block to
//     reach it refills the array with the poison byte 0xFF (NaN for f32/f16, -1 for integers):
//     reading shared memory no thread of this block wrote shows up as on the GPU, not as the
//     previous block's values. `extern __shared__ T name[];` is rewritten by shim.py into a
//     pointer to the per-launch dynamic buffer (exactly shared_mem bytes, malloc'd, poisoned
//     before every block);
//   * a launch that does not finish within $A2ATS_SHIM_TIMEOUT seconds (default 300) aborts with
//     a message: a deadlock (__syncthreads or a warp collective reached by only part of the
//     threads) fails the test instead of hanging it;
//   * threadIdx/blockIdx are thread_local, blockDim/gridDim globals;
//   * __half = _Float16; atomics through std::atomic_ref; fast-math intrinsics map to <cmath>.
// Not modelled: timing, occupancy, bank conflicts, denormal flushing, FMA contraction, the
// approximation error of __expf & co. Compare against float64 references with tolerances.
#ifndef A2ATS_CUDA_SHIM_H
#define A2ATS_CUDA_SHIM_H
#define A2ATS_SHIM 1

#include <atomic>
#include <barrier>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <thread>
#include <vector>
#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <mutex>
#include <unordered_map>

// ---- qualifiers ------------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __restrict__ __restrict
#define __constant__
#define __shared__ static
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
#define __CUDACC_SHIM__ 1

struct uint3 { unsigned int x = 0, y = 0, z = 0; };
struct dim3 {
    unsigned int x = 1, y = 1, z = 1;
    constexpr dim3(unsigned a = 1, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {}
};
struct float2 { float x, y; };
struct float4 { float x, y, z, w; };
struct int2 { int x, y; };
struct int4 { int x, y, z, w; };
struct uint2 { unsigned int x, y; };
struct uint4 { unsigned int x, y, z, w; };
inline float2 make_float2(float a, float b) { return {a, b}; }
inline float4 make_float4(float a, float b, float c, float d) { return {a, b, c, d}; }

inline thread_local uint3 threadIdx;
inline thread_local uint3 blockIdx;
inline dim3 blockDim;
inline dim3 gridDim;
constexpr int warpSize = 32;

namespace shim {

[[noreturn]] inline void fail(const char* what) {
    std::fprintf(stderr, "cuda_shim: %s (block %u,%u,%u thread %u,%u,%u)\n", what,
                 blockIdx.x, blockIdx.y, blockIdx.z, threadIdx.x, threadIdx.y, threadIdx.z);
    std::fflush(stderr);
    std::abort();
}

struct Warp {
    std::unique_ptr<std::barrier<>> bar;
    int lanes = 32;                 // live lanes of this warp at block start
    int exited = 0;                 // lanes that returned (guarded by bar phases)
    uint64_t slot[32];
    bool gone[32];
};

struct Block {
    std::unique_ptr<std::barrier<>> bar;
    std::vector<Warp> warps;
};

inline Block g_block;                        // the block now running (one at a time)
inline long g_block_gen = 0;                 // incremented for every block (static smem poison)
inline std::mutex g_poison_mu;
inline std::unordered_map<const void*, long> g_poison_gen;

// Declared by shim.py right after every `__shared__` declaration: the first thread of a block to
// get here poisons the array; the mutex orders it before every other thread's accesses.
struct SharedPoison {
    SharedPoison(void* p, size_t n) {
        std::lock_guard<std::mutex> lk(g_poison_mu);
        long& g = g_poison_gen[p];
        if (g != g_block_gen) {
            std::memset(p, 0xFF, n);
            g = g_block_gen;
        }
    }
};
inline unsigned char* dyn_smem = nullptr;    // extern __shared__ buffer of this launch
inline size_t dyn_smem_bytes = 0;
inline thread_local int t_linear = 0;        // linear thread id in the block

inline int lane_id() { return t_linear & 31; }
inline Warp& my_warp() { return g_block.warps[t_linear >> 5]; }

inline void check_mask(unsigned mask, const char* fn) {
    if (mask != 0xffffffffu) {
        char buf[160];
        std::snprintf(buf, sizeof buf, "%s with mask 0x%08x: only full masks are supported", fn, mask);
        fail(buf);
    }
    Warp& w = my_warp();
    if (w.lanes != 32) fail("warp collective in a partial warp (block size not a multiple of 32)");
}

// exchange one 64-bit value with lane `src` of the warp; reading a lane that exited aborts.
inline uint64_t exchange(uint64_t v, int src) {
    Warp& w = my_warp();
    const int lane = lane_id();
    w.slot[lane] = v;
    w.bar->arrive_and_wait();
    if (w.gone[src]) fail("warp shuffle reads a lane that has returned");
    uint64_t r = w.slot[src];
    w.bar->arrive_and_wait();
    return r;
}

template <class T> inline uint64_t to_bits(T v) {
    static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>);
    uint64_t u = 0;
    std::memcpy(&u, &v, sizeof(T));
    return u;
}
template <class T> inline T from_bits(uint64_t u) {
    T v;
    std::memcpy(&v, &u, sizeof(T));
    return v;
}

// Launch: run `body` for every thread of every block. Returns 0 or an error code.
inline int launch(dim3 grid, dim3 block, size_t smem, const std::function<void()>& body) {
    const long nthreads = (long)block.x * block.y * block.z;
    if (nthreads <= 0 || nthreads > 1024 || block.x > 1024 || block.y > 1024 || block.z > 64)
        return 1;
    if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.y > 65535 || grid.z > 65535) return 2;
    blockDim = block;
    gridDim = grid;
    std::unique_ptr<unsigned char, decltype(&std::free)> buf(nullptr, &std::free);
    if (smem) buf.reset((unsigned char*)std::aligned_alloc(16, (smem + 15) / 16 * 16));
    dyn_smem = buf.get();
    dyn_smem_bytes = smem;
    const int n_warps = (int)((nthreads + 31) / 32);
    const long n_blocks = (long)grid.x * grid.y * grid.z;

    auto reset_block = [&]() noexcept {
        ++g_block_gen;
        g_block.bar = std::make_unique<std::barrier<>>(nthreads);
        g_block.warps.resize(n_warps);
        for (int w = 0; w < n_warps; ++w) {
            Warp& wp = g_block.warps[w];
            wp.lanes = (int)std::min<long>(32, nthreads - 32L * w);
            wp.bar = std::make_unique<std::barrier<>>(wp.lanes);
            wp.exited = 0;
            std::memset(wp.gone, 0, sizeof wp.gone);
            std::memset(wp.slot, 0, sizeof wp.slot);
        }
        if (smem) std::memset(dyn_smem, 0xFF, smem);
    };
    reset_block();
    long next_block = 0;   // written only in the boundary completion (all threads waiting)
    auto on_boundary = [&]() noexcept {
        ++next_block;
        if (next_block < n_blocks) reset_block();
    };
    std::barrier boundary((std::ptrdiff_t)nthreads, on_boundary);

    auto worker = [&](int lin) {
        t_linear = lin;
        threadIdx.x = lin % block.x;
        threadIdx.y = (lin / block.x) % block.y;
        threadIdx.z = lin / (block.x * block.y);
        for (long b = 0; b < n_blocks; ++b) {
            blockIdx.x = (unsigned)(b % grid.x);
            blockIdx.y = (unsigned)((b / grid.x) % grid.y);
            blockIdx.z = (unsigned)(b / ((long)grid.x * grid.y));
            body();
            // this thread has returned: it no longer takes part in barriers of this block
            Warp& w = my_warp();
            w.gone[lin & 31] = true;   // read by partners only after a barrier phase
            w.bar->arrive_and_drop();
            g_block.bar->arrive_and_drop();
            boundary.arrive_and_wait();
        }
    };
    std::mutex done_mu;
    std::condition_variable done_cv;
    long n_done = 0;
    auto run = [&](int lin) {
        worker(lin);
        std::lock_guard<std::mutex> lk(done_mu);
        if (++n_done == nthreads) done_cv.notify_one();
    };
    std::vector<std::thread> threads;
    threads.reserve(nthreads);
    for (int t = 0; t < nthreads; ++t) threads.emplace_back(run, t);
    {
        const char* env = std::getenv("A2ATS_SHIM_TIMEOUT");
        const double limit = env ? std::atof(env) : 300.0;
        std::unique_lock<std::mutex> lk(done_mu);
        if (!done_cv.wait_for(lk, std::chrono::duration<double>(limit),
                              [&] { return n_done == nthreads; })) {
            std::fprintf(stderr, "cuda_shim: launch (grid %u,%u,%u block %u,%u,%u) did not finish "
                         "within %.0f s: deadlock? (a __syncthreads or warp collective reached by "
                         "only part of the threads)\n", grid.x, grid.y, grid.z, block.x, block.y,
                         block.z, limit);
            std::fflush(stderr);
            std::abort();
        }
    }
    for (auto& t : threads) t.join();
    g_block.warps.clear();
    g_block.bar.reset();
    dyn_smem = nullptr;
    dyn_smem_bytes = 0;
    return 0;
}

}  // namespace shim

// ---- synchronization ---------------------------------------------------------------------------
inline void __syncthreads() { shim::g_block.bar->arrive_and_wait(); }
inline void __syncwarp(unsigned mask = 0xffffffffu) {
    shim::check_mask(mask, "__syncwarp");
    shim::my_warp().bar->arrive_and_wait();
}
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline void __threadfence_block() { std::atomic_thread_fence(std::memory_order_seq_cst); }

// ---- warp shuffles and votes (full masks, full warps) -----------------------------------------
template <class T> inline T __shfl_sync(unsigned mask, T v, int src, int width = 32) {
    shim::check_mask(mask, "__shfl_sync");
    if (width != 32) shim::fail("__shfl_sync: width != 32 is not supported");
    return shim::from_bits<T>(shim::exchange(shim::to_bits(v), src & 31));
}
template <class T> inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
    shim::check_mask(mask, "__shfl_xor_sync");
    if (width != 32) shim::fail("__shfl_xor_sync: width != 32 is not supported");
    return shim::from_bits<T>(shim::exchange(shim::to_bits(v), (shim::lane_id() ^ lane_mask) & 31));
}
template <class T> inline T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
    shim::check_mask(mask, "__shfl_down_sync");
    if (width != 32) shim::fail("__shfl_down_sync: width != 32 is not supported");
    int lane = shim::lane_id();
    int src = lane + (int)delta;
    if (src > 31) src = lane;          // out of range: the caller's own value
    return shim::from_bits<T>(shim::exchange(shim::to_bits(v), src));
}
template <class T> inline T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
    shim::check_mask(mask, "__shfl_up_sync");
    if (width != 32) shim::fail("__shfl_up_sync: width != 32 is not supported");
    int lane = shim::lane_id();
    int src = lane - (int)delta;
    if (src < 0) src = lane;
    return shim::from_bits<T>(shim::exchange(shim::to_bits(v), src));
}
inline unsigned __ballot_sync(unsigned mask, int pred) {
    shim::check_mask(mask, "__ballot_sync");
    shim::Warp& w = shim::my_warp();
    const int lane = shim::lane_id();
    w.slot[lane] = pred ? 1u : 0u;
    w.bar->arrive_and_wait();
    unsigned r = 0;
    for (int i = 0; i < 32; ++i) {
        if (w.gone[i]) shim::fail("__ballot_sync with a lane that has returned");
        r |= (unsigned)(w.slot[i] & 1u) << i;
    }
    w.bar->arrive_and_wait();
    return r;
}
inline int __any_sync(unsigned mask, int pred) { return __ballot_sync(mask, pred) != 0; }
inline int __all_sync(unsigned mask, int pred) { return __ballot_sync(mask, pred) == 0xffffffffu; }
inline unsigned __activemask() { return 0xffffffffu; }

// ---- atomics -----------------------------------------------------------------------------------
template <class T> inline T atomicAdd(T* p, T v) { return std::atomic_ref<T>(*p).fetch_add(v); }
template <class T> inline T atomicSub(T* p, T v) { return std::atomic_ref<T>(*p).fetch_sub(v); }
template <class T> inline T atomicExch(T* p, T v) { return std::atomic_ref<T>(*p).exchange(v); }
template <class T> inline T atomicCAS(T* p, T cmp, T v) {
    std::atomic_ref<T>(*p).compare_exchange_strong(cmp, v);
    return cmp;
}
template <class T> inline T atomicMax(T* p, T v) {
    std::atomic_ref<T> a(*p);
    T old = a.load();
    while (old < v && !a.compare_exchange_weak(old, v)) {}
    return old;
}
template <class T> inline T atomicMin(T* p, T v) {
    std::atomic_ref<T> a(*p);
    T old = a.load();
    while (old > v && !a.compare_exchange_weak(old, v)) {}
    return old;
}
template <class T> inline T atomicOr(T* p, T v) { return std::atomic_ref<T>(*p).fetch_or(v); }
template <class T> inline T atomicAnd(T* p, T v) { return std::atomic_ref<T>(*p).fetch_and(v); }

// ---- bit casts and integer intrinsics -----------------------------------------------------------
inline float __int_as_float(int i) { return std::bit_cast<float>(i); }
inline float __uint_as_float(unsigned u) { return std::bit_cast<float>(u); }
inline int __float_as_int(float f) { return std::bit_cast<int>(f); }
inline unsigned __float_as_uint(float f) { return std::bit_cast<unsigned>(f); }
inline int __popc(unsigned x) { return std::popcount(x); }
inline int __popcll(unsigned long long x) { return std::popcount(x); }
inline int __clz(unsigned x) { return x ? std::countl_zero(x) : 32; }
inline int __ffs(int x) { return x ? std::countr_zero((unsigned)x) + 1 : 0; }
inline unsigned __brev(unsigned x) {
    unsigned r = 0;
    for (int i = 0; i < 32; ++i) r |= ((x >> i) & 1u) << (31 - i);
    return r;
}
template <class T> inline T __ldg(const T* p) { return *p; }

// min/max as CUDA's overloaded device functions
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
inline float min(float a, float b) { return std::fmin(a, b); }
inline float max(float a, float b) { return std::fmax(a, b); }

// ---- float intrinsics ---------------------------------------------------------------------------
inline float __expf(float x) { return std::exp(x); }
inline float __exp10f(float x) { return std::pow(10.0f, x); }
inline float __logf(float x) { return std::log(x); }
inline float __log2f(float x) { return std::log2(x); }
inline float __sinf(float x) { return std::sin(x); }
inline float __cosf(float x) { return std::cos(x); }
inline float __tanf(float x) { return std::tan(x); }
inline float __powf(float a, float b) { return std::pow(a, b); }
inline void __sincosf(float x, float* s, float* c) { *s = std::sin(x); *c = std::cos(x); }
inline void sincosf(float x, float* s, float* c) { *s = std::sin(x); *c = std::cos(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __frcp_rn(float a) { return 1.0f / a; }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline float __fsqrt_rn(float x) { return std::sqrt(x); }
inline float __saturatef(float x) { return x < 0.f ? 0.f : (x > 1.f ? 1.f : x); }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline int __float2int_rn(float x) { return (int)std::nearbyint(x); }
inline int __float2int_rz(float x) { return (int)x; }
inline int __float2int_rd(float x) { return (int)std::floor(x); }
inline float __int2float_rn(int x) { return (float)x; }

// ---- half precision ----------------------------------------------------------------------------
typedef _Float16 __half;
typedef _Float16 half;
struct __half2 { __half x, y; };
inline float __half2float(__half h) { return (float)h; }
inline __half __float2half(float f) { return (__half)f; }
inline __half __float2half_rn(float f) { return (__half)f; }
inline __half __int2half_rn(int i) { return (__half)(float)i; }
inline __half __ushort_as_half(unsigned short u) { return std::bit_cast<__half>(u); }
inline unsigned short __half_as_ushort(__half h) { return std::bit_cast<unsigned short>(h); }
inline __half __hadd(__half a, __half b) { return (__half)((float)a + (float)b); }
inline __half __hsub(__half a, __half b) { return (__half)((float)a - (float)b); }
inline __half __hmul(__half a, __half b) { return (__half)((float)a * (float)b); }
inline __half __hfma(__half a, __half b, __half c) { return (__half)std::fma((float)a, (float)b, (float)c); }
inline __half __hneg(__half a) { return -a; }
inline __half2 __halves2half2(__half a, __half b) { return {a, b}; }
inline __half2 __floats2half2_rn(float a, float b) { return {(__half)a, (__half)b}; }
inline __half2 __float2half2_rn(float a) { return {(__half)a, (__half)a}; }
inline float2 __half22float2(__half2 h) { return {(float)h.x, (float)h.y}; }
inline float __low2float(__half2 h) { return (float)h.x; }
inline float __high2float(__half2 h) { return (float)h.y; }
inline __half __low2half(__half2 h) { return h.x; }
inline __half __high2half(__half2 h) { return h.y; }
inline __half2 __hadd2(__half2 a, __half2 b) { return {__hadd(a.x, b.x), __hadd(a.y, b.y)}; }
inline __half2 __hmul2(__half2 a, __half2 b) { return {__hmul(a.x, b.x), __hmul(a.y, b.y)}; }

#endif  // A2ATS_CUDA_SHIM_H
