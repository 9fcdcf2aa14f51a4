/*
 * The CUDA the kernels use, behind a few macros, so that the very same .cu compiles with nvcc for
 * a GPU and with a C++20 compiler for the CPU (tests/cuda_emulation/cudaCpuEmulation.h, put on the
 * include path by the CPU build only, with -DTOKENFUSE_CPU_EMULATION).
 *
 *   TF_SHARED(Type, name)     a static shared variable, declared at kernel scope before any branch
 *                             (Type may alias an array type, e.g. using Tile = float[64][65];)
 *   TF_DYNAMIC_SHARED(name)   the dynamic shared memory, 16-byte aligned bytes to carve arrays from
 *   tfLaunch(kernel, grid, block, dynamicSharedBytes, stream, args...)
 *                             kernel<<<grid, block, dynamicSharedBytes, stream>>>(args...), then
 *                             returns cudaGetLastError()
 *   tfLaunchCooperative(kernel, grid, block, dynamicSharedBytes, stream, args...)
 *                             the same as a cooperative launch (every block resident at once), or
 *                             cudaErrorCooperativeLaunchTooLarge
 *   tfDeviceLimits(device)    the current device's multiprocessors and opt-in shared memory per block
 *   tfAllowDynamicShared(kernel, bytes)
 *                             lets `kernel` launch with `bytes` of dynamic shared memory (over 48 KiB)
 *   tfMemsetAsync(pointer, value, bytes, stream)
 */
#pragma once

#include <cstddef>
#include <cstdint>
#include <tuple>

//! What a launch needs to know of the device it runs on.
struct TfDevice
{
    int32_t ordinal;
    int32_t multiprocessors;
    size_t sharedPerBlock; // the most dynamic + static shared memory a block may opt in to
};

#if defined(TOKENFUSE_CPU_EMULATION)

#include "cudaCpuEmulation.h"

#include <cstring>

//! The emulated device: a few multiprocessors (so small batches spread over several blocks) and
//! the launch limit of the emulation's shared memory.
inline cudaError_t tfDeviceLimits(TfDevice& device)
{
    device = TfDevice{0, tfemu::kMultiprocessors, tfemu::kMaxSharedBytes};
    return cudaSuccess;
}

template <typename... Params>
cudaError_t tfAllowDynamicShared(void (*)(Params...), size_t bytes)
{
    return bytes <= tfemu::kMaxSharedBytes ? cudaSuccess : cudaErrorInvalidValue;
}

//! A cooperative grid larger than the blocks the emulation keeps resident is refused.
template <typename... Params, typename... Args>
cudaError_t tfLaunchCooperative(void (*kernel)(Params...), dim3 grid, dim3 block, size_t dynamicSharedBytes,
    cudaStream_t stream, Args... args)
{
    if (1ull * grid.x * grid.y * grid.z > tfemu::residentBlocks.load())
    {
        return cudaErrorCooperativeLaunchTooLarge;
    }
    return tfLaunch(kernel, grid, block, dynamicSharedBytes, stream, args...);
}

inline cudaError_t tfMemsetAsync(void* pointer, int value, size_t bytes, cudaStream_t)
{
    std::memset(pointer, value, bytes);
    return cudaSuccess;
}

#else

#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#define TF_SHARED(Type, name) __shared__ Type name
#define TF_DYNAMIC_SHARED(name) extern __shared__ __align__(16) unsigned char name[]

#if defined(__CUDACC__)
//! Every kernel launch goes through here, so the CPU emulation can replace it.
template <typename... Params, typename... Args>
cudaError_t tfLaunch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t dynamicSharedBytes, cudaStream_t stream,
    Args... args)
{
    kernel<<<grid, block, dynamicSharedBytes, stream>>>(args...);
    return cudaGetLastError();
}

template <typename... Params, typename... Args>
cudaError_t tfLaunchCooperative(void (*kernel)(Params...), dim3 grid, dim3 block, size_t dynamicSharedBytes,
    cudaStream_t stream, Args... args)
{
    std::tuple<Params...> values(args...);
    return std::apply(
        [&](Params&... each) {
            void* pointers[] = {static_cast<void*>(&each)...};
            return cudaLaunchCooperativeKernel(
                reinterpret_cast<void const*>(kernel), grid, block, pointers, dynamicSharedBytes, stream);
        },
        values);
}
#endif // __CUDACC__

inline cudaError_t tfDeviceLimits(TfDevice& device)
{
    int ordinal = 0;
    int multiprocessors = 0;
    int shared = 0;
    cudaError_t status = cudaGetDevice(&ordinal);
    if (status == cudaSuccess)
    {
        status = cudaDeviceGetAttribute(&multiprocessors, cudaDevAttrMultiProcessorCount, ordinal);
    }
    if (status == cudaSuccess)
    {
        status = cudaDeviceGetAttribute(&shared, cudaDevAttrMaxSharedMemoryPerBlockOptin, ordinal);
    }
    device = TfDevice{ordinal, multiprocessors, size_t(shared)};
    return status;
}

template <typename... Params>
cudaError_t tfAllowDynamicShared(void (*kernel)(Params...), size_t bytes)
{
    return cudaFuncSetAttribute(reinterpret_cast<void const*>(kernel), cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes));
}

inline cudaError_t tfMemsetAsync(void* pointer, int value, size_t bytes, cudaStream_t stream)
{
    return cudaMemsetAsync(pointer, value, bytes, stream);
}

#endif // TOKENFUSE_CPU_EMULATION
