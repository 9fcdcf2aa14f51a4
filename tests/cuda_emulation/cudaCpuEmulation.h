/*
 * CUDA's built-ins on CPU threads, so that the plugin's .cu (through cudaPortability.h) compiles
 * with g++ -std=c++20 -DTOKENFUSE_CPU_EMULATION and runs in CI, where there is no GPU.
 *
 * Model: each CUDA thread of a block is a fiber (a stack of its own, switched in user space on one
 * OS thread) and the blocks of a grid run one after another; __syncthreads() is a barrier over the
 * block at which a fiber yields until all have arrived; warp shuffles and votes exchange values
 * through a per-warp buffer and one wait on a per-warp barrier; shared memory is one per-block
 * arena filled with 0xFF (so a read of never-written shared memory shows as NaN / -1); device
 * memory is host memory. A thread that returns drops out of its barriers, as a CUDA thread that
 * exits no longer takes part in __syncthreads. Fibers make a barrier cost two user-space switches
 * and keep a launch on one core. Under ThreadSanitizer (which must see real threads to find races)
 * each CUDA thread is a std::thread instead, from a pool reused by every block, meeting at
 * std::barriers.
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
#include <barrier>
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

#if defined(__SANITIZE_THREAD__)
#define TFEMU_OS_THREADS 1 // ThreadSanitizer finds races between real threads only
#include <semaphore>
#include <thread>
#else
#define TFEMU_OS_THREADS 0
#include <sys/mman.h>
#if !defined(__x86_64__)
#include <ucontext.h>
#endif
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
// Room past the limit so an oversized kernel still runs its block and the launch reports the error.
constexpr size_t kArenaBytes = 2 * kMaxSharedBytes;

#if TFEMU_OS_THREADS
using Barrier = std::barrier<>;
#else
void yieldFiber();
// Barrier arrivals and exits on this thread so far: no change in a sweep over the fibers is a deadlock.
inline thread_local unsigned long long arrivals = 0;

//! std::barrier's arrive_and_wait / arrive_and_drop for fibers: a waiting fiber yields until the
//! phase it arrived in completes.
class Barrier
{
public:
    explicit Barrier(unsigned participants)
        : expected(participants)
    {
    }
    void arrive_and_wait()
    {
        unsigned const phase = arrive();
        while (phase == completed)
        {
            yieldFiber();
        }
    }
    void arrive_and_drop()
    {
        --expected;
        ++arrivals;
        completeIfAllArrived();
    }

private:
    unsigned arrive()
    {
        unsigned const phase = completed;
        ++arrived;
        ++arrivals;
        completeIfAllArrived();
        return phase;
    }
    void completeIfAllArrived()
    {
        if (arrived > 0 && arrived == expected)
        {
            arrived = 0;
            ++completed;
        }
    }
    unsigned expected;
    unsigned arrived = 0;
    unsigned completed = 0; // phases completed so far
};
#endif

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
    std::atomic<size_t> sharedHighWater{0};
    alignas(128) unsigned char arena[kArenaBytes];
};

struct ThreadState
{
    Block* block = nullptr;
    unsigned linear = 0;
    size_t bump = 0;        // next free byte of the static shared declarations
    unsigned exchanges = 0; // warp exchanges so far (picks the buffer)
};

inline thread_local ThreadState current;
inline thread_local cudaError_t lastError = cudaSuccess;
inline std::atomic<bool> execute{true};

//! false: launches check their configuration and return without running the kernel.
inline void setExecute(bool run)
{
    execute = run;
}

[[noreturn]] inline void fail(char const* what)
{
    std::fprintf(stderr, "cudaCpuEmulation: %s\n", what);
    std::abort();
}

inline Warp& currentWarp()
{
    return *current.block->warps[current.linear / 32];
}

inline unsigned currentLane()
{
    return current.linear % 32;
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
    Block& block = *current.block;
    size_t const start = (block.dynamicBytes + current.bump + alignof(T) - 1) / alignof(T) * alignof(T);
    size_t const end = start + sizeof(T);
    if (end > kArenaBytes)
    {
        fail("static shared memory far beyond the 99 KiB a block may have");
    }
    current.bump = end - block.dynamicBytes;
    size_t seen = block.sharedHighWater.load();
    while (seen < end && !block.sharedHighWater.compare_exchange_weak(seen, end))
    {
    }
    TFEMU_UNPOISON(block.arena + start, sizeof(T));
    return *reinterpret_cast<T*>(block.arena + start);
}

inline unsigned char* dynamicShared()
{
    return current.block->arena;
}

//! One value per lane in, lane `source(lane)`'s value out (own value where source is out of range).
template <typename T, typename Source>
T exchange(T value, Source source)
{
    static_assert(sizeof(T) <= sizeof(uint64_t) && std::is_trivially_copyable_v<T>, "shuffle of a type over 8 bytes");
    Warp& warp = currentWarp();
    unsigned const lane = currentLane();
    uint64_t* buffer = warp.buffer[current.exchanges++ % 2];
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
    uint64_t* buffer = warp.buffer[current.exchanges++ % 2];
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
void runBlock(void (*kernel)(Params...), std::tuple<Params...> const& args, dim3 grid, dim3 block, dim3 blockIndex,
    Block& state);

} // namespace tfemu

// ---- thread indices -----------------------------------------------------------------------------
inline thread_local dim3 threadIdx;
inline thread_local dim3 blockIdx;
inline thread_local dim3 blockDim;
inline thread_local dim3 gridDim;

// ---- shared memory ------------------------------------------------------------------------------
#define TF_SHARED(Type, name) Type& name = ::tfemu::staticShared<Type>()
#define TF_DYNAMIC_SHARED(name) unsigned char* const name = ::tfemu::dynamicShared()

// ---- synchronisation ----------------------------------------------------------------------------
inline void __syncthreads()
{
    tfemu::current.block->sync.arrive_and_wait();
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

#if TFEMU_OS_THREADS
//! The std::threads that play the CUDA threads of a block: created once, reused by every block
//! (creating 1024 threads per block would cost more than most kernels).
class tfemu::Workers
{
public:
    //! Runs job(t) for t in [0, threads) on `threads` pool threads at once and waits for all.
    void run(unsigned threads, std::function<void(unsigned)> const& job)
    {
        while (workers.size() < threads)
        {
            auto worker = std::make_unique<Worker>();
            Worker* self = worker.get();
            worker->thread = std::thread([this, self, index = unsigned(workers.size())] { serve(*self, index); });
            workers.push_back(std::move(worker));
        }
        current = &job;
        pending.store(threads);
        for (unsigned t = 0; t < threads; ++t)
        {
            workers[t]->start.release();
        }
        finished.acquire();
        current = nullptr;
    }

    ~Workers()
    {
        stopping = true;
        for (auto& worker : workers)
        {
            worker->start.release();
            worker->thread.join();
        }
    }

private:
    struct Worker
    {
        std::thread thread;
        std::binary_semaphore start{0};
    };

    void serve(Worker& self, unsigned index)
    {
        for (;;)
        {
            self.start.acquire();
            if (stopping)
            {
                return;
            }
            (*current)(index);
            if (pending.fetch_sub(1) == 1)
            {
                finished.release();
            }
        }
    }

    std::vector<std::unique_ptr<Worker>> workers;
    std::function<void(unsigned)> const* current = nullptr;
    std::atomic<unsigned> pending{0};
    std::binary_semaphore finished{0};
    bool stopping = false;
};
#else
#if defined(__SANITIZE_ADDRESS__)
// AddressSanitizer must be told which stack is live across each switch.
#define TFEMU_START_SWITCH(save, bottom, bytes) __sanitizer_start_switch_fiber(save, bottom, bytes)
#define TFEMU_FINISH_SWITCH(save, bottom, bytes) __sanitizer_finish_switch_fiber(save, bottom, bytes)
#else
#define TFEMU_START_SWITCH(save, bottom, bytes) ((void) (save), (void) (bottom), (void) (bytes))
#define TFEMU_FINISH_SWITCH(save, bottom, bytes) ((void) (save), (void) (bottom), (void) (bytes))
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

inline void switchContext(Context& from, Context& to)
{
    switchStack(&from.stack, to.stack);
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

inline void switchContext(Context& from, Context& to)
{
    swapcontext(&from.state, &to.state);
}
#endif
} // namespace tfemu

//! The fibers that play the CUDA threads of a block, all on the launching thread. Stacks are mapped
//! once (a guard page below each, so an overflow faults) and reused by every block. A sweep resumes
//! each unfinished fiber until it yields at a barrier or returns; the thread-local CUDA state
//! (threadIdx, the shared-memory bump) is saved and restored at each switch.
class tfemu::Workers
{
public:
    void run(unsigned threads, std::function<void(unsigned)> const& job)
    {
        while (stacks.size() < threads)
        {
            void* stack = mmap(nullptr, kGuardBytes + TFEMU_STACK_BYTES, PROT_READ | PROT_WRITE,
                MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_STACK, -1, 0);
            if (stack == MAP_FAILED || mprotect(stack, kGuardBytes, PROT_NONE) != 0)
            {
                fail("cannot map a fiber stack");
            }
            stacks.push_back(static_cast<char*>(stack) + kGuardBytes);
        }
        this->job = &job;
        fibers.assign(threads, Fiber{});
        for (unsigned t = 0; t < threads; ++t)
        {
            // A fiber that ended never unwound its frames: clear AddressSanitizer's marks on its stack.
            TFEMU_UNPOISON(stacks[t], TFEMU_STACK_BYTES);
            prepare(fibers[t].context, stacks[t], TFEMU_STACK_BYTES, &Workers::entry);
        }
        for (unsigned live = threads; live > 0;)
        {
            unsigned long long const before = arrivals;
            for (running = 0; running < threads; ++running)
            {
                Fiber& fiber = fibers[running];
                if (fiber.finished)
                {
                    continue;
                }
                current = fiber.state;
                threadIdx = fiber.index;
                void* fakeStack = nullptr;
                TFEMU_START_SWITCH(&fakeStack, stacks[running], TFEMU_STACK_BYTES);
                switchContext(scheduler, fiber.context);
                TFEMU_FINISH_SWITCH(fakeStack, nullptr, nullptr);
                live -= fiber.finished ? 1 : 0;
            }
            if (live > 0 && arrivals == before)
            {
                fail("deadlock: the threads of a block wait at barriers the others never reach");
            }
        }
        this->job = nullptr;
    }

    //! From a fiber: back to the scheduler, which resumes it after the other fibers had their turn.
    void yield()
    {
        Fiber& fiber = fibers[running];
        fiber.state = current;
        fiber.index = threadIdx;
        switchToScheduler(&fiber.fakeStack);
        TFEMU_FINISH_SWITCH(fiber.fakeStack, nullptr, nullptr);
    }

    ~Workers()
    {
        for (char* stack : stacks)
        {
            munmap(stack - kGuardBytes, kGuardBytes + TFEMU_STACK_BYTES);
        }
    }

private:
    static constexpr size_t kGuardBytes = 4096;

    struct Fiber
    {
        Context context;
        ThreadState state;
        dim3 index;
        void* fakeStack = nullptr;
        bool finished = false;
    };

    static void entry();

    void switchToScheduler(void** fakeStack)
    {
        TFEMU_START_SWITCH(fakeStack, schedulerStack, schedulerStackBytes);
        switchContext(fibers[running].context, scheduler);
    }

    std::vector<char*> stacks;
    std::vector<Fiber> fibers;
    std::function<void(unsigned)> const* job = nullptr;
    unsigned running = 0;
    Context scheduler;
    void const* schedulerStack = nullptr; // for AddressSanitizer
    size_t schedulerStackBytes = 0;
};

inline void tfemu::Workers::entry()
{
    Workers& self = workers();
    TFEMU_FINISH_SWITCH(nullptr, &self.schedulerStack, &self.schedulerStackBytes);
    unsigned const index = self.running;
    (*self.job)(index);
    self.fibers[index].finished = true;
    self.switchToScheduler(nullptr); // nullptr: this fiber's stack is done with
    fail("a finished fiber was resumed");
}

inline void tfemu::yieldFiber()
{
    workers().yield();
}
#endif

inline tfemu::Workers& tfemu::workers()
{
#if TFEMU_OS_THREADS
    static Workers instance;
#else
    static thread_local Workers instance; // fibers run on the launching thread: launches from two threads stay apart
#endif
    return instance;
}

template <typename... Params>
void tfemu::runBlock(void (*kernel)(Params...), std::tuple<Params...> const& args, dim3 grid, dim3 block,
    dim3 blockIndex, Block& state)
{
    workers().run(block.x * block.y * block.z, [&](unsigned linear) {
        current = ThreadState{&state, linear, 0};
        threadIdx = dim3(linear % block.x, linear / block.x % block.y, linear / (block.x * block.y));
        blockIdx = blockIndex;
        blockDim = block;
        gridDim = grid;
        std::apply(kernel, args);
        // An exited thread no longer holds back __syncthreads or its warp.
        state.sync.arrive_and_drop();
        state.warps[linear / 32]->exchange.arrive_and_drop();
    });
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
    for (unsigned z = 0; z < grid.z && error == cudaSuccess; ++z)
    {
        for (unsigned y = 0; y < grid.y && error == cudaSuccess; ++y)
        {
            for (unsigned x = 0; x < grid.x && error == cudaSuccess; ++x)
            {
                auto state = std::make_unique<Block>(unsigned(threads), dynamicSharedBytes);
                runBlock(kernel, converted, grid, block, dim3(x, y, z), *state);
                if (state->sharedHighWater > kMaxSharedBytes)
                {
                    error = cudaErrorInvalidValue;
                }
            }
        }
    }
    lastError = error;
    return error;
}
