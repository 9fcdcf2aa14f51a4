/*
 * CUDA's built-ins on CPU threads, so that the plugin's .cu (through cudaPortability.h) compiles
 * with g++ -std=c++20 -DTOKENFUSE_CPU_EMULATION and runs in CI, where there is no GPU.
 *
 * Model: each CUDA thread of a block is a fiber (a stack of its own, switched in user space on one
 * OS thread); up to kMultiprocessors blocks of a grid are resident at once, their fibers taking
 * turns, and a finished block's place goes to the next block in order, as a GPU's block scheduler
 * does (so a block may wait for another one that is running); __syncthreads() is a barrier over the
 * block at which a fiber yields until all have arrived; warp shuffles and votes exchange values
 * through a per-warp buffer and one wait on a per-warp barrier; shared memory is one per-block
 * arena filled with 0xFF (so a read of never-written shared memory shows as NaN / -1); device
 * memory is host memory. A thread that returns drops out of its barriers, as a CUDA thread that
 * exits no longer takes part in __syncthreads. Fibers make a barrier cost two user-space switches
 * and keep a launch on one core. Under ThreadSanitizer each fiber is also a ThreadSanitizer fiber
 * (a thread of its own to the race detector): switches carry no happens-before, barriers and warp
 * exchanges do, so a race between two CUDA threads is reported as between two OS threads.
 *
 * Limits checked at launch as a GPU would: at most 1024 threads per block, grid.y and grid.z at
 * most 65535, static + dynamic shared memory at most 99 KiB. `tfemu::setExecute(false)` makes
 * launches check their configuration without running (to test a grid of 65536 blocks quickly).
 *
 * Warp operations must be called by every lane of the warp with the full mask (the kernels of this
 * project only do so); anything else stops the program with a message instead of deadlocking.
 */
#pragma once

#include <atomic>
#include <cfloat>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <math.h>
#include <memory>
#include <tuple>
#include <type_traits>
#include <vector>

#include <sys/mman.h>
#if !defined(__x86_64__)
#include <ucontext.h>
#endif

#if defined(__SANITIZE_THREAD__)
#include <sanitizer/tsan_interface.h>
#define TFEMU_RELEASE(address) __tsan_release(address)
#define TFEMU_ACQUIRE(address) __tsan_acquire(address)
#else
#define TFEMU_RELEASE(address) ((void) (address))
#define TFEMU_ACQUIRE(address) ((void) (address))
#endif

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#define TFEMU_POISON(address, bytes) ASAN_POISON_MEMORY_REGION(address, bytes)
#define TFEMU_UNPOISON(address, bytes) ASAN_UNPOISON_MEMORY_REGION(address, bytes)
#define TFEMU_STACK_BYTES (1u << 20) // AddressSanitizer's redzones make frames larger
#else
#define TFEMU_STACK_BYTES (256u << 10)
#define TFEMU_POISON(address, bytes) ((void) (address), (void) (bytes))
#define TFEMU_UNPOISON(address, bytes) ((void) (address), (void) (bytes))
#endif

// ---- qualifiers ---------------------------------------------------------------------------------
#define __device__
#define __host__
#define __global__
#define __forceinline__ inline
#define __align__(n) alignas(n)
#define __launch_bounds__(...)

// ---- runtime types ------------------------------------------------------------------------------
enum cudaError_t : int
{
    cudaSuccess = 0,
    cudaErrorInvalidValue = 1,
    cudaErrorInvalidConfiguration = 9,
    cudaErrorCooperativeLaunchTooLarge = 82,
};
using cudaStream_t = struct CUstream_st*;

struct dim3
{
    unsigned x, y, z;
    constexpr dim3(unsigned vx = 1, unsigned vy = 1, unsigned vz = 1)
        : x(vx)
        , y(vy)
        , z(vz)
    {
    }
};
using uint3 = dim3;

constexpr int warpSize = 32;

// ---- vector types -------------------------------------------------------------------------------
struct alignas(8) float2
{
    float x, y;
};
struct alignas(16) float4
{
    float x, y, z, w;
};
struct alignas(8) int2
{
    int x, y;
};
struct alignas(16) int4
{
    int x, y, z, w;
};
struct alignas(8) uint2
{
    unsigned x, y;
};
struct alignas(16) uint4
{
    unsigned x, y, z, w;
};
inline float2 make_float2(float x, float y)
{
    return {x, y};
}
inline float4 make_float4(float x, float y, float z, float w)
{
    return {x, y, z, w};
}
inline int2 make_int2(int x, int y)
{
    return {x, y};
}
inline int4 make_int4(int x, int y, int z, int w)
{
    return {x, y, z, w};
}
inline uint2 make_uint2(unsigned x, unsigned y)
{
    return {x, y};
}
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w)
{
    return {x, y, z, w};
}

// ---- half precision (IEEE binary16 through the compiler's _Float16) -------------------------------
struct alignas(2) __half
{
    uint16_t bits;
    __half() = default;
    __half(float v)
    {
        _Float16 const h = static_cast<_Float16>(v); // round to nearest even, as __float2half_rn
        std::memcpy(&bits, &h, sizeof(bits));
    }
    operator float() const
    {
        _Float16 h;
        std::memcpy(&h, &bits, sizeof(bits));
        return static_cast<float>(h);
    }
};
struct alignas(4) __half2
{
    __half x, y;
};
inline __half __float2half(float v)
{
    return __half(v);
}
inline __half __float2half_rn(float v)
{
    return __half(v);
}
inline float __half2float(__half v)
{
    return float(v);
}
inline __half2 __halves2half2(__half low, __half high)
{
    return {low, high};
}
inline float __low2float(__half2 v)
{
    return float(v.x);
}
inline float __high2float(__half2 v)
{
    return float(v.y);
}
inline float2 __half22float2(__half2 v)
{
    return {float(v.x), float(v.y)};
}

// ---- math ---------------------------------------------------------------------------------------
inline float rsqrtf(float v)
{
    return 1.f / sqrtf(v);
}
inline float __expf(float v)
{
    return expf(v);
}
inline float __fdividef(float a, float b)
{
    return a / b;
}
// Correctly rounded single operations (the CPU build compiles with -ffp-contract=off).
inline float __fadd_rn(float a, float b)
{
    return a + b;
}
inline float __fsub_rn(float a, float b)
{
    return a - b;
}
inline int __ffs(int x) // CUDA's: the 1-based position of the lowest set bit, 0 for none
{
    return __builtin_ffs(x);
}

inline int __popc(unsigned x) // CUDA's: the number of set bits
{
    return __builtin_popcount(x);
}

inline float __fmul_rn(float a, float b)
{
    return a * b;
}
template <typename T>
inline T __ldg(T const* address)
{
    return *address;
}

namespace tfemu
{

constexpr unsigned kMaxBlockThreads = 1024;
constexpr unsigned kMaxGridYZ = 65535;
constexpr size_t kMaxSharedBytes = 99 * 1024;
//! Multiprocessors the emulated device reports: few, so that small batches spread over several blocks.
constexpr int kMultiprocessors = 8;
// Room past the limit so an oversized kernel still runs its block and the launch reports the error.
constexpr size_t kArenaBytes = 2 * kMaxSharedBytes;

//! Emulator bookkeeping that every fiber of a thread reads and writes. Fibers never run at once,
//! but ThreadSanitizer sees each as a thread of its own: relaxed atomics keep this bookkeeping out
//! of its reports without ordering the fibers' own memory accesses.
template <typename T>
class Relaxed
{
public:
    constexpr Relaxed(T initial = T())
        : value(initial)
    {
    }
    Relaxed(Relaxed const& other)
        : value(T(other))
    {
    }
    operator T() const
    {
        return value.load(std::memory_order_relaxed);
    }
    Relaxed& operator=(T next)
    {
        value.store(next, std::memory_order_relaxed);
        return *this;
    }
    Relaxed& operator=(Relaxed const& other)
    {
        return *this = T(other);
    }
    T operator++()
    {
        return *this = *this + 1;
    }
    T operator--()
    {
        return *this = *this - 1;
    }

private:
    std::atomic<T> value;
};

void yieldFiber();
// Barrier arrivals and exits on this thread so far: no change in a sweep over the fibers is a deadlock.
inline thread_local Relaxed<unsigned long long> arrivals;

//! std::barrier's arrive_and_wait / arrive_and_drop for fibers: a waiting fiber yields until the
//! phase it arrived in completes. For ThreadSanitizer, each arrival releases and each completed
//! wait acquires, on one address per phase parity (a fast fiber's next arrival must not reach a
//! fiber still leaving this phase); an exiting thread releases nothing, as in CUDA.
class Barrier
{
public:
    explicit Barrier(unsigned participants)
        : expected(participants)
    {
    }
    void arrive_and_wait()
    {
        unsigned const phase = completed;
        TFEMU_RELEASE(&phases[phase % 2]);
        ++arrived;
        ++arrivals;
        completeIfAllArrived();
        while (phase == completed)
        {
            yieldFiber();
        }
        TFEMU_ACQUIRE(&phases[phase % 2]);
    }
    void arrive_and_drop()
    {
        --expected;
        ++arrivals;
        completeIfAllArrived();
    }

private:
    void completeIfAllArrived()
    {
        if (arrived > 0 && arrived == expected)
        {
            arrived = 0;
            ++completed;
        }
    }
    Relaxed<unsigned> expected;
    Relaxed<unsigned> arrived{0};
    Relaxed<unsigned> completed{0}; // phases completed so far
    char phases[2] = {};            // ThreadSanitizer's synchronisation addresses
};

struct Warp
{
    explicit Warp(unsigned laneCount)
        : lanes(laneCount)
        , exchange(laneCount)
    {
    }
    unsigned lanes;
    Barrier exchange;
    // Two buffers used in turn: a lane writes buffer p of exchange k + 2 only after every lane has
    // passed the wait of exchange k + 1, so after all have read exchange k: one wait per exchange.
    uint64_t buffer[2][32] = {};
};

struct Block
{
    Block(unsigned threads, size_t dynamicBytes)
        : sync(threads)
        , dynamicBytes(dynamicBytes)
    {
        for (unsigned first = 0; first < threads; first += 32)
        {
            warps.push_back(std::make_unique<Warp>(threads - first < 32 ? threads - first : 32));
        }
        std::memset(arena, 0xFF, sizeof(arena));
        TFEMU_POISON(arena, sizeof(arena));
        TFEMU_UNPOISON(arena, dynamicBytes);
    }
    ~Block()
    {
        TFEMU_UNPOISON(arena, sizeof(arena));
    }
    Barrier sync;
    std::vector<std::unique_ptr<Warp>> warps;
    size_t dynamicBytes;
    Relaxed<size_t> sharedHighWater{0};
    alignas(128) unsigned char arena[kArenaBytes];
};

//! A CUDA thread's own state, one per fiber (not thread-locals, which the fibers of a thread share).
struct ThreadState
{
    Block* block = nullptr;
    unsigned linear = 0;
    size_t bump = 0;        // next free byte of the static shared declarations
    unsigned exchanges = 0; // warp exchanges so far (picks the buffer)
    dim3 threadIdx, blockIdx, blockDim, gridDim;
};

// The running fiber's state, set by the scheduler before each switch.
inline thread_local std::atomic<ThreadState*> running{nullptr};

inline ThreadState& self()
{
    return *running.load(std::memory_order_relaxed);
}
inline thread_local cudaError_t lastError = cudaSuccess;
inline std::atomic<bool> execute{true};

//! false: launches check their configuration and return without running the kernel.
inline void setExecute(bool run)
{
    execute = run;
}

//! Blocks resident at once (at most kMultiprocessors): fewer stands for a GPU that other work shares.
inline std::atomic<unsigned> residentBlocks{unsigned(kMultiprocessors)};

inline void setResident(unsigned blocks)
{
    residentBlocks = blocks < 1 ? 1 : (blocks > unsigned(kMultiprocessors) ? unsigned(kMultiprocessors) : blocks);
}

[[noreturn]] inline void fail(char const* what)
{
    std::fprintf(stderr, "cudaCpuEmulation: %s\n", what);
    std::abort();
}

inline Warp& currentWarp()
{
    return *self().block->warps[self().linear / 32];
}

inline unsigned currentLane()
{
    return self().linear % 32;
}

inline void checkFullMask(unsigned mask)
{
    Warp const& warp = currentWarp();
    unsigned const present = warp.lanes == 32 ? 0xffffffffu : (1u << warp.lanes) - 1u;
    if ((mask & present) != present)
    {
        fail("warp operation with a partial mask: the emulation supports converged, full-mask warps only");
    }
}

//! The shared-memory address of the next static declaration (the same in every thread, since every
//! thread executes the same declarations in the same order).
template <typename T>
T& staticShared()
{
    ThreadState& thread = self();
    Block& block = *thread.block;
    size_t const start = (block.dynamicBytes + thread.bump + alignof(T) - 1) / alignof(T) * alignof(T);
    size_t const end = start + sizeof(T);
    if (end > kArenaBytes)
    {
        fail("static shared memory far beyond the 99 KiB a block may have");
    }
    thread.bump = end - block.dynamicBytes;
    if (block.sharedHighWater < end)
    {
        block.sharedHighWater = end;
    }
    TFEMU_UNPOISON(block.arena + start, sizeof(T));
    return *reinterpret_cast<T*>(block.arena + start);
}

inline unsigned char* dynamicShared()
{
    return self().block->arena;
}

//! One value per lane in, lane `source(lane)`'s value out (own value where source is out of range).
template <typename T, typename Source>
T exchange(T value, Source source)
{
    static_assert(sizeof(T) <= sizeof(uint64_t) && std::is_trivially_copyable_v<T>, "shuffle of a type over 8 bytes");
    Warp& warp = currentWarp();
    unsigned const lane = currentLane();
    uint64_t* buffer = warp.buffer[self().exchanges++ % 2];
    std::memcpy(&buffer[lane], &value, sizeof(T));
    warp.exchange.arrive_and_wait();
    int const from = source(int(lane));
    T result = value;
    if (from >= 0 && unsigned(from) < warp.lanes)
    {
        std::memcpy(&result, &buffer[from], sizeof(T));
    }
    return result;
}

inline unsigned ballot(bool predicate)
{
    Warp& warp = currentWarp();
    unsigned const lane = currentLane();
    uint64_t* buffer = warp.buffer[self().exchanges++ % 2];
    buffer[lane] = predicate ? 1 : 0;
    warp.exchange.arrive_and_wait();
    unsigned bits = 0;
    for (unsigned l = 0; l < warp.lanes; ++l)
    {
        bits |= buffer[l] ? 1u << l : 0u;
    }
    return bits;
}

class Workers;
Workers& workers();

template <typename... Params>
cudaError_t runGrid(void (*kernel)(Params...), std::tuple<Params...> const& args, dim3 grid, dim3 block,
    size_t dynamicSharedBytes);

} // namespace tfemu

// ---- thread indices -----------------------------------------------------------------------------
#define threadIdx (::tfemu::self().threadIdx)
#define blockIdx (::tfemu::self().blockIdx)
#define blockDim (::tfemu::self().blockDim)
#define gridDim (::tfemu::self().gridDim)

// ---- shared memory ------------------------------------------------------------------------------
#define TF_SHARED(Type, name) Type& name = ::tfemu::staticShared<Type>()
#define TF_DYNAMIC_SHARED(name) unsigned char* const name = ::tfemu::dynamicShared()

// ---- synchronisation ----------------------------------------------------------------------------
inline void __syncthreads()
{
    tfemu::self().block->sync.arrive_and_wait();
}
inline void __syncwarp(unsigned mask = 0xffffffffu)
{
    tfemu::checkFullMask(mask);
    tfemu::currentWarp().exchange.arrive_and_wait();
}
inline void __threadfence_block()
{
    std::atomic_thread_fence(std::memory_order_seq_cst);
}
//! CUDA's sleep in a spin loop: here the fiber yields, so the other threads and blocks go on.
inline void __nanosleep(unsigned)
{
    tfemu::yieldFiber();
}

inline void __threadfence()
{
    std::atomic_thread_fence(std::memory_order_seq_cst);
}

// ---- warp shuffles and votes --------------------------------------------------------------------
template <typename T>
T __shfl_sync(unsigned mask, T value, int srcLane, int width = warpSize)
{
    tfemu::checkFullMask(mask);
    return tfemu::exchange(value, [=](int lane) { return (lane / width) * width + srcLane % width; });
}
template <typename T>
T __shfl_xor_sync(unsigned mask, T value, int laneMask, int width = warpSize)
{
    tfemu::checkFullMask(mask);
    return tfemu::exchange(value, [=](int lane) {
        int const to = lane ^ laneMask;
        return to / width > lane / width ? -1 : to;
    });
}
template <typename T>
T __shfl_up_sync(unsigned mask, T value, unsigned delta, int width = warpSize)
{
    tfemu::checkFullMask(mask);
    return tfemu::exchange(value, [=](int lane) {
        int const from = lane - int(delta);
        return from < (lane / width) * width ? -1 : from;
    });
}
template <typename T>
T __shfl_down_sync(unsigned mask, T value, unsigned delta, int width = warpSize)
{
    tfemu::checkFullMask(mask);
    return tfemu::exchange(value, [=](int lane) {
        int const from = lane + int(delta);
        return from >= (lane / width + 1) * width ? -1 : from;
    });
}
inline unsigned __ballot_sync(unsigned mask, int predicate)
{
    tfemu::checkFullMask(mask);
    return tfemu::ballot(predicate != 0) & mask;
}
inline int __any_sync(unsigned mask, int predicate)
{
    return __ballot_sync(mask, predicate) != 0;
}
inline int __all_sync(unsigned mask, int predicate)
{
    tfemu::checkFullMask(mask);
    unsigned const lanes = tfemu::currentWarp().lanes;
    unsigned const present = lanes == 32 ? 0xffffffffu : (1u << lanes) - 1u;
    return (tfemu::ballot(predicate != 0) & mask & present) == (mask & present);
}
inline unsigned __activemask()
{
    unsigned const lanes = tfemu::currentWarp().lanes;
    return lanes == 32 ? 0xffffffffu : (1u << lanes) - 1u;
}

// ---- atomics ------------------------------------------------------------------------------------
template <typename T>
T atomicAdd(T* address, T value)
{
    static_assert(std::is_same_v<T, int> || std::is_same_v<T, unsigned> || std::is_same_v<T, float>);
    return std::atomic_ref<T>(*address).fetch_add(value);
}
template <typename T>
T atomicExch(T* address, T value)
{
    static_assert(std::is_same_v<T, int> || std::is_same_v<T, unsigned> || std::is_same_v<T, float>);
    return std::atomic_ref<T>(*address).exchange(value);
}
template <typename T>
T atomicCAS(T* address, T compare, T value)
{
    static_assert(std::is_same_v<T, int> || std::is_same_v<T, unsigned>);
    std::atomic_ref<T>(*address).compare_exchange_strong(compare, value);
    return compare; // the old value, whether or not it was replaced
}
template <typename T>
T atomicMax(T* address, T value)
{
    static_assert(std::is_same_v<T, int> || std::is_same_v<T, unsigned>);
    std::atomic_ref<T> target(*address);
    T old = target.load();
    while (old < value && !target.compare_exchange_weak(old, value))
    {
    }
    return old;
}
template <typename T>
T atomicMin(T* address, T value)
{
    static_assert(std::is_same_v<T, int> || std::is_same_v<T, unsigned>);
    std::atomic_ref<T> target(*address);
    T old = target.load();
    while (old > value && !target.compare_exchange_weak(old, value))
    {
    }
    return old;
}

// ---- launches -----------------------------------------------------------------------------------
inline cudaError_t cudaGetLastError()
{
    cudaError_t const error = tfemu::lastError;
    tfemu::lastError = cudaSuccess;
    return error;
}

#if defined(__SANITIZE_ADDRESS__)
// AddressSanitizer must be told which stack is live across each switch.
#define TFEMU_START_SWITCH(save, bottom, bytes) __sanitizer_start_switch_fiber(save, bottom, bytes)
#define TFEMU_FINISH_SWITCH(save, bottom, bytes) __sanitizer_finish_switch_fiber(save, bottom, bytes)
#else
#define TFEMU_START_SWITCH(save, bottom, bytes) ((void) (save), (void) (bottom), (void) (bytes))
#define TFEMU_FINISH_SWITCH(save, bottom, bytes) ((void) (save), (void) (bottom), (void) (bytes))
#endif
#if defined(__SANITIZE_THREAD__)
// Tells ThreadSanitizer which fiber runs next, carrying no happens-before (a switch with it would
// order every fiber after all those that ran before, finished ones included).
#define TFEMU_TSAN_SWITCH(fiber) __tsan_switch_to_fiber(fiber, __tsan_switch_to_fiber_no_sync)
#else
#define TFEMU_TSAN_SWITCH(fiber) ((void) (fiber))
#endif

namespace tfemu
{
#if defined(__x86_64__)
//! A fiber's saved stack pointer; its callee-saved registers and floating-point control words are
//! on its stack. Switching needs no system call (swapcontext saves the signal mask with one, which
//! made it most of the emulation's time).
struct Context
{
    void* stack = nullptr;
};

//! Pushes the System V callee-saved registers, MXCSR and the x87 control word, saves the stack
//! pointer in *from, loads `to` and pops what was pushed there.
__attribute__((naked, noinline)) static void switchStack(void** /*from*/, void* /*to*/)
{
    asm volatile(
        "pushq %rbp\n\tpushq %rbx\n\tpushq %r12\n\tpushq %r13\n\tpushq %r14\n\tpushq %r15\n\t"
        "subq $8, %rsp\n\tstmxcsr (%rsp)\n\tfnstcw 4(%rsp)\n\t"
        "movq %rsp, (%rdi)\n\tmovq %rsi, %rsp\n\t"
        "ldmxcsr (%rsp)\n\tfldcw 4(%rsp)\n\taddq $8, %rsp\n\t"
        "popq %r15\n\tpopq %r14\n\tpopq %r13\n\tpopq %r12\n\tpopq %rbx\n\tpopq %rbp\n\tret");
}

//! A context that, switched to, calls entry() on [stack, stack + bytes) (entry must never return).
inline void prepare(Context& context, char* stack, size_t bytes, void (*entry)())
{
    auto* top = reinterpret_cast<uint64_t*>(reinterpret_cast<uintptr_t>(stack + bytes) & ~uintptr_t(15));
    *--top = 0;                                      // entry's return address: none
    *--top = reinterpret_cast<uintptr_t>(entry);     // switchStack's ret lands here
    for (int reg = 0; reg < 6; ++reg)
    {
        *--top = 0;                                  // rbp, rbx, r12-r15
    }
    --top;
    asm volatile("stmxcsr (%0)\n\tfnstcw 4(%0)" : : "r"(top) : "memory"); // this thread's FP modes
    context.stack = top;
}

//! Switches from `from` to `to`, which ThreadSanitizer knows as `raceFiber`.
inline void switchContext(Context& from, Context& to, void* raceFiber)
{
    void* const target = to.stack; // read while ThreadSanitizer still sees the fiber being left
    TFEMU_TSAN_SWITCH(raceFiber);
    switchStack(&from.stack, target);
}
#else
struct Context
{
    ucontext_t state;
};

inline void prepare(Context& context, char* stack, size_t bytes, void (*entry)())
{
    getcontext(&context.state);
    context.state.uc_stack.ss_sp = stack;
    context.state.uc_stack.ss_size = bytes;
    context.state.uc_link = nullptr;
    makecontext(&context.state, entry, 0);
}

inline void switchContext(Context& from, Context& to, void* raceFiber)
{
    TFEMU_TSAN_SWITCH(raceFiber);
    swapcontext(&from.state, &to.state);
}
#endif
} // namespace tfemu

//! The fibers that play the CUDA threads of the resident blocks, all on the launching thread. Stacks
//! are mapped once (a guard page below each, so an overflow faults) and reused by every block. A
//! sweep resumes each unfinished fiber until it yields (at a barrier, a warp exchange or a spin
//! wait) or returns; between sweeps a block whose fibers all ended is torn down and the next block
//! takes its place. For ThreadSanitizer, each fiber's start is ordered after its block's set-up and
//! its end before its block's tear-down, and nothing else: switches carry no happens-before, so only
//! barriers (and atomics) order the CUDA threads.
class tfemu::Workers
{
public:
    //! job(block, slot, thread) plays one CUDA thread; start(block, slot) sets a block up in a
    //! resident slot before its first fiber runs, finish(block, slot) tears it down after its last.
    using Job = std::function<void(unsigned, unsigned, unsigned)>;
    using Edge = std::function<void(unsigned, unsigned)>;

    void run(unsigned blocks, unsigned threads, unsigned resident, Job const& job, Edge const& start, Edge const& finish)
    {
        unsigned const fiberCount = resident * threads;
        while (stacks.size() < fiberCount)
        {
            void* stack = mmap(nullptr, kGuardBytes + TFEMU_STACK_BYTES, PROT_READ | PROT_WRITE,
                MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_STACK, -1, 0);
            if (stack == MAP_FAILED || mprotect(stack, kGuardBytes, PROT_NONE) != 0)
            {
                fail("cannot map a fiber stack");
            }
            stacks.push_back(static_cast<char*>(stack) + kGuardBytes);
#if defined(__SANITIZE_THREAD__)
            raceFibers.push_back(__tsan_create_fiber(0));
#else
            raceFibers.push_back(nullptr);
#endif
        }
        this->job = &job;
        fibers.assign(fiberCount, Fiber{});
        std::vector<unsigned> slotBlock(resident, blocks); // the block in each slot; `blocks`: empty
        std::vector<unsigned> slotLive(resident, 0);
        unsigned next = 0;
        auto const dispatch = [&](unsigned slot) {
            if (next == blocks)
            {
                slotBlock[slot] = blocks;
                return;
            }
            slotBlock[slot] = next;
            slotLive[slot] = threads;
            start(next, slot);
            for (unsigned t = 0; t < threads; ++t)
            {
                Fiber& fiber = fibers[slot * threads + t];
                fiber = Fiber{};
                // A fiber that ended never unwound its frames: clear AddressSanitizer's marks on its stack.
                TFEMU_UNPOISON(stacks[slot * threads + t], TFEMU_STACK_BYTES);
                prepare(fiber.context, stacks[slot * threads + t], TFEMU_STACK_BYTES, &Workers::entry);
                fiber.index = slot * threads + t;
                fiber.blockNumber = next;
                fiber.slot = slot;
                fiber.thread = t;
            }
            for (unsigned t = 0; t < threads; ++t)
            {
                TFEMU_RELEASE(&fibers[slot * threads + t].startEdge); // the set-up, before every fiber's start
            }
            ++next;
        };
        for (unsigned slot = 0; slot < resident; ++slot)
        {
            dispatch(slot);
        }
        for (bool live = true; live;)
        {
            unsigned long long const before = arrivals;
            bool ended = false;
            for (unsigned slot = 0; slot < resident; ++slot)
            {
                for (unsigned t = 0; slotBlock[slot] < blocks && t < threads; ++t)
                {
                    Fiber& fiber = fibers[slot * threads + t];
                    if (fiber.finished)
                    {
                        continue;
                    }
                    running.store(&fiber, std::memory_order_relaxed);
                    void* fakeStack = nullptr;
                    TFEMU_START_SWITCH(&fakeStack, stacks[fiber.index], TFEMU_STACK_BYTES);
                    switchContext(scheduler, fiber.context, raceFibers[fiber.index]);
                    TFEMU_FINISH_SWITCH(fakeStack, nullptr, nullptr);
                    slotLive[slot] -= fiber.finished ? 1 : 0;
                }
                if (slotBlock[slot] < blocks && slotLive[slot] == 0)
                {
                    for (unsigned t = 0; t < threads; ++t)
                    {
                        TFEMU_ACQUIRE(&fibers[slot * threads + t].endEdge); // every fiber's end, before the tear-down
                    }
                    finish(slotBlock[slot], slot);
                    ended = true;
                    dispatch(slot);
                }
            }
            live = false;
            for (unsigned slot = 0; slot < resident; ++slot)
            {
                live = live || slotBlock[slot] < blocks;
            }
            if (live && !ended && arrivals == before)
            {
                fail("deadlock: the threads of the resident blocks wait for what none of them will do");
            }
        }
        running.store(nullptr, std::memory_order_relaxed);
        this->job = nullptr;
    }

    //! From a fiber: back to the scheduler, which resumes it after the other fibers had their turn.
    static void yield()
    {
        Fiber& fiber = static_cast<Fiber&>(self());
        workers().switchToScheduler(fiber, &fiber.fakeStack);
        TFEMU_FINISH_SWITCH(fiber.fakeStack, nullptr, nullptr);
    }

    ~Workers()
    {
        for (char* stack : stacks)
        {
            munmap(stack - kGuardBytes, kGuardBytes + TFEMU_STACK_BYTES);
        }
#if defined(__SANITIZE_THREAD__)
        for (void* fiber : raceFibers)
        {
            __tsan_destroy_fiber(fiber);
        }
#endif
    }

private:
    static constexpr size_t kGuardBytes = 4096;

    struct Fiber : ThreadState
    {
        Context context;
        unsigned index = 0; // of its stack
        unsigned blockNumber = 0;
        unsigned slot = 0;
        unsigned thread = 0;
        char startEdge = 0; // ThreadSanitizer's synchronisation addresses: its block's set-up, its end
        char endEdge = 0;
        void* fakeStack = nullptr;  // AddressSanitizer's
        Relaxed<bool> finished{false}; // read by the scheduler between the fiber's turns
    };

    static void entry();

    void switchToScheduler(Fiber& fiber, void** fakeStack)
    {
        TFEMU_START_SWITCH(fakeStack, schedulerStack, schedulerStackBytes);
        switchContext(fiber.context, scheduler, schedulerFiber);
    }

    std::vector<char*> stacks;
    std::vector<void*> raceFibers; // ThreadSanitizer's, one per stack (nullptr without it)
    std::vector<Fiber> fibers;
    Job const* job = nullptr;
    Context scheduler;
#if defined(__SANITIZE_THREAD__)
    void* const schedulerFiber = __tsan_get_current_fiber(); // the launching thread's own
#else
    void* const schedulerFiber = nullptr;
#endif
    void const* schedulerStack = nullptr; // for AddressSanitizer
    size_t schedulerStackBytes = 0;
};

inline void tfemu::Workers::entry()
{
    Workers& owner = workers(); // the launching thread's: nothing of the block may be read before the acquire
    TFEMU_FINISH_SWITCH(nullptr, &owner.schedulerStack, &owner.schedulerStackBytes);
    Fiber& fiber = static_cast<Fiber&>(self());
    TFEMU_ACQUIRE(&fiber.startEdge);
    (*owner.job)(fiber.blockNumber, fiber.slot, fiber.thread);
    fiber.finished = true;
    TFEMU_RELEASE(&fiber.endEdge);
    owner.switchToScheduler(fiber, nullptr); // nullptr: this fiber's stack is done with
    fail("a finished fiber was resumed");
}

inline void tfemu::yieldFiber()
{
    Workers::yield();
}

inline tfemu::Workers& tfemu::workers()
{
    static thread_local Workers instance; // fibers run on the launching thread: launches from two threads stay apart
    return instance;
}

template <typename... Params>
cudaError_t tfemu::runGrid(void (*kernel)(Params...), std::tuple<Params...> const& args, dim3 grid, dim3 block,
    size_t dynamicSharedBytes)
{
    unsigned const threads = block.x * block.y * block.z;
    unsigned long long const blocks = 1ull * grid.x * grid.y * grid.z;
    unsigned const resident = unsigned(blocks < residentBlocks ? blocks : residentBlocks.load());
    std::vector<std::unique_ptr<Block>> states(resident);
    cudaError_t error = cudaSuccess;
    workers().run(
        unsigned(blocks), threads, resident,
        [&](unsigned number, unsigned slot, unsigned linear) {
            Block& state = *states[slot];
            dim3 const blockIndex(number % grid.x, number / grid.x % grid.y, number / (grid.x * grid.y));
            self() = ThreadState{&state, linear, 0, 0,
                dim3(linear % block.x, linear / block.x % block.y, linear / (block.x * block.y)), blockIndex, block, grid};
            std::apply(kernel, args);
            // An exited thread no longer holds back __syncthreads or its warp.
            state.sync.arrive_and_drop();
            state.warps[linear / 32]->exchange.arrive_and_drop();
        },
        [&](unsigned, unsigned slot) { states[slot] = std::make_unique<Block>(threads, dynamicSharedBytes); },
        [&](unsigned, unsigned slot) {
            if (states[slot]->sharedHighWater > kMaxSharedBytes)
            {
                error = cudaErrorInvalidValue;
            }
            states[slot].reset();
        });
    return error;
}

//! kernel<<<grid, block, dynamicSharedBytes, stream>>>(args...) on CPU threads, synchronously.
template <typename... Params, typename... Args>
cudaError_t tfLaunch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t dynamicSharedBytes, cudaStream_t,
    Args... args)
{
    using namespace tfemu;
    unsigned long long const threads = 1ull * block.x * block.y * block.z;
    cudaError_t error = cudaSuccess;
    if (threads == 0 || threads > kMaxBlockThreads || dynamicSharedBytes > kMaxSharedBytes)
    {
        error = cudaErrorInvalidValue;
    }
    else if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.x > 0x7fffffffu || grid.y > kMaxGridYZ
        || grid.z > kMaxGridYZ)
    {
        error = cudaErrorInvalidConfiguration;
    }
    if (error != cudaSuccess || !execute)
    {
        lastError = error;
        return error;
    }
    std::tuple<Params...> const converted(args...);
    error = runGrid(kernel, converted, grid, block, dynamicSharedBytes);
    lastError = error;
    return error;
}
