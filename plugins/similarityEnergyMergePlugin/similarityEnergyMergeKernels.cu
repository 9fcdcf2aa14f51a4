/*
 * SimilarityEnergyMerge kernels: two launches per merge step.
 *
 * matchKernel (one block per batch element) normalises the metric rows, computes cosine
 * similarities on the fly (never an N x N matrix in global memory), ranks tokens in shared memory
 * by pairwise comparison and writes each token's output slot plus the slot membership lists.
 * mergeKernel (one block per output slot) takes the size-weighted mean of each slot's members.
 *
 * The decisions follow tokenfuse.exporter.methods exactly: stable rankings (ties go to the lower
 * position or order key), argmax picks the lowest index, scores accumulate in fp32, -BIG = -1e4.
 */
#include "similarityEnergyMergeKernels.h"

#include <climits>

namespace tokenfuse
{
namespace
{

constexpr float kBig = 1e4f;
constexpr int32_t kWarpSize = 32;
constexpr unsigned kFullMask = 0xffffffffu;
constexpr int32_t kMatchThreads = 1024;
constexpr int32_t kMergeThreads = 128;

enum Role : uint8_t
{
    kNONE = 0,   // protected, or free but not merging in this step
    kA = 1,      // source candidate
    kB = 2,      // destination
    kSOURCE = 3, // an A token that merges away
};

struct Workspace
{
    float* unit;      // [B, N, D] unit metric rows
    int32_t* offsets; // [B, N + 1] first member of each slot
    int32_t* members; // [B, N] input tokens grouped by slot, in position order
};

size_t alignUp(size_t bytes)
{
    return (bytes + 255) & ~size_t(255);
}

Workspace carve(void* base, int32_t batch, int32_t tokens, int32_t dim)
{
    auto* bytes = static_cast<char*>(base);
    Workspace ws;
    ws.unit = reinterpret_cast<float*>(bytes);
    bytes += alignUp(sizeof(float) * size_t(batch) * tokens * dim);
    ws.offsets = reinterpret_cast<int32_t*>(bytes);
    bytes += alignUp(sizeof(int32_t) * size_t(batch) * (tokens + 1));
    ws.members = reinterpret_cast<int32_t*>(bytes);
    return ws;
}

__device__ __forceinline__ float toFloat(float v)
{
    return v;
}
__device__ __forceinline__ float toFloat(__half v)
{
    return __half2float(v);
}
template <typename T>
__device__ __forceinline__ T fromFloat(float v);
template <>
__device__ __forceinline__ float fromFloat<float>(float v)
{
    return v;
}
template <>
__device__ __forceinline__ __half fromFloat<__half>(float v)
{
    return __float2half_rn(v);
}

struct ArgMax
{
    float value;
    int32_t index;
};

__device__ __forceinline__ ArgMax better(ArgMax a, ArgMax b)
{
    return (b.value > a.value || (b.value == a.value && b.index < a.index)) ? b : a;
}

__device__ __forceinline__ ArgMax warpArgMax(ArgMax v)
{
    for (int32_t offset = kWarpSize / 2; offset > 0; offset /= 2)
    {
        ArgMax other{__shfl_xor_sync(kFullMask, v.value, offset), __shfl_xor_sync(kFullMask, v.index, offset)};
        v = better(v, other);
    }
    return v;
}

__device__ __forceinline__ float warpSum(float v)
{
    for (int32_t offset = kWarpSize / 2; offset > 0; offset /= 2)
    {
        v += __shfl_xor_sync(kFullMask, v, offset);
    }
    return v;
}

//! One thread's dot product in d order: (i, j) and (j, i) give the same bits, so similarity is
//! exactly symmetric as in the exporter.
__device__ __forceinline__ float dot(float const* a, float const* b, int32_t dim)
{
    float sum = 0.f;
    for (int32_t d = 0; d < dim; ++d)
    {
        sum = fmaf(a[d], b[d], sum);
    }
    return sum;
}

//! Cosine similarity of two unit rows; a non-finite metric row (whose unit row is NaN) gets
//! kNonFiniteSimilarity, below every cosine and above -kBig, as the exporter's
//! NON_FINITE_SIMILARITY (a NaN would make every comparison false and an argmax find nothing).
constexpr float kNonFiniteSimilarity = -2.f;
__device__ __forceinline__ float similarity(float const* a, float const* b, int32_t dim)
{
    float const s = dot(a, b, dim);
    return isnan(s) ? kNonFiniteSimilarity : s;
}

struct Shared
{
    float key[kMaxTokens];       // the score being ranked
    float best[kMaxTokens];      // best similarity found for a row
    int32_t partner[kMaxTokens]; // where a source merges; later slot sizes
    int32_t order[kMaxTokens];   // ordering key of bipartite sets; later slot offsets
    int32_t rank[kMaxTokens];
    int32_t slot[kMaxTokens];
    uint8_t role[kMaxTokens];
    uint8_t member[kMaxTokens]; // who takes part in the current ranking
};

struct Row
{
    float const* unit;
    int32_t tokens;
    int32_t dim;
    int32_t lane;
};

//! Warp-wide: the most similar j to row i among those `take(j)` accepts (lowest j at ties), or
//! {floor, INT_MAX} when none does.
template <typename Take>
__device__ ArgMax rowArgMax(Row const& row, int32_t i, float floor, Take take)
{
    float const* ui = row.unit + size_t(i) * row.dim;
    ArgMax acc{floor, INT_MAX};
    for (int32_t j = row.lane; j < row.tokens; j += kWarpSize)
    {
        if (take(j))
        {
            float const s = similarity(ui, row.unit + size_t(j) * row.dim, row.dim);
            if (s > acc.value)
            {
                acc = {s, j};
            }
        }
    }
    return warpArgMax(acc);
}

//! rank[i] = members ahead of i when ordered by key (descending or ascending); ties: the lower
//! order key when `tieByOrder`, else the lower position. Thread t writes rank[i] for the same i
//! (t, t + blockDim.x, ...) that the loops after it read, so no barrier is needed after it until
//! key, member or order are written again (the ThreadSanitizer test finds such a barrier redundant).
__device__ void rankAmong(Shared& s, int32_t n, bool descending, bool tieByOrder)
{
    for (int32_t i = threadIdx.x; i < n; i += blockDim.x)
    {
        float const ki = s.key[i];
        int32_t const ti = tieByOrder ? s.order[i] : i;
        int32_t ahead = 0;
        for (int32_t j = 0; j < n; ++j)
        {
            if (!s.member[j])
            {
                continue;
            }
            float const kj = s.key[j];
            int32_t const tj = tieByOrder ? s.order[j] : j;
            bool const before = descending ? kj > ki : kj < ki;
            ahead += (before || (kj == ki && tj < ti)) ? 1 : 0;
        }
        s.rank[i] = ahead;
    }
}

//! Tokens of `role` whose order key is below `bound`.
__device__ int32_t countBefore(Shared const& s, int32_t n, uint8_t role, int32_t bound)
{
    int32_t count = 0;
    for (int32_t j = 0; j < n; ++j)
    {
        count += (s.role[j] == role && s.order[j] < bound) ? 1 : 0;
    }
    return count;
}

__device__ int32_t countRole(Shared const& s, int32_t n, uint8_t role)
{
    return countBefore(s, n, role, INT_MAX);
}

//! Warp-wide: for each token of `from`, its most similar token of role kB.
__device__ void bestDestinations(Shared& s, Row const& row, uint8_t from)
{
    int32_t const warps = blockDim.x / kWarpSize;
    for (int32_t i = threadIdx.x / kWarpSize; i < row.tokens; i += warps)
    {
        if (s.role[i] != from)
        {
            continue;
        }
        ArgMax const m = rowArgMax(row, i, -kBig, [&](int32_t j) { return s.role[j] == kB; });
        if (row.lane == 0)
        {
            s.best[i] = m.value;
            s.partner[i] = m.index;
        }
    }
}

//! Each source takes the slot of its destination.
__device__ void absorb(Shared& s, int32_t n)
{
    for (int32_t i = threadIdx.x; i < n; i += blockDim.x)
    {
        if (s.role[i] == kSOURCE && s.partner[i] >= 0 && s.partner[i] < n) // never read past the slots
        {
            s.slot[i] = s.slot[s.partner[i]];
        }
    }
}

//! ToMe's bipartite soft matching between roles kA and kB (set by the caller, with `order`
//! ordering each set in the output): the r A tokens with the strongest best match (minus Turbo's
//! penalty) merge. Output: protected tokens, kept A tokens, then B tokens.
__device__ void bipartite(Shared& s, Row const& row, MergeParams const& p, int32_t r, float const* penalty)
{
    int32_t const n = row.tokens;
    bestDestinations(s, row, kA);
    __syncthreads();
    for (int32_t i = threadIdx.x; i < n; i += blockDim.x)
    {
        s.key[i] = penalty ? __fsub_rn(s.best[i], __fmul_rn(p.turboWeight, penalty[i])) : s.best[i];
        s.member[i] = s.role[i] == kA;
    }
    __syncthreads();
    rankAmong(s, n, /*descending=*/true, /*tieByOrder=*/true);
    for (int32_t i = threadIdx.x; i < n; i += blockDim.x)
    {
        if (s.role[i] == kA && s.rank[i] < r)
        {
            s.role[i] = kSOURCE;
        }
    }
    __syncthreads();
    int32_t const kept = countRole(s, n, kA);
    for (int32_t i = threadIdx.x; i < n; i += blockDim.x)
    {
        if (s.role[i] == kA)
        {
            s.slot[i] = p.protectedTokens + countBefore(s, n, kA, s.order[i]);
        }
        else if (s.role[i] == kB)
        {
            s.slot[i] = p.protectedTokens + kept + countBefore(s, n, kB, s.order[i]);
        }
    }
    __syncthreads();
    absorb(s, n);
}

__device__ void tomeSlots(Shared& s, Row const& row, MergeParams const& p, int32_t r, float const* penalty)
{
    for (int32_t i = threadIdx.x; i < row.tokens; i += blockDim.x)
    {
        s.role[i] = i < p.protectedTokens ? kNONE : (i % 2 == 0 ? kA : kB);
        s.order[i] = i;
    }
    __syncthreads();
    bipartite(s, row, p, r, penalty);
}

__device__ __forceinline__ float pitomeAffinity(float sim, MergeParams const& p)
{
    if (p.variant == PitomeVariant::kTEXT)
    {
        float const t = (1.f - sim) / (1.f - p.margin);
        return expf(-(t * t) / 2.f);
    }
    float const x = __fsub_rn(sim, p.margin);
    return x > 0.f ? x : __fmul_rn(expf(x) - 1.f, p.alpha);
}

__device__ void pitomeSlots(Shared& s, Row const& row, MergeParams const& p, int32_t r)
{
    int32_t const n = row.tokens;
    int32_t const P = p.protectedTokens;
    int32_t const warps = blockDim.x / kWarpSize;
    // Energy: mean affinity of each token to the free tokens (itself included).
    for (int32_t i = threadIdx.x / kWarpSize; i < n; i += warps)
    {
        float const* ui = row.unit + size_t(i) * row.dim;
        float energy = 0.f;
        for (int32_t j = P + row.lane; j < n; j += kWarpSize)
        {
            energy += pitomeAffinity(similarity(ui, row.unit + size_t(j) * row.dim, row.dim), p);
        }
        energy = warpSum(energy);
        if (row.lane == 0)
        {
            s.key[i] = energy / float(n - P);
        }
    }
    for (int32_t i = threadIdx.x; i < n; i += blockDim.x)
    {
        s.member[i] = i >= P;
    }
    __syncthreads();
    rankAmong(s, n, /*descending=*/true, /*tieByOrder=*/false);

    if (p.variant == PitomeVariant::kBSM)
    {
        for (int32_t i = threadIdx.x; i < n; i += blockDim.x)
        {
            s.role[i] = i < P ? kNONE : (s.rank[i] % 2 == 0 ? kA : kB);
            s.order[i] = s.rank[i];
        }
        __syncthreads();
        bipartite(s, row, p, r, nullptr);
        return;
    }

    // The 2r highest energies merge in pairs; the rest keep their energy order.
    for (int32_t i = threadIdx.x; i < n; i += blockDim.x)
    {
        int32_t const rank = s.rank[i];
        uint8_t role = kNONE;
        if (i >= P && rank < 2 * r)
        {
            bool const isA = p.variant == PitomeVariant::kTEXT ? rank < r : rank % 2 == 0;
            role = isA ? kSOURCE : kB;
        }
        s.role[i] = role;
        s.order[i] = rank;
    }
    __syncthreads();
    bestDestinations(s, row, kSOURCE);
    int32_t const kept = n - P - 2 * r;
    for (int32_t i = threadIdx.x; i < n; i += blockDim.x)
    {
        if (i < P)
        {
            continue;
        }
        s.slot[i] = s.role[i] == kB ? P + kept + countBefore(s, n, kB, s.order[i]) : P + s.rank[i] - 2 * r;
    }
    __syncthreads();
    absorb(s, n);
}

__device__ void crossgetSlots(Shared& s, Row const& row, MergeParams const& p, int32_t r)
{
    int32_t const n = row.tokens;
    int32_t const P = p.protectedTokens;
    int32_t const warps = blockDim.x / kWarpSize;
    auto const other = [&](int32_t i) { return [=](int32_t j) { return j >= P && j != i; }; };
    // Redundancy: each token's best match among the other free tokens.
    for (int32_t i = threadIdx.x / kWarpSize; i < n; i += warps)
    {
        float const m = i < P ? -kBig : rowArgMax(row, i, -kBig, other(i)).value;
        if (row.lane == 0)
        {
            s.key[i] = m;
        }
    }
    for (int32_t i = threadIdx.x; i < n; i += blockDim.x)
    {
        s.member[i] = i >= P;
    }
    __syncthreads();
    rankAmong(s, n, /*descending=*/true, /*tieByOrder=*/false);
    __syncthreads();
    // Each token's best match among the tokens ranked below it: a chain of merges never cycles.
    for (int32_t i = threadIdx.x / kWarpSize; i < n; i += warps)
    {
        if (i < P)
        {
            continue;
        }
        int32_t const mine = s.rank[i];
        ArgMax const m = rowArgMax(row, i, -kBig, [&](int32_t j) { return j >= P && j != i && s.rank[j] > mine; });
        if (row.lane == 0)
        {
            s.best[i] = m.value;
        }
    }
    __syncthreads();
    for (int32_t i = threadIdx.x; i < n; i += blockDim.x)
    {
        s.key[i] = i < P ? -kBig : s.best[i];
    }
    __syncthreads();
    rankAmong(s, n, /*descending=*/true, /*tieByOrder=*/false);
    for (int32_t i = threadIdx.x; i < n; i += blockDim.x)
    {
        s.role[i] = i < P ? kNONE : (s.rank[i] < r ? kSOURCE : kB);
        s.order[i] = i;
    }
    __syncthreads();
    for (int32_t i = threadIdx.x; i < n; i += blockDim.x)
    {
        if (i >= P)
        {
            s.slot[i] = P + countBefore(s, n, kB, i);
        }
    }
    bestDestinations(s, row, kSOURCE);
    __syncthreads();
    absorb(s, n);
}

template <typename T>
__global__ void __launch_bounds__(kMatchThreads)
    matchKernel(MergeParams p, T const* metric, float const* clsAttn, Workspace ws, int32_t* slotsOut)
{
    TF_SHARED(Shared, s);
    int32_t const b = blockIdx.x;
    int32_t const n = p.tokens;
    int32_t const dim = p.metricDim;
    int32_t const r = n - p.outTokens;
    int32_t const lane = threadIdx.x % kWarpSize;
    int32_t const warps = blockDim.x / kWarpSize;
    Row const row{ws.unit + size_t(b) * n * dim, n, dim, lane};

    // Unit metric rows, as F.normalize: v / max(|v|, 1e-12).
    T const* m = metric + size_t(b) * n * dim;
    float* unit = ws.unit + size_t(b) * n * dim;
    for (int32_t i = threadIdx.x / kWarpSize; i < n; i += warps)
    {
        float squares = 0.f;
        for (int32_t d = lane; d < dim; d += kWarpSize)
        {
            float const v = toFloat(m[size_t(i) * dim + d]);
            squares = fmaf(v, v, squares);
        }
        float const norm = fmaxf(sqrtf(warpSum(squares)), 1e-12f);
        for (int32_t d = lane; d < dim; d += kWarpSize)
        {
            unit[size_t(i) * dim + d] = toFloat(m[size_t(i) * dim + d]) / norm;
        }
    }
    for (int32_t i = threadIdx.x; i < n; i += blockDim.x)
    {
        s.slot[i] = i;
        s.role[i] = kNONE;
    }
    __syncthreads(); // also makes the unit rows (global memory) visible to the whole block

    if (r > 0)
    {
        switch (p.method)
        {
        case MergeMethod::kTOME: tomeSlots(s, row, p, r, nullptr); break;
        case MergeMethod::kTURBO: tomeSlots(s, row, p, r, clsAttn + size_t(b) * n); break;
        case MergeMethod::kPITOME: pitomeSlots(s, row, p, r); break;
        case MergeMethod::kCROSSGET: crossgetSlots(s, row, p, r); break;
        }
    }
    __syncthreads();

    // Slot membership lists, members in position order (a fixed summation order).
    int32_t const K = p.outTokens;
    for (int32_t k = threadIdx.x; k < K; k += blockDim.x)
    {
        int32_t count = 0;
        for (int32_t i = 0; i < n; ++i)
        {
            count += s.slot[i] == k ? 1 : 0;
        }
        s.partner[k] = count;
    }
    __syncthreads();
    int32_t* offsets = ws.offsets + size_t(b) * (n + 1);
    if (threadIdx.x == 0)
    {
        int32_t running = 0;
        for (int32_t k = 0; k < K; ++k)
        {
            s.order[k] = running;
            offsets[k] = running;
            running += s.partner[k];
        }
        offsets[K] = running;
    }
    __syncthreads();
    int32_t* members = ws.members + size_t(b) * n;
    for (int32_t i = threadIdx.x; i < n; i += blockDim.x)
    {
        int32_t const k = s.slot[i];
        int32_t within = 0;
        for (int32_t j = 0; j < i; ++j)
        {
            within += s.slot[j] == k ? 1 : 0;
        }
        if (k >= 0 && k < K) // a slot outside the K outputs has no membership list to write into
        {
            members[s.order[k] + within] = i;
        }
        slotsOut[size_t(b) * n + i] = k;
    }
}

template <typename T>
__global__ void __launch_bounds__(kMergeThreads)
    mergeKernel(MergeParams p, T const* x, float const* size, Workspace ws, T* outX, float* outSize)
{
    int32_t const b = blockIdx.x; // the batch on grid.x (up to 2^31 - 1; grid.y stops at 65535)
    int32_t const k = blockIdx.y;
    int32_t const n = p.tokens;
    int32_t const C = p.channels;
    int32_t const* offsets = ws.offsets + size_t(b) * (n + 1);
    int32_t const* members = ws.members + size_t(b) * n;
    float const* sizes = size + size_t(b) * n;
    int32_t const begin = offsets[k];
    int32_t const end = offsets[k + 1];
    float total = 0.f;
    for (int32_t m = begin; m < end; ++m)
    {
        total += sizes[members[m]];
    }
    T const* xb = x + size_t(b) * n * C;
    for (int32_t c = threadIdx.x; c < C; c += blockDim.x)
    {
        float acc = 0.f;
        for (int32_t m = begin; m < end; ++m)
        {
            int32_t const i = members[m];
            acc = fmaf(toFloat(xb[size_t(i) * C + c]), sizes[i], acc);
        }
        outX[(size_t(b) * p.outTokens + k) * C + c] = fromFloat<T>(acc / total);
    }
    if (threadIdx.x == 0)
    {
        outSize[size_t(b) * p.outTokens + k] = total;
    }
}

} // namespace

int32_t maxRemovable(MergeMethod method, int32_t tokens, int32_t protectedTokens)
{
    int32_t const free = tokens - protectedTokens;
    int32_t const limit = method == MergeMethod::kCROSSGET ? free - 1 : free / 2;
    return limit > 0 ? limit : 0;
}

size_t mergeWorkspaceSize(int32_t batch, int32_t tokens, int32_t metricDim)
{
    return alignUp(sizeof(float) * size_t(batch) * tokens * metricDim)
        + alignUp(sizeof(int32_t) * size_t(batch) * (tokens + 1)) + alignUp(sizeof(int32_t) * size_t(batch) * tokens);
}

template <typename T>
cudaError_t launchSimilarityEnergyMerge(MergeParams const& p, T const* x, T const* metric, float const* size,
    float const* clsAttn, T* outX, float* outSize, int32_t* slots, void* workspace, cudaStream_t stream)
{
    int32_t const r = p.tokens - p.outTokens;
    bool const valid = p.batch >= 0 && p.tokens >= 1 && p.tokens <= kMaxTokens && p.outTokens >= 1 && r >= 0
        && r <= maxRemovable(p.method, p.tokens, p.protectedTokens) && p.channels >= 1 && p.metricDim >= 1
        && p.protectedTokens >= 0 && (p.method != MergeMethod::kTURBO || clsAttn != nullptr);
    if (!valid)
    {
        return cudaErrorInvalidValue;
    }
    if (p.batch == 0)
    {
        return cudaSuccess;
    }
    Workspace const ws = carve(workspace, p.batch, p.tokens, p.metricDim);
    cudaError_t const matched
        = tfLaunch(matchKernel<T>, dim3(p.batch), dim3(kMatchThreads), 0, stream, p, metric, clsAttn, ws, slots);
    if (matched != cudaSuccess)
    {
        return matched;
    }
    return tfLaunch(mergeKernel<T>, dim3(p.batch, p.outTokens), dim3(kMergeThreads), 0, stream, p, x, size, ws, outX, outSize);
}

template cudaError_t launchSimilarityEnergyMerge<float>(MergeParams const&, float const*, float const*, float const*,
    float const*, float*, float*, int32_t*, void*, cudaStream_t);
template cudaError_t launchSimilarityEnergyMerge<__half>(MergeParams const&, __half const*, __half const*,
    float const*, float const*, __half*, float*, int32_t*, void*, cudaStream_t);

} // namespace tokenfuse

extern "C" cudaError_t tokenfuseMergeFloat(tokenfuse::MergeParams const* params, float const* x, float const* metric,
    float const* size, float const* clsAttn, float* outX, float* outSize, int32_t* slots, void* workspace,
    cudaStream_t stream)
{
    return tokenfuse::launchSimilarityEnergyMerge(*params, x, metric, size, clsAttn, outX, outSize, slots, workspace, stream);
}

extern "C" cudaError_t tokenfuseMergeHalf(tokenfuse::MergeParams const* params, __half const* x, __half const* metric,
    float const* size, float const* clsAttn, __half* outX, float* outSize, int32_t* slots, void* workspace,
    cudaStream_t stream)
{
    return tokenfuse::launchSimilarityEnergyMerge(*params, x, metric, size, clsAttn, outX, outSize, slots, workspace, stream);
}

extern "C" size_t tokenfuseMergeWorkspaceSize(int32_t batch, int32_t tokens, int32_t metricDim)
{
    return tokenfuse::mergeWorkspaceSize(batch, tokens, metricDim);
}
