/*
 * CUDA kernels of SimilarityEnergyMerge, apart from the TensorRT plugin class so that a test
 * harness (ctypes, a PyTorch extension) can call them without TensorRT.
 */
#pragma once

#include <cstddef>
#include <cstdint>

#include "cudaPortability.h"

namespace tokenfuse
{

enum class MergeMethod : int32_t
{
    kTOME = 0,
    kPITOME = 1,
    kCROSSGET = 2,
    kTURBO = 3,
};

enum class PitomeVariant : int32_t
{
    kPLAIN = 0, // ELU energy, A/B alternate along the energy ranking
    kBSM = 1,   // ELU energy ranking, then ToMe's bipartite soft matching along it
    kTEXT = 2,  // Gaussian energy, A = the r highest energies, B = the next r
};

//! Tokens per batch element that one thread block handles (the matching lives in shared memory).
constexpr int32_t kMaxTokens = 1024;

//! One merge step: N tokens of width C (metric width D) in, K = N - r out.
struct MergeParams
{
    MergeMethod method;
    PitomeVariant variant;
    int32_t batch;
    int32_t tokens;     // N
    int32_t outTokens;  // K
    int32_t channels;   // C
    int32_t metricDim;  // D
    int32_t protectedTokens;
    float margin;       // PiToMe margin of this layer (already decayed)
    float alpha;        // PiToMe ELU alpha
    float turboWeight;  // Turbo's alpha' of this layer
};

//! Text encoders' extra inputs and outputs, all fp32 [B, N] in and [B, K] out; null for image
//! encoders. `valid` needs `outValid`; `frozen` and `positions` (CLIP text) come with `valid`.
struct TextTokens
{
    float const* valid{nullptr};     // padding mask: > 0.5 for a real token
    float const* frozen{nullptr};    // > 0.5 for the token that never merges and goes last (CLIP text's EOS)
    float const* positions{nullptr}; // causal positions; a merged token takes its latest member's
    float* outValid{nullptr};        // 1 for a slot with a real member, else 0
    float* outPositions{nullptr};
};

//! The most tokens `method` can remove from `tokens` in one step (as the exporter's max_removable):
//! `protectedTokens` never merge, one of them `frozen` anywhere (CLIP text's EOS) when set.
int32_t maxRemovable(MergeMethod method, int32_t tokens, int32_t protectedTokens, bool frozen = false);

//! How one merge step launches on a device: `split` blocks per batch element of `threads` threads,
//! with `sharedBytes` of dynamic shared memory, which holds the N x N similarities when
//! `scoresInShared` (else they go through the workspace).
struct LaunchPlan
{
    int32_t split;
    int32_t threads;
    size_t sharedBytes;
    bool scoresInShared;
};

//! `oneBlockPerImage`: the fallback when the device refuses a cooperative launch of several.
LaunchPlan planLaunch(int32_t batch, int32_t tokens, TfDevice const& device, bool oneBlockPerImage);

//! Scratch memory the launch needs: the [B, N, N] fp32 similarities (when they do not fit in shared
//! memory, or an image spreads over several blocks) and a ticket per batch element.
size_t mergeWorkspaceSize(int32_t batch, int32_t tokens, int32_t metricDim);

//! Match and merge: `slots` [B, N] gets each input token's output slot, `outX` [B, K, C] the
//! size-weighted means and `outSize` [B, K] the summed sizes. `clsAttn` is read by turbo only.
template <typename T>
cudaError_t launchSimilarityEnergyMerge(MergeParams const& params, T const* x, T const* metric, float const* size,
    float const* clsAttn, T* outX, float* outSize, int32_t* slots, void* workspace, cudaStream_t stream,
    TextTokens const& text = {});

} // namespace tokenfuse

#define TOKENFUSE_API __attribute__((visibility("default")))

extern "C"
{
//! C entry points for harnesses (ctypes): fp32 and fp16 inputs, same arguments as the template,
//! then the TextTokens pointers in their order (all null for an image encoder).
TOKENFUSE_API cudaError_t tokenfuseMergeFloat(tokenfuse::MergeParams const* params, float const* x, float const* metric,
    float const* size, float const* clsAttn, float* outX, float* outSize, int32_t* slots, void* workspace,
    cudaStream_t stream, float const* valid, float const* frozen, float const* positions, float* outValid,
    float* outPositions);
TOKENFUSE_API cudaError_t tokenfuseMergeHalf(tokenfuse::MergeParams const* params, __half const* x, __half const* metric,
    float const* size, float const* clsAttn, __half* outX, float* outSize, int32_t* slots, void* workspace,
    cudaStream_t stream, float const* valid, float const* frozen, float const* positions, float* outValid,
    float* outPositions);
TOKENFUSE_API size_t tokenfuseMergeWorkspaceSize(int32_t batch, int32_t tokens, int32_t metricDim);
//! The launch `tokenfuseMerge*` makes on the current device for this batch and token count (unless
//! the device refuses a cooperative launch, when it falls back to one block per image).
TOKENFUSE_API cudaError_t tokenfuseMergeLaunchPlan(int32_t batch, int32_t tokens, int32_t* blocksPerImage,
    int32_t* threads, size_t* sharedBytes, int32_t* scoresInShared);
}
