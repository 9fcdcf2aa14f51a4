/*
 * SimilarityEnergyMerge kernels: three launches per merge step.
 *
 * similarityKernel  one block per (batch element, 32x32 tile pair on or above the diagonal):
 *                   stages both tiles' unit metric rows in shared memory (16-byte loads), computes
 *                   each cosine once and writes it to (i, j) and (j, i) of an N x N score matrix in
 *                   the workspace (L2-resident at ViT shapes). Batch 1 spreads over T(T+1)/2 blocks.
 * matchKernel       one block per batch element: the row reductions each method needs (energy,
 *                   best match in B, redundancy, masked max) over that matrix, rankings by a bitonic
 *                   sort of (key, tiebreak, index) in shared memory, slot positions by block scans,
 *                   and the slot membership lists (a second sort on (slot, index)).
 * mergeKernel       one warp per output slot: the size-weighted mean of its members with 16-byte
 *                   loads, sums and sizes in fp32.
 *
 * The decisions follow tokenfuse.exporter.methods exactly: stable rankings (ties go to the lower
 * position or order key), argmax picks the lowest index, a non-finite similarity scores -2.
 * PiToMe's energy adds every row in one fixed order (a pairwise tree), with F.elu's expm1, so
 * rows with equal similarities get equal keys and an exact tie breaks by position, as in the
 * exporter (whose row_sum gets the same property from rows padded to one alignment).
 */
#include "similarityEnergyMergeKernels.h"

#include <cstring>

namespace tokenfuse
{
namespace
{

constexpr float kBig = 1e4f;
//! The similarity of a non-finite metric row (its unit row is NaN), the exporter's
//! NON_FINITE_SIMILARITY: below every cosine and above -kBig, so every ranking stays a permutation.
constexpr float kNonFiniteSimilarity = -2.f;
// The exporter's PAD_BONUS and MIXED_PENALTY: padding pairs with padding first, with real tokens last.
constexpr float kPadBonus = 4.f;
constexpr float kMixedPenalty = 8.f;
//! A padding token's weight inside a slot that holds real tokens (TokenMerge.merge_padded).
constexpr float kPaddingWeight = 1e-6f;
constexpr int32_t kWarpSize = 32;
constexpr unsigned kFullMask = 0xffffffffu;

constexpr int32_t kTile = 32;  // rows of a similarity tile
constexpr int32_t kChunk = 32; // metric dimensions staged at a time
constexpr int32_t kMicro = 4;                   // a thread computes a 4 x 4 block of a tile
constexpr int32_t kSimSide = kTile / kMicro;     // 8 x 8 threads
constexpr int32_t kSimThreads = kSimSide * kSimSide;
constexpr int32_t kSimWarps = kSimThreads / kWarpSize;

constexpr int32_t kMatchThreads = 512;
constexpr int32_t kSmallMatchThreads = 64; // N <= 64
constexpr int32_t kIndexBits = 10;         // token indices < kMaxTokens = 1024
constexpr uint64_t kIndexMask = (uint64_t(1) << kIndexBits) - 1;

constexpr int32_t kMergeWarps = 8;
constexpr int32_t kMergeThreads = kMergeWarps * kWarpSize;

static_assert(kMaxTokens <= (1 << kIndexBits), "sort keys hold a token index in kIndexBits bits");
static_assert(kMaxTokens / 2 <= kMatchThreads, "one bitonic comparator per thread and step (any N)");

enum Role : uint8_t
{
    kNONE = 0,   // protected, or free but not merging in this step
    kA = 1,      // source candidate
    kB = 2,      // destination
    kSOURCE = 3, // merges into its partner
};

struct Workspace
{
    float* scores;    // [B, N, N] cosine similarities, NaN ones as kNonFiniteSimilarity
    int32_t* offsets; // [B, N + 1] first member of each slot
    int32_t* members; // [B, N] input tokens grouped by slot, in position order
};

size_t alignUp(size_t bytes)
{
    return (bytes + 255) & ~size_t(255);
}

Workspace carve(void* base, int32_t batch, int32_t tokens)
{
    auto* bytes = static_cast<char*>(base);
    Workspace ws;
    ws.scores = reinterpret_cast<float*>(bytes);
    bytes += alignUp(sizeof(float) * size_t(batch) * tokens * tokens);
    ws.offsets = reinterpret_cast<int32_t*>(bytes);
    bytes += alignUp(sizeof(int32_t) * size_t(batch) * (tokens + 1));
    ws.members = reinterpret_cast<int32_t*>(bytes);
    return ws;
}

__device__ __forceinline__ int32_t minInt(int32_t a, int32_t b)
{
    return a < b ? a : b;
}

__device__ __forceinline__ float toFloat(float v)
{
    return v;
}
__device__ __forceinline__ float toFloat(__half v)
{
    return __half2float(v);
}

//! Elements of T in one 16-byte load.
template <typename T>
constexpr int32_t kVector = 16 / sizeof(T);

//! 16 bytes at `src` (16-byte aligned) as floats.
__device__ __forceinline__ void load16(float const* src, float* out)
{
    float4 const v = *reinterpret_cast<float4 const*>(src);
    out[0] = v.x;
    out[1] = v.y;
    out[2] = v.z;
    out[3] = v.w;
}
__device__ __forceinline__ void load16(__half const* src, float* out)
{
    uint4 const raw = *reinterpret_cast<uint4 const*>(src);
    __half2 pairs[4];
    memcpy(pairs, &raw, sizeof(raw));
#pragma unroll
    for (int32_t p = 0; p < 4; ++p)
    {
        float2 const f = __half22float2(pairs[p]);
        out[2 * p] = f.x;
        out[2 * p + 1] = f.y;
    }
}

//! Floats as 16 bytes of T at `dst` (16-byte aligned).
__device__ __forceinline__ void store16(float const* in, float* dst)
{
    *reinterpret_cast<float4*>(dst) = make_float4(in[0], in[1], in[2], in[3]);
}
__device__ __forceinline__ void store16(float const* in, __half* dst)
{
    __half2 pairs[4];
#pragma unroll
    for (int32_t p = 0; p < 4; ++p)
    {
        pairs[p] = __halves2half2(__float2half_rn(in[2 * p]), __float2half_rn(in[2 * p + 1]));
    }
    uint4 raw;
    memcpy(&raw, pairs, sizeof(raw));
    *reinterpret_cast<uint4*>(dst) = raw;
}

__device__ __forceinline__ void storeOne(float v, float* dst)
{
    *dst = v;
}
__device__ __forceinline__ void storeOne(float v, __half* dst)
{
    *dst = __float2half_rn(v);
}

template <typename T>
__device__ __forceinline__ bool aligned16(T const* p)
{
    return (reinterpret_cast<uintptr_t>(p) & 15u) == 0;
}

__device__ __forceinline__ float warpSum(float v)
{
    for (int32_t offset = kWarpSize / 2; offset > 0; offset /= 2)
    {
        v += __shfl_xor_sync(kFullMask, v, offset);
    }
    return v;
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
        ArgMax const other{__shfl_xor_sync(kFullMask, v.value, offset), __shfl_xor_sync(kFullMask, v.index, offset)};
        v = better(v, other);
    }
    return v;
}

// ---------------------------------------------------------------------------------------------
// Similarities

using Chunk = float[kTile][kChunk + 1]; // +1: lane l reads row l without bank conflicts
using TileNorms = float[2 * kTile];

//! Unit rows first..first+31, dimensions d0..d0+31, into `tile` (zeros outside the matrix).
template <typename T>
__device__ void stageChunk(T const* metric, int32_t n, int32_t dim, int32_t first, int32_t d0, float const* norms,
    bool vectorised, Chunk& tile)
{
    constexpr int32_t V = kVector<T>;
    if (vectorised)
    {
        for (int32_t e = threadIdx.x; e < kTile * (kChunk / V); e += blockDim.x)
        {
            int32_t const r = e / (kChunk / V);
            int32_t const c = (e % (kChunk / V)) * V;
            float v[V];
            if (first + r < n && d0 + c < dim)
            {
                load16(metric + size_t(first + r) * dim + d0 + c, v);
            }
            else
            {
                for (int32_t k = 0; k < V; ++k)
                {
                    v[k] = 0.f;
                }
            }
            for (int32_t k = 0; k < V; ++k)
            {
                tile[r][c + k] = v[k] / norms[r];
            }
        }
        return;
    }
    for (int32_t e = threadIdx.x; e < kTile * kChunk; e += blockDim.x)
    {
        int32_t const r = e / kChunk;
        int32_t const c = e % kChunk;
        bool const inside = first + r < n && d0 + c < dim;
        tile[r][c] = inside ? toFloat(metric[size_t(first + r) * dim + d0 + c]) / norms[r] : 0.f;
    }
}

//! The tile pair (ti, tj), ti <= tj, of the `pair`-th block, counting row by row.
__device__ __forceinline__ void tilePair(int32_t pair, int32_t tiles, int32_t& ti, int32_t& tj)
{
    ti = 0;
    while (pair >= tiles - ti)
    {
        pair -= tiles - ti;
        ++ti;
    }
    tj = ti + pair;
}

template <typename T>
__global__ void __launch_bounds__(kSimThreads)
    similarityKernel(MergeParams p, T const* metric, float const* valid, Workspace ws)
{
    TF_SHARED(Chunk, rowsI);
    TF_SHARED(Chunk, rowsJ);
    TF_SHARED(TileNorms, norms);
    int32_t const n = p.tokens;
    int32_t const dim = p.metricDim;
    int32_t const tiles = (n + kTile - 1) / kTile;
    int32_t const pairs = tiles * (tiles + 1) / 2;
    int32_t const b = blockIdx.x / pairs;
    int32_t ti;
    int32_t tj;
    tilePair(blockIdx.x % pairs, tiles, ti, tj);
    int32_t const i0 = ti * kTile;
    int32_t const j0 = tj * kTile;
    int32_t const lane = threadIdx.x % kWarpSize;
    int32_t const warp = threadIdx.x / kWarpSize;
    T const* m = metric + size_t(b) * n * dim;

    // Row norms as F.normalize: v / max(|v|, 1e-12); one warp per row, the same order for every row.
    for (int32_t r = warp; r < 2 * kTile; r += kSimWarps)
    {
        int32_t const row = r < kTile ? i0 + r : j0 + r - kTile;
        float squares = 0.f;
        for (int32_t d = lane; row < n && d < dim; d += kWarpSize)
        {
            float const v = toFloat(m[size_t(row) * dim + d]);
            squares = fmaf(v, v, squares);
        }
        squares = warpSum(squares);
        if (lane == 0)
        {
            norms[r] = fmaxf(sqrtf(squares), 1e-12f);
        }
    }
    __syncthreads();

    // Thread (ty, tx) owns rows ty + 8a and columns tx + 8c (a, c < 4): per dimension 8 shared
    // loads (conflict-free: rows are 33 floats apart) feed 16 FMAs.
    int32_t const tx = threadIdx.x % kSimSide;
    int32_t const ty = threadIdx.x / kSimSide;
    bool const vectorised = dim % kVector<T> == 0 && aligned16(metric);
    float acc[kMicro][kMicro];
    for (int32_t a = 0; a < kMicro; ++a)
    {
        for (int32_t c = 0; c < kMicro; ++c)
        {
            acc[a][c] = 0.f;
        }
    }
    for (int32_t d0 = 0; d0 < dim; d0 += kChunk)
    {
        stageChunk(m, n, dim, i0, d0, norms, vectorised, rowsI);
        stageChunk(m, n, dim, j0, d0, norms + kTile, vectorised, rowsJ);
        __syncthreads();
        int32_t const width = minInt(kChunk, dim - d0);
        for (int32_t d = 0; d < width; ++d)
        {
            float ai[kMicro];
            float bj[kMicro];
#pragma unroll
            for (int32_t k = 0; k < kMicro; ++k)
            {
                ai[k] = rowsI[ty + kSimSide * k][d];
                bj[k] = rowsJ[tx + kSimSide * k][d];
            }
#pragma unroll
            for (int32_t a = 0; a < kMicro; ++a)
            {
#pragma unroll
                for (int32_t c = 0; c < kMicro; ++c)
                {
                    acc[a][c] = fmaf(ai[a], bj[c], acc[a][c]); // d order: (i,j) and (j,i) agree
                }
            }
        }
        __syncthreads();
    }

    // Through shared memory, so both the tile and its mirror are written a row at a time.
    float const* realB = valid ? valid + size_t(b) * n : nullptr;
    for (int32_t a = 0; a < kMicro; ++a)
    {
        for (int32_t c = 0; c < kMicro; ++c)
        {
            int32_t const i = i0 + ty + kSimSide * a;
            int32_t const j = j0 + tx + kSimSide * c;
            float s = acc[a][c];
            s = isnan(s) ? kNonFiniteSimilarity : s;
            if (realB && i < n && j < n) // separate_padding: (s + 4 * both padding) - 8 * mixed
            {
                bool const padI = !(realB[i] > 0.5f);
                bool const padJ = !(realB[j] > 0.5f);
                s = padI && padJ ? s + kPadBonus : (padI != padJ ? s - kMixedPenalty : s);
            }
            rowsI[ty + kSimSide * a][tx + kSimSide * c] = s;
        }
    }
    __syncthreads();
    float* scores = ws.scores + size_t(b) * n * n;
    for (int32_t e = threadIdx.x; e < kTile * kTile; e += blockDim.x)
    {
        int32_t const row = e / kTile;
        int32_t const col = e % kTile;
        if (i0 + row < n && j0 + col < n)
        {
            scores[size_t(i0 + row) * n + j0 + col] = rowsI[row][col];
        }
        if (ti != tj && j0 + row < n && i0 + col < n)
        {
            scores[size_t(j0 + row) * n + i0 + col] = rowsI[col][row];
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Matching

struct MatchShared
{
    uint64_t sortKey[kMaxTokens];
    float key[kMaxTokens];       // the score being ranked
    int32_t rank[kMaxTokens];    // position in the last ranking
    int32_t order[kMaxTokens];   // order key of the bipartite sets
    int32_t slot[kMaxTokens];    // slots before sources move
    int32_t partner[kMaxTokens]; // where a source merges
    int32_t scan[kMaxTokens];
    int32_t warpTotals[kMatchThreads / kWarpSize];
    int32_t freeCount; // tokens that may merge
    int32_t realCount; // ... and are not padding
    uint8_t role[kMaxTokens];
    uint8_t free[kMaxTokens]; // may merge: neither protected nor frozen
    uint8_t real[kMaxTokens]; // not padding
};

struct Rows
{
    float const* scores; // this batch element's [N, N]
    int32_t tokens;
    int32_t lane;
    int32_t warp;
    int32_t warps;
};

//! Warp-wide argmax over j of (take(j) ? score(i, j) : -BIG), the lowest j among equal maxima.
template <typename Take>
__device__ __forceinline__ ArgMax rowArgMax(Rows const& rows, int32_t i, Take take)
{
    float const* row = rows.scores + size_t(i) * rows.tokens;
    ArgMax acc{-INFINITY, 0};
    for (int32_t j = rows.lane; j < rows.tokens; j += kWarpSize)
    {
        float const v = take(j) ? row[j] : -kBig;
        if (v > acc.value)
        {
            acc = {v, j};
        }
    }
    return warpArgMax(acc);
}

//! The smallest power of two >= n.
__device__ __forceinline__ int32_t sortSize(int32_t n)
{
    int32_t size = 1;
    while (size < n)
    {
        size <<= 1;
    }
    return size;
}

//! Bits of a float that order descending values ascending as integers (-0 as +0, NaN last).
__device__ __forceinline__ uint32_t descendingBits(float v)
{
    v = isnan(v) ? -INFINITY : v + 0.f;
    uint32_t bits;
    memcpy(&bits, &v, sizeof(bits));
    uint32_t const ascending = (bits & 0x80000000u) ? ~bits : bits | 0x80000000u;
    return ~ascending;
}

//! Sorts s.sortKey[0, size) ascending; size a power of two.
__device__ void bitonicSort(MatchShared& s, int32_t size)
{
    for (int32_t k = 2; k <= size; k <<= 1)
    {
        for (int32_t j = k >> 1; j > 0; j >>= 1)
        {
            for (int32_t t = threadIdx.x; t < size / 2; t += blockDim.x)
            {
                int32_t const i = 2 * t - (t & (j - 1));
                uint64_t const a = s.sortKey[i];
                uint64_t const c = s.sortKey[i + j];
                if (((i & k) == 0) == (a > c))
                {
                    s.sortKey[i] = c;
                    s.sortKey[i + j] = a;
                }
            }
            __syncthreads();
        }
    }
}


//! s.rank[i] = position of member i when members are ordered by s.key descending, ties by the
//! lower tiebreak (the position, or s.order when `byOrder`); non-members rank after all members.
template <typename Member>
__device__ void rankDescending(MatchShared& s, int32_t n, Member member, bool byOrder)
{
    int32_t const size = sortSize(n);
    for (int32_t i = threadIdx.x; i < size; i += blockDim.x)
    {
        uint64_t entry = ~uint64_t(0);
        if (i < n && member(i)) // keys and order keys of non-members may never have been written
        {
            uint64_t const tie = uint64_t(byOrder ? s.order[i] : i) & kIndexMask;
            entry = (uint64_t(descendingBits(s.key[i])) << (2 * kIndexBits)) | (tie << kIndexBits) | uint64_t(i);
        }
        else if (i < n)
        {
            entry = (uint64_t(1) << 63) | uint64_t(i);
        }
        s.sortKey[i] = entry;
    }
    __syncthreads();
    bitonicSort(s, size);
    for (int32_t p = threadIdx.x; p < n; p += blockDim.x)
    {
        s.rank[s.sortKey[p] & kIndexMask] = p;
    }
    __syncthreads();
}

//! Exclusive prefix sum of s.scan[0, count) in place; returns the total.
__device__ int32_t exclusiveScan(MatchShared& s, int32_t count)
{
    int32_t const lane = threadIdx.x % kWarpSize;
    int32_t const warp = threadIdx.x / kWarpSize;
    int32_t const warps = blockDim.x / kWarpSize;
    int32_t const per = (count + blockDim.x - 1) / blockDim.x;
    int32_t const begin = minInt(threadIdx.x * per, count);
    int32_t const end = minInt(begin + per, count);
    int32_t local = 0;
    for (int32_t i = begin; i < end; ++i)
    {
        local += s.scan[i];
    }
    int32_t inclusive = local;
    for (int32_t offset = 1; offset < kWarpSize; offset <<= 1)
    {
        int32_t const up = __shfl_up_sync(kFullMask, inclusive, offset);
        inclusive += lane >= offset ? up : 0;
    }
    if (lane == kWarpSize - 1)
    {
        s.warpTotals[warp] = inclusive;
    }
    __syncthreads();
    if (warp == 0)
    {
        int32_t total = lane < warps ? s.warpTotals[lane] : 0;
        for (int32_t offset = 1; offset < kWarpSize; offset <<= 1)
        {
            int32_t const up = __shfl_up_sync(kFullMask, total, offset);
            total += lane >= offset ? up : 0;
        }
        __syncwarp();
        if (lane < warps)
        {
            s.warpTotals[lane] = total;
        }
    }
    __syncthreads();
    int32_t running = (warp > 0 ? s.warpTotals[warp - 1] : 0) + inclusive - local;
    for (int32_t i = begin; i < end; ++i)
    {
        int32_t const value = s.scan[i];
        s.scan[i] = running;
        running += value;
    }
    int32_t const total = s.warpTotals[warps - 1];
    __syncthreads();
    return total;
}

//! For every token with `flag(i)`: how many flagged tokens have a smaller order key `orderOf(i)`
//! (keys unique among flagged tokens, in [0, n)), left in s.scan[orderOf(i)]. Returns their count.
template <typename Flag, typename OrderOf>
__device__ int32_t placeAmong(MatchShared& s, int32_t n, Flag flag, OrderOf orderOf)
{
    for (int32_t i = threadIdx.x; i < n; i += blockDim.x)
    {
        s.scan[i] = 0;
    }
    __syncthreads();
    for (int32_t i = threadIdx.x; i < n; i += blockDim.x)
    {
        if (flag(i))
        {
            s.scan[orderOf(i)] = 1;
        }
    }
    __syncthreads();
    return exclusiveScan(s, n);
}

//! ToMe's bipartite soft matching between roles kA and kB (set by the caller, s.order ordering
//! each set in the output): the r A tokens with the strongest best match in B (minus Turbo's
//! penalty) merge into it. Output: protected tokens, kept A tokens, then B tokens.
__device__ void bipartite(MatchShared& s, Rows const& rows, MergeParams const& p, int32_t r, float const* penalty)
{
    int32_t const n = rows.tokens;
    int32_t const P = p.protectedTokens;
    for (int32_t i = rows.warp; i < n; i += rows.warps)
    {
        if (s.role[i] != kA)
        {
            continue;
        }
        ArgMax const best = rowArgMax(rows, i, [&](int32_t j) { return s.role[j] == kB; });
        if (rows.lane == 0)
        {
            s.key[i] = penalty ? __fsub_rn(best.value, __fmul_rn(p.turboWeight, penalty[i])) : best.value;
            s.partner[i] = best.index;
        }
    }
    __syncthreads();
    rankDescending(s, n, [&](int32_t i) { return s.role[i] == kA; }, /*byOrder=*/true);
    for (int32_t i = threadIdx.x; i < n; i += blockDim.x) // placeAmong's flag(i) runs on this same thread
    {
        if (s.role[i] == kA && s.rank[i] < r)
        {
            s.role[i] = kSOURCE;
        }
    }
    auto const orderOf = [&](int32_t i) { return s.order[i]; };
    int32_t const kept = placeAmong(s, n, [&](int32_t i) { return s.role[i] == kA; }, orderOf);
    for (int32_t i = threadIdx.x; i < n; i += blockDim.x)
    {
        if (s.role[i] == kA)
        {
            s.slot[i] = P + s.scan[s.order[i]];
        }
    }
    __syncthreads(); // s.scan is read above and cleared below
    placeAmong(s, n, [&](int32_t i) { return s.role[i] == kB; }, orderOf);
    for (int32_t i = threadIdx.x; i < n; i += blockDim.x)
    {
        if (s.role[i] == kB)
        {
            s.slot[i] = P + kept + s.scan[s.order[i]];
        }
    }
}

__device__ void tomeSlots(MatchShared& s, Rows const& rows, MergeParams const& p, int32_t r, float const* penalty)
{
    for (int32_t i = threadIdx.x; i < rows.tokens; i += blockDim.x)
    {
        s.role[i] = s.free[i] ? (i % 2 == 0 ? kA : kB) : kNONE;
        s.order[i] = i;
    }
    __syncthreads();
    bipartite(s, rows, p, r, penalty);
}

//! Warp-wide sum of value(j) over j < N in one fixed order for every row: zero-padded to a power
//! of two, neighbouring pairs added level by level. Lane l adds its contiguous block (a power of two
//! of at most kMaxTokens / kWarpSize = 2^5 elements) as a subtree, then the xor butterfly with rising
//! offsets adds the blocks. The subtree is a binary counter: after element e, level h holds a
//! pending partial sum exactly when bit h of e + 1 is set, so adding element e carries through the
//! levels of e's trailing one bits. Levels are indexed by unrolled constants, so the pending sums
//! stay in registers (a stack indexed at run time would live in local memory).
template <typename Value>
__device__ __forceinline__ float treeRowSum(Rows const& rows, Value value)
{
    constexpr int32_t kLevels = 6; // a block of 2^5 elements completes at level 5
    int32_t const block = sortSize(rows.tokens) > kWarpSize ? sortSize(rows.tokens) / kWarpSize : 1;
    float pending[kLevels];
    float sum = 0.f;
    for (int32_t e = 0; e < block; ++e)
    {
        int32_t const j = rows.lane * block + e;
        float v = j < rows.tokens ? value(j) : 0.f;
        int32_t const carries = __ffs(~e) - 1; // e's trailing one bits
#pragma unroll
        for (int32_t h = 0; h < kLevels; ++h)
        {
            if (h < carries)
            {
                v = pending[h] + v; // the older (left) partial first, as the exporter adds pairs
            }
            else if (h == carries)
            {
                pending[h] = v;
            }
        }
        sum = v; // after the block's last element, the whole subtree
    }
    for (int32_t offset = 1; offset < kWarpSize; offset <<= 1)
    {
        sum += __shfl_xor_sync(kFullMask, sum, offset);
    }
    return sum;
}

__device__ __forceinline__ float pitomeAffinity(float sim, MergeParams const& p)
{
    if (p.variant == PitomeVariant::kTEXT)
    {
        float const t = (1.f - sim) / (1.f - p.margin);
        return expf(-(t * t) / 2.f);
    }
    float const x = __fsub_rn(sim, p.margin);
    return x > 0.f ? x : __fmul_rn(expm1f(x), p.alpha); // F.elu: alpha * expm1(x)
}

//! Every kSOURCE token's partner: its most similar kB token (the lowest index on ties), a warp per row.
__device__ void partnerSourcesWithB(MatchShared& s, Rows const& rows)
{
    for (int32_t i = rows.warp; i < rows.tokens; i += rows.warps)
    {
        if (s.role[i] != kSOURCE)
        {
            continue;
        }
        ArgMax const best = rowArgMax(rows, i, [&](int32_t j) { return s.role[j] == kB; });
        if (rows.lane == 0)
        {
            s.partner[i] = best.index;
        }
    }
}

__device__ void pitomeSlots(MatchShared& s, Rows const& rows, MergeParams const& p, int32_t r)
{
    int32_t const n = rows.tokens;
    int32_t const P = p.protectedTokens;
    // Energy: mean affinity of each free token to the free real tokens (itself included); padding
    // gets BIG, so it ranks first and merges with padding.
    float const counted = float(s.realCount);
    for (int32_t i = rows.warp; i < n; i += rows.warps)
    {
        if (!s.free[i])
        {
            continue;
        }
        float const* row = rows.scores + size_t(i) * n;
        float const energy
            = treeRowSum(rows, [&](int32_t j) { return s.free[j] && s.real[j] ? pitomeAffinity(row[j], p) : 0.f; });
        if (rows.lane == 0)
        {
            s.key[i] = s.real[i] ? energy / counted : kBig;
        }
    }
    __syncthreads();
    rankDescending(s, n, [&](int32_t i) { return s.free[i] != 0; }, /*byOrder=*/false);

    if (p.variant == PitomeVariant::kBSM)
    {
        for (int32_t i = threadIdx.x; i < n; i += blockDim.x)
        {
            s.role[i] = s.free[i] ? (s.rank[i] % 2 == 0 ? kA : kB) : kNONE;
            s.order[i] = s.rank[i];
        }
        __syncthreads();
        bipartite(s, rows, p, r, nullptr);
        return;
    }

    // The 2r highest energies merge in pairs; the other free tokens keep their energy order.
    for (int32_t i = threadIdx.x; i < n; i += blockDim.x)
    {
        int32_t const rank = s.rank[i];
        uint8_t role = kNONE;
        if (s.free[i] && rank < 2 * r)
        {
            bool const isA = p.variant == PitomeVariant::kTEXT ? rank < r : rank % 2 == 0;
            role = isA ? kSOURCE : kB;
        }
        s.role[i] = role;
    }
    __syncthreads();
    partnerSourcesWithB(s, rows);
    int32_t const kept = s.freeCount - 2 * r;
    placeAmong(s, n, [&](int32_t i) { return s.role[i] == kB; }, [&](int32_t i) { return s.rank[i]; });
    for (int32_t i = threadIdx.x; i < n; i += blockDim.x)
    {
        if (s.role[i] == kB)
        {
            s.slot[i] = P + kept + s.scan[s.rank[i]];
        }
        else if (s.free[i] && s.role[i] == kNONE)
        {
            s.slot[i] = P + s.rank[i] - 2 * r;
        }
    }
}

__device__ void crossgetSlots(MatchShared& s, Rows const& rows, MergeParams const& p, int32_t r)
{
    int32_t const n = rows.tokens;
    int32_t const P = p.protectedTokens;
    // Redundancy: each free token's best match among the other free tokens.
    for (int32_t i = rows.warp; i < n; i += rows.warps)
    {
        float best = -kBig;
        if (s.free[i])
        {
            best = rowArgMax(rows, i, [&](int32_t j) { return s.free[j] && j != i; }).value;
        }
        if (rows.lane == 0)
        {
            s.key[i] = best;
        }
    }
    __syncthreads();
    auto const isFree = [&](int32_t i) { return s.free[i] != 0; };
    rankDescending(s, n, isFree, /*byOrder=*/false);
    // Each token's best match among the tokens ranked below it: a chain of merges never cycles.
    for (int32_t i = rows.warp; i < n; i += rows.warps)
    {
        float best = -kBig;
        if (s.free[i])
        {
            int32_t const mine = s.rank[i];
            best = rowArgMax(rows, i, [&](int32_t j) { return s.free[j] && j != i && s.rank[j] > mine; }).value;
        }
        if (rows.lane == 0)
        {
            s.key[i] = best;
        }
    }
    __syncthreads();
    rankDescending(s, n, isFree, /*byOrder=*/false);
    for (int32_t i = threadIdx.x; i < n; i += blockDim.x)
    {
        s.role[i] = s.free[i] ? (s.rank[i] < r ? kSOURCE : kB) : kNONE;
    }
    __syncthreads();
    partnerSourcesWithB(s, rows);
    placeAmong(s, n, [&](int32_t i) { return s.role[i] == kB; }, [](int32_t i) { return i; });
    for (int32_t i = threadIdx.x; i < n; i += blockDim.x)
    {
        if (s.role[i] == kB)
        {
            s.slot[i] = P + s.scan[i];
        }
    }
}

__global__ void __launch_bounds__(kMatchThreads)
    matchKernel(MergeParams p, float const* clsAttn, float const* valid, float const* frozen, Workspace ws, int32_t* slotsOut)
{
    TF_SHARED(MatchShared, s);
    int32_t const b = blockIdx.x;
    int32_t const n = p.tokens;
    int32_t const K = p.outTokens;
    int32_t const r = n - K;
    Rows const rows{ws.scores + size_t(b) * n * n, n, int32_t(threadIdx.x % kWarpSize),
        int32_t(threadIdx.x / kWarpSize), int32_t(blockDim.x / kWarpSize)};

    if (threadIdx.x == 0)
    {
        s.freeCount = 0;
        s.realCount = 0;
    }
    for (int32_t i = threadIdx.x; i < n; i += blockDim.x)
    {
        bool const fixed = frozen && frozen[size_t(b) * n + i] > 0.5f;
        s.free[i] = i >= p.protectedTokens && !fixed;
        s.real[i] = !valid || valid[size_t(b) * n + i] > 0.5f;
        s.slot[i] = fixed && r > 0 ? K - 1 : minInt(i, K - 1); // identity when r = 0; always in [0, K)
        s.role[i] = kNONE;
        s.partner[i] = 0;
    }
    __syncthreads();
    int32_t free = 0;
    int32_t real = 0;
    for (int32_t i = threadIdx.x; i < n; i += blockDim.x)
    {
        free += s.free[i];
        real += s.free[i] & s.real[i];
    }
    atomicAdd(&s.freeCount, free);
    atomicAdd(&s.realCount, real);
    __syncthreads(); // PiToMe reads the counts first thing

    if (r > 0)
    {
        switch (p.method)
        {
        case MergeMethod::kTOME: tomeSlots(s, rows, p, r, nullptr); break;
        case MergeMethod::kTURBO: tomeSlots(s, rows, p, r, clsAttn + size_t(b) * n); break;
        case MergeMethod::kPITOME: pitomeSlots(s, rows, p, r); break;
        case MergeMethod::kCROSSGET: crossgetSlots(s, rows, p, r); break;
        }
    }
    __syncthreads();

    // Each source takes its partner's slot; then the membership lists: sort (slot, position).
    int32_t const size = sortSize(n);
    for (int32_t i = threadIdx.x; i < size; i += blockDim.x)
    {
        uint64_t entry = ~uint64_t(0);
        if (i < n)
        {
            int32_t const slot = s.role[i] == kSOURCE ? s.slot[s.partner[i]] : s.slot[i];
            slotsOut[size_t(b) * n + i] = slot;
            entry = (uint64_t(slot) << kIndexBits) | uint64_t(i);
        }
        s.sortKey[i] = entry;
    }
    __syncthreads();
    bitonicSort(s, size);
    int32_t* members = ws.members + size_t(b) * n;
    int32_t* offsets = ws.offsets + size_t(b) * (n + 1);
    for (int32_t q = threadIdx.x; q < n; q += blockDim.x)
    {
        members[q] = int32_t(s.sortKey[q] & kIndexMask);
    }
    for (int32_t k = threadIdx.x; k <= K; k += blockDim.x)
    {
        int32_t lo = 0; // first entry whose slot is >= k
        int32_t hi = n;
        while (lo < hi)
        {
            int32_t const mid = (lo + hi) / 2;
            if (int64_t(s.sortKey[mid] >> kIndexBits) < k)
            {
                lo = mid + 1;
            }
            else
            {
                hi = mid;
            }
        }
        offsets[k] = lo;
    }
}

template <typename T>
__global__ void __launch_bounds__(kMergeThreads)
    mergeKernel(MergeParams p, T const* x, float const* size, TextTokens text, Workspace ws, T* outX, float* outSize,
        int64_t outputs)
{
    int64_t const g = int64_t(blockIdx.x) * kMergeWarps + threadIdx.x / kWarpSize;
    if (g >= outputs)
    {
        return; // the whole warp
    }
    int32_t const lane = threadIdx.x % kWarpSize;
    int32_t const n = p.tokens;
    int32_t const K = p.outTokens;
    int32_t const C = p.channels;
    int32_t const b = int32_t(g / K);
    int32_t const k = int32_t(g % K);
    int32_t const* offsets = ws.offsets + size_t(b) * (n + 1);
    int32_t const* members = ws.members + size_t(b) * n;
    float const* sizes = size + size_t(b) * n;
    float const* valid = text.valid ? text.valid + size_t(b) * n : nullptr;
    int32_t const begin = offsets[k];
    int32_t const end = offsets[k + 1];
    // A member's weight is its size; with a padding mask (merge_padded) padding weighs 1e-6 of it,
    // and a slot's size counts its real members only, unless it has none.
    auto const weight = [&](int32_t i) {
        if (!valid)
        {
            return sizes[i];
        }
        float const real = valid[i] > 0.5f ? 1.f : 0.f;
        return sizes[i] * (real + kPaddingWeight * (1.f - real));
    };
    float total = 0.f; // the weights
    float allSize = 0.f;
    float realSize = 0.f;
    float latest = -INFINITY;
    for (int32_t m = begin; m < end; ++m)
    {
        int32_t const i = members[m];
        total += weight(i);
        allSize += sizes[i];
        realSize += valid && valid[i] > 0.5f ? sizes[i] : 0.f;
        latest = text.positions ? fmaxf(latest, text.positions[size_t(b) * n + i]) : latest;
    }
    T const* xb = x + size_t(b) * n * C;
    T* out = outX + (size_t(b) * K + k) * C;
    constexpr int32_t V = kVector<T>;
    if (C % V == 0 && aligned16(x) && aligned16(outX))
    {
        for (int32_t c = lane * V; c < C; c += kWarpSize * V)
        {
            float acc[V];
            for (int32_t e = 0; e < V; ++e)
            {
                acc[e] = 0.f;
            }
            for (int32_t m = begin; m < end; ++m)
            {
                int32_t const i = members[m];
                float const w = weight(i);
                float v[V];
                load16(xb + size_t(i) * C + c, v);
                for (int32_t e = 0; e < V; ++e)
                {
                    acc[e] = fmaf(v[e], w, acc[e]);
                }
            }
            for (int32_t e = 0; e < V; ++e)
            {
                acc[e] = acc[e] / total;
            }
            store16(acc, out + c);
        }
    }
    else
    {
        for (int32_t c = lane; c < C; c += kWarpSize)
        {
            float acc = 0.f;
            for (int32_t m = begin; m < end; ++m)
            {
                int32_t const i = members[m];
                acc = fmaf(toFloat(xb[size_t(i) * C + c]), weight(i), acc);
            }
            storeOne(acc / total, out + c);
        }
    }
    if (lane == 0)
    {
        size_t const o = size_t(b) * K + k;
        outSize[o] = !valid ? total : (realSize > 0.f ? realSize : allSize);
        if (text.outValid)
        {
            text.outValid[o] = realSize > 0.f ? 1.f : 0.f;
        }
        if (text.outPositions)
        {
            text.outPositions[o] = latest;
        }
    }
}

} // namespace

int32_t maxRemovable(MergeMethod method, int32_t tokens, int32_t protectedTokens)
{
    int32_t const free = tokens - protectedTokens;
    int32_t const limit = method == MergeMethod::kCROSSGET ? free - 1 : free / 2;
    return limit > 0 ? limit : 0;
}

size_t mergeWorkspaceSize(int32_t batch, int32_t tokens, int32_t /*metricDim*/)
{
    return alignUp(sizeof(float) * size_t(batch) * tokens * tokens) + alignUp(sizeof(int32_t) * size_t(batch) * (tokens + 1))
        + alignUp(sizeof(int32_t) * size_t(batch) * tokens);
}

template <typename T>
cudaError_t launchSimilarityEnergyMerge(MergeParams const& p, T const* x, T const* metric, float const* size,
    float const* clsAttn, T* outX, float* outSize, int32_t* slots, void* workspace, cudaStream_t stream,
    TextTokens const& text)
{
    int32_t const r = p.tokens - p.outTokens;
    int32_t const fixed = p.protectedTokens + (text.frozen ? 1 : 0);
    bool const valid = p.batch >= 0 && p.tokens >= 1 && p.tokens <= kMaxTokens && p.outTokens >= 1 && r >= 0
        && r <= maxRemovable(p.method, p.tokens, fixed) && p.channels >= 1 && p.metricDim >= 1
        && p.protectedTokens >= 0 && (p.method != MergeMethod::kTURBO || clsAttn != nullptr)
        && (text.outValid == nullptr || text.valid != nullptr) && (text.outPositions == nullptr || text.positions != nullptr);
    if (!valid)
    {
        return cudaErrorInvalidValue;
    }
    if (p.batch == 0)
    {
        return cudaSuccess;
    }
    Workspace const ws = carve(workspace, p.batch, p.tokens);
    int32_t const tiles = (p.tokens + kTile - 1) / kTile;
    int64_t const simBlocks = int64_t(p.batch) * tiles * (tiles + 1) / 2;
    int64_t const outputs = int64_t(p.batch) * p.outTokens;
    int64_t const mergeBlocks = (outputs + kMergeWarps - 1) / kMergeWarps;
    if (simBlocks > 0x7fffffff || mergeBlocks > 0x7fffffff)
    {
        return cudaErrorInvalidValue;
    }
    cudaError_t status = tfLaunch(similarityKernel<T>, dim3(uint32_t(simBlocks)), dim3(kSimThreads), 0, stream, p,
        metric, text.valid, ws);
    if (status != cudaSuccess)
    {
        return status;
    }
    // Rows are independent, so more warps mean more loads in flight: the match of one batch element
    // is latency-bound.
    int32_t const matchThreads = p.tokens <= kSmallMatchThreads ? kSmallMatchThreads : kMatchThreads;
    status = tfLaunch(matchKernel, dim3(p.batch), dim3(matchThreads), 0, stream, p, clsAttn, text.valid, text.frozen, ws, slots);
    if (status != cudaSuccess)
    {
        return status;
    }
    return tfLaunch(mergeKernel<T>, dim3(uint32_t(mergeBlocks)), dim3(kMergeThreads), 0, stream, p, x, size, text, ws,
        outX, outSize, outputs);
}

template cudaError_t launchSimilarityEnergyMerge<float>(MergeParams const&, float const*, float const*, float const*,
    float const*, float*, float*, int32_t*, void*, cudaStream_t, TextTokens const&);
template cudaError_t launchSimilarityEnergyMerge<__half>(MergeParams const&, __half const*, __half const*,
    float const*, float const*, __half*, float*, int32_t*, void*, cudaStream_t, TextTokens const&);

} // namespace tokenfuse

extern "C" cudaError_t tokenfuseMergeFloat(tokenfuse::MergeParams const* params, float const* x, float const* metric,
    float const* size, float const* clsAttn, float* outX, float* outSize, int32_t* slots, void* workspace,
    cudaStream_t stream, float const* valid, float const* frozen, float const* positions, float* outValid,
    float* outPositions)
{
    return tokenfuse::launchSimilarityEnergyMerge(*params, x, metric, size, clsAttn, outX, outSize, slots, workspace, stream,
        tokenfuse::TextTokens{valid, frozen, positions, outValid, outPositions});
}

extern "C" cudaError_t tokenfuseMergeHalf(tokenfuse::MergeParams const* params, __half const* x, __half const* metric,
    float const* size, float const* clsAttn, __half* outX, float* outSize, int32_t* slots, void* workspace,
    cudaStream_t stream, float const* valid, float const* frozen, float const* positions, float* outValid,
    float* outPositions)
{
    return tokenfuse::launchSimilarityEnergyMerge(*params, x, metric, size, clsAttn, outX, outSize, slots, workspace, stream,
        tokenfuse::TextTokens{valid, frozen, positions, outValid, outPositions});
}

extern "C" size_t tokenfuseMergeWorkspaceSize(int32_t batch, int32_t tokens, int32_t metricDim)
{
    return tokenfuse::mergeWorkspaceSize(batch, tokens, metricDim);
}
