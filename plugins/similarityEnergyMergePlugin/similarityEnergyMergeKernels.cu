/*
 * SimilarityEnergyMerge kernel: one launch per merge step (plus a memset of a few counters when an
 * image spreads over several blocks).
 *
 * mergeStepKernel runs S blocks per batch element: S = 1 once the batch fills the GPU, otherwise as
 * many as fill it in one wave, at most one per similarity tile pair, launched cooperatively (all
 * resident at once; where the device refuses, one block per image). Every block
 *   1. computes the norms of its image's metric rows (a thread per row, once per block);
 *   2. computes its share of the 32 x 32 tile pairs on or above the diagonal of the N x N cosine
 *      matrix: each 64-thread group one pair at a time, 4 x 4 cosines per thread, fp32 FMAs in
 *      dimension order (so (i, j) and (j, i) agree), each cosine written to (i, j) and (j, i).
 *      PiToMe's affinities are computed here too, and each row's sum over the tile's 32 columns
 *      (a 32-leaf tree) goes to the workspace. The matrix lives in shared memory when S = 1 and it
 *      fits (N up to 224 on sm_90, 184 on sm_80/87, 132 on sm_86/89, 92 on sm_75), else in the
 *      workspace (L2-resident at ViT shapes).
 * With S > 1 the block that finishes its tiles last (a ticket per image) matches, after copying
 * the matrix into shared memory when it fits and the method reads whole rows; it publishes the
 * slots in the workspace, and the image's other blocks wait for them. Then
 *   3. matching (one block): the row reductions each method needs (energy from the partial sums,
 *      best match in B, redundancy), the rankings by counting (a token's rank is how many members
 *      precede it in (key, tiebreak, position) order, as the exporter's rank_among), slot places
 *      by counting or straight from the ranks (PiToMe);
 *   4. merging (every block of the image, its share of the slots): one warp per output slot finds
 *      its members (its owner, and by ballot the sources that merge into it) and computes their
 *      size-weighted mean with 16-byte loads, sums and sizes in fp32.
 *
 * The decisions follow tokenfuse.exporter.methods exactly: stable rankings (ties go to the lower
 * position or order key), argmax picks the lowest index, a non-finite similarity scores -2.
 * PiToMe's energy adds every row in one fixed order (a pairwise tree), with F.elu's expm1, so
 * rows with equal similarities get equal keys and an exact tie breaks by position, as in the
 * exporter (whose row_sum gets the same property from rows padded to one alignment).
 */
#include "similarityEnergyMergeKernels.h"

#include <atomic>
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

constexpr int32_t kBlockThreads = 384;
constexpr int32_t kSmallBlockThreads = 128; // N <= 64: two tile groups, four warps
constexpr int32_t kSmallTokens = 64;

constexpr int32_t kTile = 32;                  // rows of a similarity tile
constexpr int32_t kChunk = 16;                 // metric dimensions staged at a time
constexpr int32_t kMicro = 4;                  // a thread computes a 4 x 4 block of a tile
constexpr int32_t kGroupSide = kTile / kMicro; // a tile group is 8 x 8 threads
constexpr int32_t kGroupThreads = kGroupSide * kGroupSide;

constexpr int32_t kIndexBits = 10; // token indices < kMaxTokens = 1024
constexpr uint64_t kIndexMask = (uint64_t(1) << kIndexBits) - 1;

static_assert(kMaxTokens <= (1 << kIndexBits), "rank keys hold a token index in kIndexBits bits");
static_assert(kBlockThreads % kGroupThreads == 0 && kSmallBlockThreads % kGroupThreads == 0, "whole tile groups");

enum Role : uint8_t
{
    kNONE = 0, // protected, or free but not in a merging set of this step
    kA = 1,    // source candidate
    kB = 2,    // destination
};

struct Workspace
{
    float* scores;    // [B, N, N] cosine similarities when they are not in shared memory
    float* partials;  // [B, N, T'] PiToMe: each row's affinity sum over each 32-column tile (T' a power of two)
    int32_t* target;  // [B, N] with S > 1, the matching's results that every block of an image merges by:
    int32_t* owner;   //        each token's slot, each slot's owner,
    int32_t* sources; //        the tokens that merge away
    uint32_t* counts; // [2B], zeroed before the launch: per batch element the blocks done with their
                      // tiles, then whether its matching is published
};

//! The counters a launch with S > 1 zeroes first.
size_t countBytes(int32_t batch)
{
    return sizeof(uint32_t) * 2 * size_t(batch);
}

//! More than the kernel's static shared memory (ptxas: 16 bytes), kept free of the dynamic part.
constexpr size_t kStaticShared = 64;

__host__ __device__ constexpr size_t alignUp(size_t bytes, size_t to = 256)
{
    return (bytes + to - 1) / to * to;
}

//! The smallest power of two >= the 32-token tiles of N: PiToMe's partial sums per row.
__host__ __device__ constexpr int32_t tileSlots(int32_t tokens)
{
    int32_t slots = 1;
    while (slots * kTile < tokens)
    {
        slots <<= 1;
    }
    return slots;
}

Workspace carve(void* base, int32_t batch, int32_t tokens)
{
    auto* bytes = static_cast<char*>(base);
    Workspace ws;
    ws.scores = reinterpret_cast<float*>(bytes);
    bytes += alignUp(sizeof(float) * size_t(batch) * tokens * tokens);
    ws.partials = reinterpret_cast<float*>(bytes);
    bytes += alignUp(sizeof(float) * size_t(batch) * tokens * tileSlots(tokens));
    for (int32_t** array : {&ws.target, &ws.owner, &ws.sources})
    {
        *array = reinterpret_cast<int32_t*>(bytes);
        bytes += alignUp(sizeof(int32_t) * size_t(batch) * tokens);
    }
    ws.counts = reinterpret_cast<uint32_t*>(bytes);
    return ws;
}

//! A staged chunk: rows 20 floats apart, so the 16-byte reads of the rows a warp needs (4 of one
//! tile, 8 of the other) fall on distinct banks, one shared-memory wavefront each.
constexpr int32_t kChunkStride = kChunk + 4;
using Chunk = float[kTile][kChunkStride];

//! Dynamic shared memory: the N x N scores when they fit, then one region that holds the
//! similarity's staging (row norms, two chunks per tile group) and afterwards the matching's
//! per-token arrays (the phases never overlap).
struct SharedLayout
{
    size_t region; // offset of the staging / per-token region
    size_t bytes;  // the whole

    __host__ __device__ static size_t stagingBytes(int32_t n, int32_t groups)
    {
        return alignUp(sizeof(float) * n, 16) + size_t(groups) * 2 * sizeof(Chunk);
    }
    __host__ __device__ static size_t tokenBytes(int32_t n)
    {
        return alignUp(sizeof(uint64_t) * n, 16) + 8 * alignUp(sizeof(int32_t) * (n + 1), 16) + 4 * alignUp(n, 16);
    }
    __host__ __device__ SharedLayout(int32_t n, int32_t groups, bool scoresInShared)
        : region(scoresInShared ? alignUp(sizeof(float) * n * n, 16) : 0)
    {
        size_t const staging = stagingBytes(n, groups);
        size_t const tokens = tokenBytes(n);
        bytes = region + (staging > tokens ? staging : tokens);
    }
};

//! The matching's per-token arrays, carved from the shared region.
struct MatchShared
{
    uint64_t* rankKey; // (key, tiebreak, index) of the ranking being counted
    float* key;        // the score being ranked
    int32_t* rank;     // position in the last ranking
    int32_t* order;    // order key of the bipartite sets
    int32_t* slot;     // slot of a token that stays (a source takes its partner's)
    int32_t* partner;  // where a source merges
    int32_t* target;   // the final slot of every token
    int32_t* owner;    // [K] the token of each slot that does not merge away
    int32_t* sources;  // [r] the tokens that merge into another one's slot, in position order
    uint8_t* role;
    uint8_t* merges; // a source: merges into partner
    uint8_t* free;   // may merge: neither protected nor frozen
    uint8_t* real;   // not padding

    __device__ MatchShared(unsigned char* region, int32_t n)
    {
        auto const take = [&](size_t bytes) {
            unsigned char* const at = region;
            region += alignUp(bytes, 16);
            return at;
        };
        rankKey = reinterpret_cast<uint64_t*>(take(sizeof(uint64_t) * n));
        key = reinterpret_cast<float*>(take(sizeof(float) * (n + 1)));
        auto const ints = [&] { return reinterpret_cast<int32_t*>(take(sizeof(int32_t) * (n + 1))); };
        rank = ints();
        order = ints();
        slot = ints();
        partner = ints();
        target = ints();
        owner = ints();
        sources = ints();
        role = take(n);
        merges = take(n);
        free = take(n);
        real = take(n);
    }
};

struct Rows
{
    float const* scores; // this batch element's [N, N], in shared or global memory
    int32_t tokens;
    int32_t lane;
    int32_t warp;
    int32_t warps;
};

__host__ __device__ __forceinline__ int32_t minInt(int32_t a, int32_t b)
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

//! Four elements at `src` (aligned to their size) as floats: 16 bytes of fp32, 8 of fp16.
__device__ __forceinline__ void load4(float const* src, float* out)
{
    load16(src, out);
}
__device__ __forceinline__ void load4(__half const* src, float* out)
{
    uint2 const raw = *reinterpret_cast<uint2 const*>(src);
    __half2 pairs[2];
    memcpy(pairs, &raw, sizeof(raw));
    for (int32_t p = 0; p < 2; ++p)
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

//! value(0) + .. + value(count - 1) as a binary tree over `count` leaves (a power of two, at most
//! 32): neighbouring pairs added level by level, the left one first. A binary counter: after leaf e,
//! level h holds a pending partial sum exactly when bit h of e + 1 is set, so leaf e carries through
//! the levels of its trailing one bits. Levels are indexed by unrolled constants, so the pending
//! sums stay in registers (a stack indexed at run time would live in local memory).
template <typename Value>
__device__ __forceinline__ float treeSum(int32_t count, Value value)
{
    constexpr int32_t kLevels = 6; // 32 leaves complete at level 5
    float pending[kLevels];
    float sum = 0.f;
    for (int32_t e = 0; e < count; ++e)
    {
        float v = value(e);
        int32_t const carries = __ffs(~e) - 1; // e's trailing one bits
#pragma unroll
        for (int32_t h = 0; h < kLevels; ++h)
        {
            if (h < carries)
            {
                v = pending[h] + v;
            }
            else if (h == carries)
            {
                pending[h] = v;
            }
        }
        sum = v; // after the last leaf, the whole tree
    }
    return sum;
}


//! A thread's share of one chunk (16 dimensions) of a tile's 32 metric rows: loaded into registers
//! a chunk ahead, so the next chunk's loads are in flight while this one is computed, then stored
//! into the tile divided by the rows' norms (F.normalize), zeros outside the matrix.
template <typename T>
struct StagedChunk
{
    static constexpr int32_t kValues = kTile * kChunk / kGroupThreads; // 8
    static_assert(kValues % 4 == 0 && kChunk % 4 == 0, "whole 4-element loads");
    float v[kValues];

    //! Element k of the `member`-th thread: vectorised, 4-element load k / 4 (16 bytes of fp32, 8 of
    //! fp16) of index member + 64 (k / 4) over the tile's rows of four loads; else index member + 64 k.
    __device__ __forceinline__ static void place(bool vectorised, int32_t member, int32_t k, int32_t& r, int32_t& c)
    {
        int32_t const e = vectorised ? member + kGroupThreads * (k / 4) : member + kGroupThreads * k;
        r = vectorised ? e / (kChunk / 4) : e / kChunk;
        c = vectorised ? (e % (kChunk / 4)) * 4 + k % 4 : e % kChunk;
    }

    __device__ __forceinline__ void load(
        T const* metric, int32_t n, int32_t dim, int32_t first, int32_t d0, bool vectorised, int32_t member)
    {
#pragma unroll
        for (int32_t k = 0; k < kValues; k += 4)
        {
            int32_t r;
            int32_t c;
            place(vectorised, member, k, r, c);
            if (vectorised)
            {
                bool const inside = first + r < n && d0 + c < dim;
                v[k] = v[k + 1] = v[k + 2] = v[k + 3] = 0.f;
                if (inside)
                {
                    load4(metric + size_t(first + r) * dim + d0 + c, &v[k]);
                }
                continue;
            }
#pragma unroll
            for (int32_t q = 0; q < 4; ++q)
            {
                place(false, member, k + q, r, c);
                v[k + q] = first + r < n && d0 + c < dim ? toFloat(metric[size_t(first + r) * dim + d0 + c]) : 0.f;
            }
        }
    }

    __device__ __forceinline__ void store(
        int32_t n, int32_t first, float const* norms, bool vectorised, int32_t member, Chunk& tile) const
    {
#pragma unroll
        for (int32_t k = 0; k < kValues; ++k)
        {
            int32_t r;
            int32_t c;
            place(vectorised, member, k, r, c);
            tile[r][c] = first + r < n ? v[k] / norms[first + r] : 0.f; // a zero past the metric's width stays 0
        }
    }
};

//! The tile pair (ti, tj), ti <= tj, numbered row by row.
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

//! This block's share (`part` of `split`) of one batch element's cosine matrix into `scores`:
//! row norms as F.normalize (v / max(|v|, 1e-12), a thread per row adding its squares in dimension
//! order, so a row's loads are in flight together), then the tile pairs, one per 64-thread group
//! at a time.
//! PiToMe's energy terms, summed where the cosines are computed: for every row, the affinities to
//! the counted tokens (free and real) of each 32-column tile, as a 32-leaf tree; the matching adds
//! a row's tiles as a tree on top, so every row adds its N affinities in one fixed order.
struct EnergyTiles
{
    float* partials; // this batch element's [N, tileSlots(N)]; null: not PiToMe
    float const* frozen;
    float const* valid;
    int32_t protectedTokens;

    __device__ bool counted(int32_t j) const
    {
        return j >= protectedTokens && !(frozen && frozen[j] > 0.5f) && (!valid || valid[j] > 0.5f);
    }
};

template <typename T>
__device__ void similarities(MergeParams const& p, T const* metric, float const* valid, int32_t part, int32_t split,
    float* norms, Chunk* chunks, float* scores, EnergyTiles const& energy)
{
    int32_t const n = p.tokens;
    int32_t const dim = p.metricDim;
    bool const vectorised = dim % kVector<T> == 0 && aligned16(metric);
    for (int32_t row = threadIdx.x; row < n; row += blockDim.x)
    {
        T const* values = metric + size_t(row) * dim;
        float squares = 0.f;
        for (int32_t d = 0; vectorised && d < dim; d += 4)
        {
            float v[4];
            load4(values + d, v);
            for (int32_t k = 0; k < 4; ++k)
            {
                squares = fmaf(v[k], v[k], squares);
            }
        }
        for (int32_t d = 0; !vectorised && d < dim; ++d)
        {
            float const v = toFloat(values[d]);
            squares = fmaf(v, v, squares);
        }
        norms[row] = fmaxf(sqrtf(squares), 1e-12f);
    }
    __syncthreads();

    // Thread (ty, tx) of a group owns rows ty + 8a and columns tx + 8c (a, c < 4) of its tile pair:
    // per four dimensions 8 shared 16-byte reads feed 64 FMAs.
    int32_t const tiles = (n + kTile - 1) / kTile;
    int32_t const pairs = tiles * (tiles + 1) / 2;
    int32_t const groups = blockDim.x / kGroupThreads;
    int32_t const group = threadIdx.x / kGroupThreads;
    int32_t const member = threadIdx.x % kGroupThreads;
    int32_t const tx = member % kGroupSide;
    int32_t const ty = member / kGroupSide;
    Chunk& rowsI = chunks[2 * group];
    Chunk& rowsJ = chunks[2 * group + 1];
    for (int32_t first = part * groups; first < pairs; first += split * groups) // the same trips for the whole block
    {
        int32_t const pair = first + group;
        bool const active = pair < pairs;
        int32_t ti = 0;
        int32_t tj = 0;
        if (active)
        {
            tilePair(pair, tiles, ti, tj);
        }
        int32_t const i0 = ti * kTile;
        int32_t const j0 = tj * kTile;
        float acc[kMicro][kMicro] = {};
        StagedChunk<T> nextI;
        StagedChunk<T> nextJ;
        if (active)
        {
            nextI.load(metric, n, dim, i0, 0, vectorised, member);
            nextJ.load(metric, n, dim, j0, 0, vectorised, member);
        }
        for (int32_t d0 = 0; d0 < dim; d0 += kChunk)
        {
            if (active)
            {
                nextI.store(n, i0, norms, vectorised, member, rowsI);
                nextJ.store(n, j0, norms, vectorised, member, rowsJ);
            }
            __syncthreads();
            if (active && d0 + kChunk < dim) // the next chunk's loads, in flight during this one's FMAs
            {
                nextI.load(metric, n, dim, i0, d0 + kChunk, vectorised, member);
                nextJ.load(metric, n, dim, j0, d0 + kChunk, vectorised, member);
            }
            // Four dimensions per 16-byte read; past the metric's width the chunk holds zeros, and
            // fmaf(0, 0, acc) is acc, so a partial chunk adds whole quads.
            int32_t const width = active ? minInt(kChunk, dim - d0) : 0;
            for (int32_t d = 0; d < width; d += 4)
            {
                float4 ai[kMicro];
                float4 bj[kMicro];
#pragma unroll
                for (int32_t k = 0; k < kMicro; ++k)
                {
                    ai[k] = *reinterpret_cast<float4 const*>(&rowsI[ty + kGroupSide * k][d]);
                    bj[k] = *reinterpret_cast<float4 const*>(&rowsJ[tx + kGroupSide * k][d]);
                }
#pragma unroll
                for (int32_t a = 0; a < kMicro; ++a)
                {
#pragma unroll
                    for (int32_t c = 0; c < kMicro; ++c)
                    {
                        // in dimension order, so (i, j) and (j, i) agree
                        acc[a][c] = fmaf(ai[a].x, bj[c].x, acc[a][c]);
                        acc[a][c] = fmaf(ai[a].y, bj[c].y, acc[a][c]);
                        acc[a][c] = fmaf(ai[a].z, bj[c].z, acc[a][c]);
                        acc[a][c] = fmaf(ai[a].w, bj[c].w, acc[a][c]);
                    }
                }
            }
            __syncthreads();
        }
        // The group's two chunks (free after the barrier above) take the tile's affinities.
        using AffinityTile = float[kTile][kTile + 1];
        static_assert(sizeof(AffinityTile) <= 2 * sizeof(Chunk), "a tile's affinities fit in its group's chunks");
        AffinityTile& affinity = *reinterpret_cast<AffinityTile*>(&rowsI);
#pragma unroll
        for (int32_t a = 0; a < kMicro; ++a)
        {
#pragma unroll
            for (int32_t c = 0; c < kMicro; ++c)
            {
                int32_t const i = i0 + ty + kGroupSide * a;
                int32_t const j = j0 + tx + kGroupSide * c;
                if (!active || i >= n || j >= n)
                {
                    continue; // a sum reads no affinity outside the matrix
                }
                float s = isnan(acc[a][c]) ? kNonFiniteSimilarity : acc[a][c];
                if (valid) // separate_padding: (s + 4 * both padding) - 8 * mixed
                {
                    bool const padI = !(valid[i] > 0.5f);
                    bool const padJ = !(valid[j] > 0.5f);
                    s = padI && padJ ? s + kPadBonus : (padI != padJ ? s - kMixedPenalty : s);
                }
                scores[size_t(i) * n + j] = s;
                if (ti != tj) // a diagonal tile's mirror is its own entry of another thread
                {
                    scores[size_t(j) * n + i] = s;
                }
                if (energy.partials)
                {
                    affinity[ty + kGroupSide * a][tx + kGroupSide * c] = pitomeAffinity(s, p);
                }
            }
        }
        if (!energy.partials)
        {
            continue;
        }
        // A thread per row of the tile (its columns' sum) and per column (its mirror row's sum).
        __syncthreads();
        int32_t const m = member % kTile;
        int32_t const slots = tileSlots(n);
        if (active && member < kTile && i0 + m < n)
        {
            energy.partials[size_t(i0 + m) * slots + tj] = treeSum(
                kTile, [&](int32_t e) { return j0 + e < n && energy.counted(j0 + e) ? affinity[m][e] : 0.f; });
        }
        else if (active && member >= kTile && ti != tj && j0 + m < n)
        {
            energy.partials[size_t(j0 + m) * slots + ti] = treeSum(
                kTile, [&](int32_t e) { return i0 + e < n && energy.counted(i0 + e) ? affinity[e][m] : 0.f; });
        }
        __syncthreads(); // before the next tiles' staging overwrites the affinities
    }
}

// ---------------------------------------------------------------------------------------------
// Matching

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

//! How many j in [0, n) have pred(j), counted by the calling thread alone.
template <typename Pred>
__device__ __forceinline__ int32_t countIf(int32_t n, Pred pred)
{
    int32_t count = 0;
    for (int32_t j = 0; j < n; ++j)
    {
        count += pred(j) ? 1 : 0;
    }
    return count;
}

//! How many j in [0, n) have pred(j), in every thread: each warp counts 32 tokens per vote.
template <typename Pred>
__device__ __forceinline__ int32_t blockCount(int32_t n, Pred pred)
{
    int32_t const lane = threadIdx.x % kWarpSize;
    int32_t count = 0;
    for (int32_t j0 = 0; j0 < n; j0 += kWarpSize)
    {
        count += __popc(__ballot_sync(kFullMask, j0 + lane < n && pred(j0 + lane)));
    }
    return count;
}

//! The t-th row a warp loop visits: even positions first, then odd ones, so that ToMe's A tokens
//! (even positions) spread over all warps instead of landing on the even warps only.
__device__ __forceinline__ int32_t interleaved(int32_t t, int32_t n)
{
    int32_t const half = (n + 1) / 2;
    return t < half ? 2 * t : 2 * (t - half) + 1;
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

//! s.rank[i] = position of token i when members are ordered by s.key descending, ties by the
//! lower tiebreak (the position, or s.order when `byOrder`), then position; non-members rank after
//! all members, by position. Counted: i's rank is how many tokens have a smaller (key, tie, index).
template <typename Member>
__device__ void rankDescending(MatchShared& s, int32_t n, Member member, bool byOrder)
{
    for (int32_t i = threadIdx.x; i < n; i += blockDim.x)
    {
        uint64_t entry = (uint64_t(1) << 63) | uint64_t(i);
        if (member(i)) // keys and order keys of non-members may never have been written
        {
            uint64_t const tie = uint64_t(byOrder ? s.order[i] : i) & kIndexMask;
            entry = (uint64_t(descendingBits(s.key[i])) << (2 * kIndexBits)) | (tie << kIndexBits) | uint64_t(i);
        }
        s.rankKey[i] = entry;
    }
    __syncthreads();
    // `ways` neighbouring threads per token (a power of two, as many as the block has to spare),
    // each counting every ways-th token; xor shuffles add their counts.
    int32_t ways = 1;
    while (ways < kWarpSize && 2 * ways * n <= int32_t(blockDim.x))
    {
        ways <<= 1;
    }
    for (int32_t base = 0; base < n * ways; base += blockDim.x) // the same trips for the whole block
    {
        int32_t const t = base + int32_t(threadIdx.x);
        int32_t const i = t / ways;
        int32_t count = 0;
        if (i < n)
        {
            uint64_t const mine = s.rankKey[i];
            for (int32_t j = t % ways; j < n; j += ways)
            {
                count += s.rankKey[j] < mine ? 1 : 0;
            }
        }
        for (int32_t offset = 1; offset < ways; offset <<= 1)
        {
            count += __shfl_xor_sync(kFullMask, count, offset);
        }
        if (i < n && t % ways == 0)
        {
            s.rank[i] = count;
        }
    }
    __syncthreads();
}

//! Every source's partner: its most similar kB token (the lowest index on ties), a warp per row.
__device__ void partnerSourcesWithB(MatchShared& s, Rows const& rows)
{
    for (int32_t t = rows.warp; t < rows.tokens; t += rows.warps)
    {
        int32_t const i = interleaved(t, rows.tokens);
        if (!s.merges[i])
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

//! ToMe's bipartite soft matching between roles kA and kB (set by the caller, s.order ordering
//! each set in the output): the r A tokens with the strongest best match in B (minus Turbo's
//! penalty) merge into it. Output: protected tokens, kept A tokens, then B tokens.
__device__ void bipartite(MatchShared& s, Rows const& rows, MergeParams const& p, int32_t r, float const* penalty)
{
    int32_t const n = rows.tokens;
    int32_t const P = p.protectedTokens;
    for (int32_t t = rows.warp; t < n; t += rows.warps)
    {
        int32_t const i = interleaved(t, n);
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
    auto const keptA = [&](int32_t j) { return s.role[j] == kA && s.rank[j] >= r; };
    int32_t const kept = blockCount(n, keptA);
    for (int32_t i = threadIdx.x; i < n; i += blockDim.x)
    {
        int32_t const order = s.order[i];
        if (s.role[i] == kA && s.rank[i] < r)
        {
            s.merges[i] = 1;
        }
        else if (keptA(i))
        {
            s.slot[i] = P + countIf(n, [&](int32_t j) { return keptA(j) && s.order[j] < order; });
        }
        else if (s.role[i] == kB)
        {
            s.slot[i] = P + kept + countIf(n, [&](int32_t j) { return s.role[j] == kB && s.order[j] < order; });
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

__device__ void pitomeSlots(MatchShared& s, Rows const& rows, MergeParams const& p, int32_t r, float const* partials)
{
    int32_t const n = rows.tokens;
    int32_t const P = p.protectedTokens;
    // Energy: mean affinity of each free token to the free real tokens (itself included), its
    // tiles' partial sums added as a tree; padding gets BIG, so it ranks first and merges with padding.
    float const counted = float(blockCount(n, [&](int32_t j) { return s.free[j] && s.real[j]; }));
    int32_t const tiles = (n + kTile - 1) / kTile;
    for (int32_t i = threadIdx.x; i < n; i += blockDim.x)
    {
        if (s.free[i])
        {
            float const* row = partials + size_t(i) * tileSlots(n);
            float const energy = treeSum(tileSlots(n), [&](int32_t t) { return t < tiles ? row[t] : 0.f; });
            s.key[i] = s.real[i] ? energy / counted : kBig;
        }
    }
    // rankDescending reads key[i] first on the thread that wrote it
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

    // The 2r highest energies merge in pairs, every A into its best B; a B token's place among B
    // follows from its rank (B holds ranks 1, 3, .., 2r-1, or r .. 2r-1 for the text variant); the
    // other free tokens keep their energy order after them.
    int32_t const kept = blockCount(n, [&](int32_t j) { return s.free[j] != 0; }) - 2 * r;
    bool const text = p.variant == PitomeVariant::kTEXT;
    for (int32_t i = threadIdx.x; i < n; i += blockDim.x)
    {
        int32_t const rank = s.rank[i];
        if (!s.free[i])
        {
            continue;
        }
        if (rank >= 2 * r)
        {
            s.slot[i] = P + rank - 2 * r;
            continue;
        }
        bool const isA = text ? rank < r : rank % 2 == 0;
        s.role[i] = isA ? kA : kB;
        s.merges[i] = isA;
        s.slot[i] = P + kept + (text ? rank - r : rank / 2);
    }
    __syncthreads();
    partnerSourcesWithB(s, rows);
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
        bool const source = s.free[i] && s.rank[i] < r;
        s.role[i] = s.free[i] ? (source ? kA : kB) : kNONE;
        s.merges[i] = source;
    }
    __syncthreads();
    partnerSourcesWithB(s, rows);
    for (int32_t i = threadIdx.x; i < n; i += blockDim.x)
    {
        if (s.role[i] == kB)
        {
            s.slot[i] = P + countIf(i, [&](int32_t j) { return s.role[j] == kB; });
        }
    }
}

//! Every token's slot into `slotsOut` and s.target; each slot's owner and the sources in position order
//! (fenced when `publish`: they are in global memory for the image's other blocks).
__device__ void match(MergeParams const& p, MatchShared& s, Rows const& rows, float const* clsAttn, float const* valid,
    float const* frozen, float const* partials, int32_t* slotsOut, bool publish)
{
    int32_t const n = p.tokens;
    int32_t const K = p.outTokens;
    int32_t const r = n - K;
    for (int32_t i = threadIdx.x; i < n; i += blockDim.x)
    {
        bool const fixed = frozen && frozen[i] > 0.5f;
        s.free[i] = i >= p.protectedTokens && !fixed;
        s.real[i] = !valid || valid[i] > 0.5f;
        s.slot[i] = fixed && r > 0 ? K - 1 : minInt(i, K - 1); // identity when r = 0; always in [0, K)
        s.role[i] = kNONE;
        s.merges[i] = 0;
        s.partner[i] = 0;
    }
    __syncthreads();
    if (r > 0)
    {
        switch (p.method)
        {
        case MergeMethod::kTOME: tomeSlots(s, rows, p, r, nullptr); break;
        case MergeMethod::kTURBO: tomeSlots(s, rows, p, r, clsAttn); break;
        case MergeMethod::kPITOME: pitomeSlots(s, rows, p, r, partials); break;
        case MergeMethod::kCROSSGET: crossgetSlots(s, rows, p, r); break;
        }
    }
    __syncthreads();
    // Each source takes its partner's slot; every other token owns its slot (exactly one per slot).
    for (int32_t i = threadIdx.x; i < n; i += blockDim.x)
    {
        int32_t const target = s.merges[i] ? s.slot[s.partner[i]] : s.slot[i];
        if (s.merges[i])
        {
            s.sources[countIf(i, [&](int32_t j) { return s.merges[j] != 0; })] = i;
        }
        else
        {
            s.owner[target] = i;
        }
        s.target[i] = target;
        slotsOut[i] = target;
    }
    if (publish) // the results in global memory, for the image's other blocks
    {
        __threadfence();
    }
    __syncthreads();
}

// ---------------------------------------------------------------------------------------------
// Merging

//! visit(i) for every member of slot k in position order, on the whole warp: its owner, and the
//! sources whose target is k, found 32 at a time by ballot.
template <typename Visit>
__device__ __forceinline__ void forMembers(MatchShared const& s, int32_t k, int32_t sourceCount, Visit visit)
{
    int32_t const lane = threadIdx.x % kWarpSize;
    int32_t const owner = s.owner[k];
    bool ownerDone = false;
    for (int32_t q0 = 0; q0 < sourceCount; q0 += kWarpSize)
    {
        unsigned mask = __ballot_sync(kFullMask, q0 + lane < sourceCount && s.target[s.sources[q0 + lane]] == k);
        while (mask)
        {
            int32_t const source = s.sources[q0 + __ffs(int(mask)) - 1];
            mask &= mask - 1;
            if (!ownerDone && owner < source)
            {
                visit(owner);
                ownerDone = true;
            }
            visit(source);
        }
    }
    if (!ownerDone)
    {
        visit(owner);
    }
}

//! Channel vectors of T a lane keeps in flight per member (more loads outstanding per warp): 16
//! channels' fp32 sums, so the sums stay in registers for fp16 too.
template <typename T>
constexpr int32_t kVectorsInFlight = 16 / kVector<T>;

//! One warp per output slot (this block's share: part, part + split, ...): the size-weighted mean of
//! its members, its size, and for text encoders whether it holds a real token and its latest position.
template <typename T>
__device__ void mergeSlots(MergeParams const& p, MatchShared const& s, T const* x, float const* sizes, float const* valid,
    float const* positions, TextTokens const& text, T* outX, float* outSize, size_t firstOut, int32_t part, int32_t split)
{
    int32_t const lane = threadIdx.x % kWarpSize;
    int32_t const C = p.channels;
    int32_t const sourceCount = p.tokens - p.outTokens;
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
    constexpr int32_t V = kVector<T>;
    bool const vectorised = C % V == 0 && aligned16(x) && aligned16(outX);
    int32_t const step = vectorised ? V : 1; // channels per load
    int32_t const warps = blockDim.x / kWarpSize;
    for (int32_t k = part + split * int32_t(threadIdx.x / kWarpSize); k < p.outTokens; k += split * warps)
    {
        float total = 0.f; // the weights
        float allSize = 0.f;
        float realSize = 0.f;
        float latest = -INFINITY;
        forMembers(s, k, sourceCount, [&](int32_t i) {
            total += weight(i);
            allSize += sizes[i];
            realSize += valid && valid[i] > 0.5f ? sizes[i] : 0.f;
            latest = positions ? fmaxf(latest, positions[i]) : latest;
        });
        T* out = outX + size_t(k) * C;
        for (int32_t base = 0; base < C; base += kVectorsInFlight<T> * kWarpSize * step) // the whole warp: forMembers votes
        {
            int32_t const c0 = base + lane * step;
            float acc[kVectorsInFlight<T>][V] = {};
            forMembers(s, k, sourceCount, [&](int32_t i) {
                float const w = weight(i);
                T const* row = x + size_t(i) * C;
#pragma unroll
                for (int32_t q = 0; q < kVectorsInFlight<T>; ++q)
                {
                    int32_t const c = c0 + q * kWarpSize * step;
                    float v[V] = {}; // a scalar load fills v[0]; the rest add nothing
                    if (c < C && vectorised)
                    {
                        load16(row + c, v);
                    }
                    else if (c < C)
                    {
                        v[0] = toFloat(row[c]);
                    }
#pragma unroll
                    for (int32_t e = 0; e < V; ++e)
                    {
                        acc[q][e] = fmaf(v[e], w, acc[q][e]);
                    }
                }
            });
#pragma unroll
            for (int32_t q = 0; q < kVectorsInFlight<T>; ++q)
            {
                int32_t const c = c0 + q * kWarpSize * step;
#pragma unroll
                for (int32_t e = 0; e < V; ++e)
                {
                    acc[q][e] = acc[q][e] / total;
                }
                if (c < C && vectorised)
                {
                    store16(acc[q], out + c);
                }
                else if (c < C)
                {
                    storeOne(acc[q][0], out + c);
                }
            }
        }
        if (lane == 0)
        {
            size_t const o = firstOut + k;
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
}

template <typename T>
struct StepArgs
{
    T const* x;
    T const* metric;
    float const* size;
    float const* clsAttn;
    TextTokens text;
    T* outX;
    float* outSize;
    int32_t* slots;
    Workspace ws;
    int32_t split;       // blocks per batch element
    bool scoresInShared; // the N x N matrix fits in shared memory
};

template <typename T>
__global__ void __launch_bounds__(kBlockThreads, 1) mergeStepKernel(MergeParams p, StepArgs<T> a)
{
    TF_DYNAMIC_SHARED(shared);
    TF_SHARED(int32_t, lastBlock);
    int32_t const n = p.tokens;
    int32_t const K = p.outTokens;
    int32_t const split = a.split;
    int32_t const b = int32_t(blockIdx.x) / split;
    int32_t const part = int32_t(blockIdx.x) % split;
    if (threadIdx.x == 0)
    {
        lastBlock = 0; // ordered before the tickets by the row norms' barrier
    }
    size_t const tokens = size_t(b) * n;
    uint32_t* const tilesDone = a.ws.counts + b;
    uint32_t* const published = a.ws.counts + p.batch + b;
    SharedLayout const layout(n, blockDim.x / kGroupThreads, a.scoresInShared);
    unsigned char* const region = shared + layout.region;
    float* const global = a.ws.scores + tokens * n;
    float* const scores = a.scoresInShared ? reinterpret_cast<float*>(shared) : global;
    float const* valid = a.text.valid ? a.text.valid + tokens : nullptr;
    float const* frozen = a.text.frozen ? a.text.frozen + tokens : nullptr;
    float const* positions = a.text.positions ? a.text.positions + tokens : nullptr;
    float* const partials = a.ws.partials + tokens * tileSlots(n);
    EnergyTiles const energy{p.method == MergeMethod::kPITOME ? partials : nullptr, frozen, valid, p.protectedTokens};
    similarities(p, a.metric + tokens * p.metricDim, valid, part, split, reinterpret_cast<float*>(region),
        reinterpret_cast<Chunk*>(region + alignUp(sizeof(float) * n, 16)), split > 1 ? global : scores, energy);

    MatchShared s(region, n);
    if (split > 1) // the matching's results go where every block of the image reads them
    {
        s.target = a.ws.target + tokens;
        s.owner = a.ws.owner + tokens;
        s.sources = a.ws.sources + tokens;
    }
    // With S > 1 the block whose warp takes an image's last ticket matches: each warp's lanes fence
    // their tiles before the warp's ticket, and that block has loaded none of them (no stale cache
    // line); the other blocks wait for its published results and merge their share of the slots.
    // With S = 1 the matching's first barrier orders the tiles before any read. PiToMe's plain and
    // text variants read only the r source rows (the energy came with the tiles): where the tiles
    // went, rather than after copying all N x N into shared memory.
    bool const copyScores = a.scoresInShared && !(p.method == MergeMethod::kPITOME && p.variant != PitomeVariant::kBSM);
    if (split > 1)
    {
        __threadfence();
        __syncwarp();
        if (threadIdx.x % kWarpSize == 0
            && atomicAdd(tilesDone, 1u) == unsigned(split * (blockDim.x / kWarpSize) - 1))
        {
            lastBlock = 1;
        }
        __syncthreads();
        while (!lastBlock && threadIdx.x == 0 && atomicAdd(published, 0u) == 0u)
        {
            __nanosleep(256);
        }
        __threadfence();
        for (size_t e = threadIdx.x; lastBlock && copyScores && e < size_t(n) * n; e += blockDim.x)
        {
            scores[e] = global[e];
        }
    }
    if (split == 1 || lastBlock)
    {
        Rows const rows{split > 1 && !copyScores ? global : scores, n, int32_t(threadIdx.x % kWarpSize),
            int32_t(threadIdx.x / kWarpSize), int32_t(blockDim.x / kWarpSize)};
        match(p, s, rows, a.clsAttn ? a.clsAttn + tokens : nullptr, valid, frozen, partials, a.slots + tokens, split > 1);
        if (split > 1 && threadIdx.x == 0)
        {
            atomicExch(published, 1u);
        }
    }
    else
    {
        __syncthreads(); // the block waits for thread 0's wait
    }
    mergeSlots(p, s, a.x + tokens * p.channels, a.size + tokens, valid, positions, a.text,
        a.outX + size_t(b) * K * p.channels, a.outSize, size_t(b) * K, part, split);
}

} // namespace

int32_t maxRemovable(MergeMethod method, int32_t tokens, int32_t protectedTokens, bool frozen)
{
    int32_t const free = tokens - protectedTokens;
    int32_t limit = method == MergeMethod::kCROSSGET ? free - 1 : free / 2;
    if (frozen && (method == MergeMethod::kTOME || method == MergeMethod::kTURBO))
    {
        // A holds the free even positions, and the frozen token may sit on one of them
        int32_t const leading = protectedTokens - 1;
        int32_t const evenFree = (tokens + 1) / 2 - (leading + 1) / 2;
        limit = minInt(limit, evenFree - 1);
    }
    return limit > 0 ? limit : 0;
}

LaunchPlan planLaunch(int32_t batch, int32_t tokens, TfDevice const& device, bool oneBlockPerImage)
{
    LaunchPlan plan;
    plan.threads = tokens <= kSmallTokens ? kSmallBlockThreads : kBlockThreads;
    int32_t const groups = plan.threads / kGroupThreads;
    int32_t const tiles = (tokens + kTile - 1) / kTile;
    int32_t const pairs = tiles * (tiles + 1) / 2;
    // As many blocks per image as fill the GPU in one wave (a block holding the N x N matrix has an
    // SM to itself), up to one per tile pair.
    int32_t const fill = device.multiprocessors / batch;
    plan.split = fill > 1 && !oneBlockPerImage ? minInt(pairs, fill) : 1;
    size_t const dynamic = device.sharedPerBlock > kStaticShared ? device.sharedPerBlock - kStaticShared : 0;
    plan.scoresInShared = SharedLayout(tokens, groups, true).bytes <= dynamic;
    plan.sharedBytes = SharedLayout(tokens, groups, plan.scoresInShared).bytes;
    return plan;
}

size_t mergeWorkspaceSize(int32_t batch, int32_t tokens, int32_t /*metricDim*/)
{
    return alignUp(sizeof(float) * size_t(batch) * tokens * tokens)
        + alignUp(sizeof(float) * size_t(batch) * tokens * tileSlots(tokens))
        + 3 * alignUp(sizeof(int32_t) * size_t(batch) * tokens) + alignUp(countBytes(batch));
}

//! Lets mergeStepKernel<T> use all the dynamic shared memory `device` offers, once per device (a
//! host call, kept out of the launches a CUDA graph captures; every caller sets the same value).
template <typename T>
cudaError_t allowSharedMemory(TfDevice const& device)
{
    constexpr int32_t kDevices = 64;
    static std::atomic<bool> allowed[kDevices] = {};
    bool const cached = device.ordinal >= 0 && device.ordinal < kDevices;
    if (cached && allowed[device.ordinal].load())
    {
        return cudaSuccess;
    }
    cudaError_t const status = tfAllowDynamicShared(mergeStepKernel<T>, device.sharedPerBlock - kStaticShared);
    if (status == cudaSuccess && cached)
    {
        allowed[device.ordinal].store(true);
    }
    return status;
}

template <typename T>
cudaError_t launchSimilarityEnergyMerge(MergeParams const& p, T const* x, T const* metric, float const* size,
    float const* clsAttn, T* outX, float* outSize, int32_t* slots, void* workspace, cudaStream_t stream,
    TextTokens const& text)
{
    int32_t const r = p.tokens - p.outTokens;
    int32_t const fixed = p.protectedTokens + (text.frozen ? 1 : 0);
    bool const valid = p.batch >= 0 && p.tokens >= 1 && p.tokens <= kMaxTokens && p.outTokens >= 1 && r >= 0
        && r <= maxRemovable(p.method, p.tokens, fixed, text.frozen != nullptr) && p.channels >= 1 && p.metricDim >= 1
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
    TfDevice device;
    cudaError_t status = tfDeviceLimits(device);
    if (status != cudaSuccess)
    {
        return status;
    }
    Workspace const ws = carve(workspace, p.batch, p.tokens);
    for (bool oneBlockPerImage : {false, true})
    {
        LaunchPlan const plan = planLaunch(p.batch, p.tokens, device, oneBlockPerImage);
        if (plan.sharedBytes + kStaticShared > device.sharedPerBlock || int64_t(p.batch) * plan.split > 0x7fffffff)
        {
            return cudaErrorInvalidValue;
        }
        status = plan.sharedBytes > 48 * 1024 ? allowSharedMemory<T>(device) : cudaSuccess;
        if (status != cudaSuccess)
        {
            return status;
        }
        StepArgs<T> const args{x, metric, size, clsAttn, text, outX, outSize, slots, ws, plan.split, plan.scoresInShared};
        dim3 const grid(uint32_t(p.batch * plan.split));
        if (plan.split == 1)
        {
            return tfLaunch(mergeStepKernel<T>, grid, dim3(plan.threads), plan.sharedBytes, stream, p, args);
        }
        // An image's blocks wait for one another: a cooperative launch has them all resident at
        // once, or refuses (a GPU shared with other work, a partition of its SMs), and then one
        // block per image does it all.
        status = tfMemsetAsync(ws.counts, 0, countBytes(p.batch), stream);
        if (status == cudaSuccess)
        {
            status = tfLaunchCooperative(mergeStepKernel<T>, grid, dim3(plan.threads), plan.sharedBytes, stream, p, args);
        }
        if (status != cudaErrorCooperativeLaunchTooLarge)
        {
            return status;
        }
        cudaGetLastError(); // the refusal, not a failure
    }
    return cudaErrorInvalidValue;
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

extern "C" cudaError_t tokenfuseMergeLaunchPlan(int32_t batch, int32_t tokens, int32_t* blocksPerImage, int32_t* threads,
    size_t* sharedBytes, int32_t* scoresInShared)
{
    TfDevice device;
    cudaError_t const status = batch >= 1 && tokens >= 1 ? tfDeviceLimits(device) : cudaErrorInvalidValue;
    if (status == cudaSuccess)
    {
        tokenfuse::LaunchPlan const plan = tokenfuse::planLaunch(batch, tokens, device, false);
        *blocksPerImage = plan.split;
        *threads = plan.threads;
        *sharedBytes = plan.sharedBytes;
        *scoresInShared = plan.scoresInShared;
    }
    return status;
}

extern "C" size_t tokenfuseMergeWorkspaceSize(int32_t batch, int32_t tokens, int32_t metricDim)
{
    return tokenfuse::mergeWorkspaceSize(batch, tokens, metricDim);
}
