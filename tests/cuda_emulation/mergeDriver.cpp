// Runs the merge kernels (CPU emulation) on cases written by tests/emulated_kernels.py, for the
// sanitizer builds: `merge_driver case0.bin case1.bin ...` writes case0.out, case1.out, ...
//
// Input:  int32 fp16-flag, int32 word count W, W int32 MergeParams words (today's fields, then
//         zeros), x [B,N,C], metric [B,N,D] (fp32 or fp16), size [B,N] fp32, clsAttn [B,N] fp32.
// Output: int32 status, slots [B,N] int32, x [B,K,C], size [B,K] fp32.
#include "similarityEnergyMergeKernels.h"

#include <cstdio>
#include <cstring>
#include <fstream>
#include <string>
#include <vector>

namespace
{

// The entry points as called with trailing zero arguments: a kernel library whose entry points
// gained trailing arguments (text encoders) reads zeros there, today's ignores them.
using Entry = cudaError_t (*)(void const*, void const*, void const*, float const*, float const*, void*, float*,
    int32_t*, void*, cudaStream_t, void*, void*, void*, void*, void*, void*);

template <typename T>
void readInto(std::ifstream& in, std::vector<T>& values, size_t count)
{
    values.resize(count);
    in.read(reinterpret_cast<char*>(values.data()), std::streamsize(count * sizeof(T)));
}

bool runCase(std::string const& path)
{
    std::ifstream in(path, std::ios::binary);
    int32_t header[2] = {};
    in.read(reinterpret_cast<char*>(header), sizeof(header));
    bool const half = header[0] != 0;
    std::vector<int32_t> words;
    readInto(in, words, size_t(header[1]));
    if (!in || words.size() < 11)
    {
        std::fprintf(stderr, "mergeDriver: cannot read %s\n", path.c_str());
        return false;
    }
    size_t const batch = size_t(words[2]), tokens = size_t(words[3]), outTokens = size_t(words[4]),
                 channels = size_t(words[5]), dim = size_t(words[6]);
    size_t const element = half ? 2 : 4;
    std::vector<unsigned char> x, metric, outX(batch * outTokens * channels * element);
    std::vector<float> size, clsAttn, outSize(batch * outTokens);
    std::vector<int32_t> slots(batch * tokens, -7);
    readInto(in, x, batch * tokens * channels * element);
    readInto(in, metric, batch * tokens * dim * element);
    readInto(in, size, batch * tokens);
    readInto(in, clsAttn, batch * tokens);
    if (!in)
    {
        std::fprintf(stderr, "mergeDriver: %s is short\n", path.c_str());
        return false;
    }
    // Today's fields from the file, any fields appended later zero.
    std::vector<unsigned char> params(sizeof(tokenfuse::MergeParams) + words.size() * 4, 0);
    std::memcpy(params.data(), words.data(), words.size() * 4);
    std::vector<unsigned char> workspace(tokenfuseMergeWorkspaceSize(int32_t(batch), int32_t(tokens), int32_t(dim)) + 1);
    Entry const entry = half ? reinterpret_cast<Entry>(&tokenfuseMergeHalf) : reinterpret_cast<Entry>(&tokenfuseMergeFloat);
    int32_t const status = entry(params.data(), x.data(), metric.data(), size.data(), clsAttn.data(), outX.data(),
        outSize.data(), slots.data(), workspace.data(), nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr);

    std::string const outPath = path.substr(0, path.rfind('.')) + ".out";
    std::ofstream out(outPath, std::ios::binary);
    out.write(reinterpret_cast<char const*>(&status), sizeof(status));
    out.write(reinterpret_cast<char const*>(slots.data()), std::streamsize(slots.size() * 4));
    out.write(reinterpret_cast<char const*>(outX.data()), std::streamsize(outX.size()));
    out.write(reinterpret_cast<char const*>(outSize.data()), std::streamsize(outSize.size() * 4));
    return bool(out);
}

} // namespace

int main(int argc, char** argv)
{
    for (int i = 1; i < argc; ++i)
    {
        if (!runCase(argv[i]))
        {
            return 2;
        }
    }
    return 0;
}
