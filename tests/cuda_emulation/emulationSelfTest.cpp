// Checks each built-in of cudaCpuEmulation.h against what CUDA defines; prints "ok NAME" or
// "FAIL NAME" per check and exits non-zero on a failure (run by tests/test_kernels_cpu.py).
#include "cudaCpuEmulation.h"

#include <cstdio>
#include <latch>
#include <thread>

namespace
{

int failures = 0;

void check(bool passed, char const* name)
{
    std::printf("%s %s\n", passed ? "ok" : "FAIL", name);
    failures += passed ? 0 : 1;
}

constexpr unsigned kFull = 0xffffffffu;

__global__ void warpOps(int* out)
{
    int const lane = int(threadIdx.x % 32);
    int const t = int(threadIdx.x);
    out[0 * 64 + t] = __shfl_sync(kFull, t * 10, 3);           // lane 3's value
    out[1 * 64 + t] = __shfl_xor_sync(kFull, t, 1);            // neighbour
    out[2 * 64 + t] = __shfl_up_sync(kFull, t, 2);             // own value for lanes 0, 1
    out[3 * 64 + t] = __shfl_down_sync(kFull, t, 2);           // own value for lanes 30, 31
    out[4 * 64 + t] = int(__ballot_sync(kFull, lane % 3 == 0)); // lanes 0, 3, 6, ...
    out[5 * 64 + t] = __any_sync(kFull, t == 40);              // only warp 1
    out[6 * 64 + t] = __all_sync(kFull, t < 40);               // only warp 0
    out[7 * 64 + t] = int(__activemask());
    __syncwarp();
    out[8 * 64 + t] = __shfl_sync(kFull, t, 5, 8);             // within groups of 8
}

__global__ void blockOps(int* counters, float* sum, int* unwritten)
{
    TF_SHARED(int, shared);
    TF_DYNAMIC_SHARED(bytes);
    int* dynamic = reinterpret_cast<int*>(bytes);
    if (threadIdx.x == 0)
    {
        unwritten[blockIdx.x] = shared; // never written: 0xFFFFFFFF
        shared = 0;
    }
    dynamic[threadIdx.x] = int(threadIdx.x);
    __syncthreads();
    atomicAdd(&shared, 1);
    __syncthreads();
    int const total = shared;
    int const neighbour = dynamic[(threadIdx.x + 1) % blockDim.x];
    atomicAdd(&counters[0], total == int(blockDim.x) ? 1 : 0);
    atomicAdd(&counters[1], neighbour == int((threadIdx.x + 1) % blockDim.x) ? 1 : 0);
    atomicMax(&counters[2], int(threadIdx.x));
    atomicMin(&counters[3], int(threadIdx.x));
    atomicCAS(&counters[4], 0, 7);
    atomicExch(&counters[5], 9);
    atomicAdd(sum, 0.5f);
    __threadfence();
}

__global__ void early(int* out)
{
    if (threadIdx.x % 2 == 1)
    {
        return; // exited threads no longer hold back __syncthreads
    }
    __syncthreads();
    out[(blockIdx.y * gridDim.x + blockIdx.x) * 32 + threadIdx.x / 2]
        = int(blockIdx.x * 100 + threadIdx.x + blockIdx.y * 1000 + gridDim.x * 10000);
}

//! Every block but the last waits for the last one: resident blocks take turns.
__global__ void waitForLast(int* flag, int* out)
{
    if (threadIdx.x == 0 && blockIdx.x + 1 == gridDim.x)
    {
        atomicExch(flag, 1);
    }
    while (threadIdx.x == 0 && atomicAdd(flag, 0) == 0)
    {
        __nanosleep(100);
    }
    __syncthreads(); // the other threads wait for thread 0's
    atomicAdd(&out[blockIdx.x], 1);
}

__global__ void tooMuchShared(int* out)
{
    using Big = char[100 * 1024];
    TF_SHARED(Big, big);
    if (threadIdx.x == 0)
    {
        big[0] = 1;
        out[0] = big[0];
    }
}

} // namespace

int main()
{
    int warp[9 * 64] = {};
    check(tfLaunch(warpOps, dim3(1), dim3(64), 0, nullptr, warp) == cudaSuccess, "warp launch");
    bool shfl = true, xorOk = true, up = true, down = true, sub = true;
    for (int t = 0; t < 64; ++t)
    {
        int const lane = t % 32, base = t - lane;
        shfl &= warp[t] == (base + 3) * 10;
        xorOk &= warp[64 + t] == (t ^ 1);
        up &= warp[128 + t] == (lane < 2 ? t : t - 2);
        down &= warp[192 + t] == (lane >= 30 ? t : t + 2);
        sub &= warp[512 + t] == base + (lane / 8) * 8 + 5;
    }
    check(shfl, "__shfl_sync");
    check(xorOk, "__shfl_xor_sync");
    check(up, "__shfl_up_sync");
    check(down, "__shfl_down_sync");
    check(sub, "__shfl_sync width 8");
    check(unsigned(warp[256]) == 0x49249249u && unsigned(warp[256 + 40]) == 0x49249249u, "__ballot_sync");
    check(warp[320] == 0 && warp[320 + 33] == 1, "__any_sync");
    check(warp[384] == 1 && warp[384 + 33] == 0, "__all_sync");
    check(unsigned(warp[448]) == kFull, "__activemask");

    int counters[6] = {0, 0, -1, 1 << 30, 0, 0};
    float sum = 0.f;
    int unwritten[2] = {};
    check(tfLaunch(blockOps, dim3(2), dim3(256), 256 * sizeof(int), nullptr, counters, &sum, unwritten) == cudaSuccess,
        "block launch");
    check(counters[0] == 512 && counters[1] == 512, "__syncthreads, static and dynamic shared memory");
    check(counters[2] == 255 && counters[3] == 0 && counters[4] == 7 && counters[5] == 9, "atomicMax, Min, CAS, Exch");
    check(sum == 256.f, "atomicAdd float");
    check(unwritten[0] == -1 && unwritten[1] == -1, "shared memory starts 0xFF");

    int out[6 * 32] = {};
    check(tfLaunch(early, dim3(3, 2), dim3(64), 0, nullptr, out) == cudaSuccess
            && out[5 * 32 + 5] == 2 * 100 + 10 + 1000 + 30000 && out[5] == 10 + 30000,
        "returned threads, blockIdx, gridDim");
    int flag = 0;
    int waited[8] = {};
    check(tfLaunch(waitForLast, dim3(8), dim3(64), 0, nullptr, &flag, waited) == cudaSuccess && waited[0] == 64
            && waited[7] == 64,
        "blocks wait for a later block (8 resident at once)");

    // Fibers belong to the launching thread: two host threads launching at once stay apart.
    constexpr unsigned kBlocks = 64;
    int counts[2][6] = {{0, 0, -1, 1 << 30, 0, 0}, {0, 0, -1, 1 << 30, 0, 0}};
    float sums[2] = {};
    int marks[2][kBlocks] = {};
    std::latch start(2);
    auto launch = [&](int t) {
        start.arrive_and_wait();
        tfLaunch(blockOps, dim3(kBlocks), dim3(256), 256 * sizeof(int), nullptr, counts[t], &sums[t], marks[t]);
    };
    std::thread other(launch, 1);
    launch(0);
    other.join();
    check(counts[0][0] == 256 * kBlocks && counts[1][0] == 256 * kBlocks && counts[0][1] == 256 * kBlocks
            && counts[1][1] == 256 * kBlocks && sums[0] == 128.f * kBlocks && sums[1] == 128.f * kBlocks,
        "launches from two host threads at once");

    check(tfLaunch(early, dim3(1), dim3(1025), 0, nullptr, out) == cudaErrorInvalidValue, "block over 1024 threads");
    check(cudaGetLastError() == cudaErrorInvalidValue && cudaGetLastError() == cudaSuccess, "cudaGetLastError resets");
    check(tfLaunch(early, dim3(1, 65536), dim3(32), 0, nullptr, out) == cudaErrorInvalidConfiguration, "grid.y over 65535");
    check(tfLaunch(blockOps, dim3(1), dim3(32), 100 * 1024, nullptr, counters, &sum, unwritten) == cudaErrorInvalidValue,
        "dynamic shared memory over 99 KiB");
    check(tfLaunch(tooMuchShared, dim3(1), dim3(32), 0, nullptr, out) == cudaErrorInvalidValue,
        "static shared memory over 99 KiB");

    __half const h = __float2half_rn(1.0f / 3.0f);
    __half2 const pair = __halves2half2(__float2half(65504.f), __float2half(1e6f));
    float2 const both = __half22float2(pair);
    check(__half2float(h) == 0.333251953125f && __low2float(pair) == 65504.f && isinf(__high2float(pair))
            && both.x == 65504.f && isinf(both.y),
        "__half conversions");
    check(alignof(float4) == 16 && alignof(int4) == 16 && alignof(uint4) == 16 && alignof(float2) == 8
            && make_float4(1, 2, 3, 4).w == 4.f && make_int2(1, 2).y == 2 && make_uint4(1, 2, 3, 4).z == 3u,
        "vector types");
    float const x[2] = {4.f, NAN};
    check(__ldg(&x[0]) == 4.f && rsqrtf(4.f) == 0.5f && __fdividef(1.f, 4.f) == 0.25f && isnan(__ldg(&x[1]))
            && !isfinite(INFINITY) && FLT_MAX > 3e38f && warpSize == 32,
        "math");
    check(__ffs(0) == 0 && __ffs(0x50) == 5 && __ffs(int(0x80000000u)) == 32 && __popc(0u) == 0 && __popc(0xf0f0u) == 8
            && __popc(0xffffffffu) == 32,
        "__ffs, __popc");
    std::printf("%d failed\n", failures);
    return failures == 0 ? 0 : 1;
}
