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
 */
#pragma once

#if defined(TOKENFUSE_CPU_EMULATION)

#include "cudaCpuEmulation.h"

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
#endif // __CUDACC__

#endif // TOKENFUSE_CPU_EMULATION
