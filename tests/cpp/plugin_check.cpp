// Build-time interface check of the tokenfuse plugin library, without a GPU.
//
//   plugin_check LIBRARY
//
// Gets the SimilarityEnergyMerge creator through the library's getCreators entry point (the one
// TensorRT's loadLibrary calls; tests/test_plugin.py loads it into TensorRT-RTX itself), then for
// every method: creates the plugin from fields, and checks its core and
// build interfaces (output types and shapes, format combinations, configure-time shape checks,
// workspace) and the serialisation round trip of its fields. Prints one line per check, exits
// with the number of failed checks.
#include <NvInferRuntime.h>

#include <dlfcn.h>

#include <cstdio>
#include <cstring>
#include <deque>
#include <string>
#include <vector>

using namespace nvinfer1;

namespace
{

int gFailures = 0;

void check(bool ok, std::string const& what)
{
    std::printf("%s %s\n", ok ? "ok" : "FAIL", what.c_str());
    gFailures += ok ? 0 : 1;
}

// A stand-in for TensorRT's expression builder: constants and opaque (runtime) dimensions.
class Expr : public IDimensionExpr
{
public:
    class Impl : public apiv::VDimensionExpr
    {
    public:
        explicit Impl(int64_t value)
            : mValue(value)
        {
        }
        bool isConstant() const override
        {
            return mValue >= 0;
        }
        int64_t getConstantValue() const override
        {
            return mValue;
        }
        bool isSizeTensor() const override
        {
            return false;
        }
        int64_t mValue;
    };

    explicit Expr(int64_t value)
        : mOwned(value)
    {
        mImpl = &mOwned;
    }
    ~Expr() noexcept override = default;

private:
    Impl mOwned;
};

class ExprBuilder : public IExprBuilder
{
    class Impl : public apiv::VExprBuilder
    {
    public:
        IDimensionExpr const* constant(int64_t value) override
        {
            mExprs.emplace_back(value);
            return &mExprs.back();
        }
        IDimensionExpr const* operation(DimensionOperation, IDimensionExpr const&, IDimensionExpr const&) override
        {
            return constant(-1);
        }
        IDimensionExpr const* declareSizeTensor(int32_t, IDimensionExpr const&, IDimensionExpr const&) override
        {
            return constant(-1);
        }
        std::deque<Expr> mExprs;
    };

public:
    ExprBuilder()
    {
        mImpl = &mOwned;
    }
    ~ExprBuilder() noexcept override = default;
    IDimensionExpr const* dim(int64_t value)
    {
        return mOwned.constant(value);
    }

private:
    Impl mOwned;
};

int64_t valueOf(IDimensionExpr const* e)
{
    return e->isConstant() ? e->getConstantValue() : -1;
}

struct Fields
{
    std::string method;
    std::string variant{"plain"};
    int32_t k{150};
    int32_t protectedTokens{1};
    float margin{0.5f};
    float alpha{1.f};
    float turboWeight{30.f};
    int32_t padded{0};
    int32_t causal{0};
    std::vector<PluginField> list;
    PluginFieldCollection collection{};

    PluginFieldCollection const* get()
    {
        list = {PluginField("method", method.c_str(), PluginFieldType::kCHAR, int32_t(method.size())),
            PluginField("variant", variant.c_str(), PluginFieldType::kCHAR, int32_t(variant.size())),
            PluginField("K", &k, PluginFieldType::kINT32, 1),
            PluginField("protected", &protectedTokens, PluginFieldType::kINT32, 1),
            PluginField("margin", &margin, PluginFieldType::kFLOAT32, 1),
            PluginField("alpha", &alpha, PluginFieldType::kFLOAT32, 1),
            PluginField("turbo_weight", &turboWeight, PluginFieldType::kFLOAT32, 1),
            PluginField("padded", &padded, PluginFieldType::kINT32, 1),
            PluginField("causal", &causal, PluginFieldType::kINT32, 1)};
        collection.nbFields = int32_t(list.size());
        collection.fields = list.data();
        return &collection;
    }
};

DynamicPluginTensorDesc desc(DataType type, std::vector<int64_t> dims)
{
    DynamicPluginTensorDesc d{};
    d.desc.type = type;
    d.desc.format = TensorFormat::kLINEAR;
    d.desc.dims.nbDims = int32_t(dims.size());
    for (size_t i = 0; i < dims.size(); ++i)
    {
        d.desc.dims.d[i] = dims[i];
        d.min.d[i] = dims[i] < 0 ? 1 : dims[i];
        d.max.d[i] = dims[i] < 0 ? 32 : dims[i];
    }
    d.min.nbDims = d.max.nbDims = d.desc.dims.nbDims;
    return d;
}

std::string serialized(IPluginV3* plugin)
{
    auto* runtime = static_cast<IPluginV3OneRuntime*>(plugin->getCapabilityInterface(PluginCapabilityType::kRUNTIME));
    PluginFieldCollection const* fc = runtime->getFieldsToSerialize();
    std::string out;
    for (int32_t i = 0; i < fc->nbFields; ++i)
    {
        PluginField const& f = fc->fields[i];
        size_t const unit = f.type == PluginFieldType::kCHAR ? 1 : 4;
        out += std::string(f.name) + "=" + std::string(static_cast<char const*>(f.data), unit * size_t(f.length)) + ";";
    }
    return out;
}

void checkMethod(IPluginCreatorV3One* creator, std::string const& method, std::string const& variant)
{
    std::string const tag = method + (method == "pitome" ? "/" + variant : "");
    Fields fields;
    fields.method = method;
    fields.variant = variant;
    fields.k = 150;
    IPluginV3* plugin = creator->createPlugin("check", fields.get(), TensorRTPhase::kBUILD);
    check(plugin != nullptr, tag + ": createPlugin from fields");
    if (plugin == nullptr)
    {
        return;
    }
    auto* core = static_cast<IPluginV3OneCore*>(plugin->getCapabilityInterface(PluginCapabilityType::kCORE));
    auto* build = static_cast<IPluginV3OneBuild*>(plugin->getCapabilityInterface(PluginCapabilityType::kBUILD));
    check(core && std::strcmp(core->getInterfaceInfo().kind, "PLUGIN_V3ONE_CORE") == 0
            && std::strcmp(core->getPluginName(), "SimilarityEnergyMerge") == 0
            && std::strcmp(core->getPluginVersion(), "1") == 0 && std::strcmp(core->getPluginNamespace(), "tokenfuse") == 0,
        tag + ": core interface names SimilarityEnergyMerge v1 in namespace tokenfuse");
    check(build && std::strcmp(build->getInterfaceInfo().kind, "PLUGIN_V3ONE_BUILD") == 0 && build->getNbOutputs() == 3,
        tag + ": build interface with 3 outputs");

    bool const turbo = method == "turbo";
    int32_t const nbInputs = turbo ? 4 : 3;
    for (DataType type : {DataType::kFLOAT, DataType::kHALF})
    {
        std::string const typeName = type == DataType::kFLOAT ? "fp32" : "fp16";
        DataType inTypes[4] = {type, type, DataType::kFLOAT, DataType::kFLOAT};
        DataType outTypes[3];
        check(build->getOutputDataTypes(outTypes, 3, inTypes, nbInputs) == 0 && outTypes[0] == type
                && outTypes[1] == DataType::kFLOAT && outTypes[2] == DataType::kINT32,
            tag + ": output types for " + typeName + " x are (" + typeName + ", fp32, int32)");

        std::vector<DynamicPluginTensorDesc> io = {desc(type, {-1, 197, 768}), desc(type, {-1, 197, 64}),
            desc(DataType::kFLOAT, {-1, 197, 1})};
        if (turbo)
        {
            io.push_back(desc(DataType::kFLOAT, {-1, 197}));
        }
        io.push_back(desc(type, {-1, 150, 768}));
        io.push_back(desc(DataType::kFLOAT, {-1, 150, 1}));
        io.push_back(desc(DataType::kINT32, {-1, 197}));
        bool all = true;
        for (int32_t pos = 0; pos < int32_t(io.size()); ++pos)
        {
            all = all && build->supportsFormatCombination(pos, io.data(), nbInputs, 3);
        }
        check(all, tag + ": supports the " + typeName + " combination at every position");
        std::vector<DynamicPluginTensorDesc> wrong = io;
        wrong[1].desc.type = type == DataType::kFLOAT ? DataType::kHALF : DataType::kFLOAT;
        wrong[2].desc.type = DataType::kHALF;
        wrong[nbInputs + 2].desc.type = DataType::kINT64;
        check(!build->supportsFormatCombination(1, wrong.data(), nbInputs, 3)
                && !build->supportsFormatCombination(2, wrong.data(), nbInputs, 3)
                && !build->supportsFormatCombination(nbInputs + 2, wrong.data(), nbInputs, 3),
            tag + ": refuses a metric of another type, an fp16 size and int64 slots (" + typeName + ")");
        wrong = io;
        wrong[0].desc.format = TensorFormat::kCHW32;
        wrong[0].desc.type = DataType::kINT8;
        check(!build->supportsFormatCombination(0, wrong.data(), nbInputs, 3), tag + ": refuses int8 and non-linear x");

        check(build->configurePlugin(io.data(), nbInputs, io.data() + nbInputs, 3) == 0, tag + ": configures N=197 -> K=150 (" + typeName + ")");
        check(build->getWorkspaceSize(io.data(), nbInputs, io.data() + nbInputs, 3) >= size_t(32) * 197 * 197 * 4,
            tag + ": workspace holds the similarities of the largest batch");
    }

    std::vector<DynamicPluginTensorDesc> big = {desc(DataType::kFLOAT, {-1, 1500, 768}),
        desc(DataType::kFLOAT, {-1, 1500, 64}), desc(DataType::kFLOAT, {-1, 1500, 1}), desc(DataType::kFLOAT, {-1, 1500})};
    check(build->configurePlugin(big.data(), nbInputs, nullptr, 3) != 0, tag + ": refuses N=1500 > 1024 at configure time");
    std::vector<DynamicPluginTensorDesc> tooFew = {desc(DataType::kFLOAT, {-1, 400, 768}),
        desc(DataType::kFLOAT, {-1, 400, 64}), desc(DataType::kFLOAT, {-1, 400, 1}), desc(DataType::kFLOAT, {-1, 400})};
    check(build->configurePlugin(tooFew.data(), nbInputs, nullptr, 3) != 0 || method == "crossget",
        tag + ": refuses 400 -> 150 tokens where the method removes at most half");
    std::vector<DynamicPluginTensorDesc> mismatch = {desc(DataType::kFLOAT, {-1, 197, 768}),
        desc(DataType::kFLOAT, {-1, 196, 64}), desc(DataType::kFLOAT, {-1, 197, 1}), desc(DataType::kFLOAT, {-1, 197})};
    check(build->configurePlugin(mismatch.data(), nbInputs, nullptr, 3) != 0, tag + ": refuses a metric with another token count");

    ExprBuilder exprs;
    DimsExprs in[4];
    int64_t const shapes[4][3] = {{-1, 197, 768}, {-1, 197, 64}, {-1, 197, 1}, {-1, 197, 0}};
    for (int32_t i = 0; i < 4; ++i)
    {
        in[i].nbDims = i == 3 ? 2 : 3;
        for (int32_t d = 0; d < in[i].nbDims; ++d)
        {
            in[i].d[d] = exprs.dim(shapes[i][d]);
        }
    }
    DimsExprs out[3];
    int32_t const status = build->getOutputShapes(in, nbInputs, nullptr, 0, out, 3, exprs);
    check(status == 0 && out[0].nbDims == 3 && valueOf(out[0].d[0]) == -1 && valueOf(out[0].d[1]) == 150
            && valueOf(out[0].d[2]) == 768 && out[1].nbDims == 3 && valueOf(out[1].d[1]) == 150
            && valueOf(out[1].d[2]) == 1 && out[2].nbDims == 2 && valueOf(out[2].d[1]) == 197,
        tag + ": output shapes [B,150,768], [B,150,1], [B,197]");
    check(build->getOutputShapes(in, nbInputs == 3 ? 4 : 3, nullptr, 0, out, 3, exprs) != 0,
        tag + ": refuses the wrong number of inputs");

    std::string const first = serialized(plugin);
    PluginFieldCollection const* saved
        = static_cast<IPluginV3OneRuntime*>(plugin->getCapabilityInterface(PluginCapabilityType::kRUNTIME))->getFieldsToSerialize();
    IPluginV3* restored = creator->createPlugin("restored", saved, TensorRTPhase::kRUNTIME);
    check(restored != nullptr && serialized(restored) == first && first.find("method=" + method + ";") != std::string::npos,
        tag + ": fields survive a serialisation round trip");
    IPluginV3* cloned = plugin->clone();
    check(cloned != nullptr && serialized(cloned) == first, tag + ": clone keeps the fields");
    delete restored;
    delete cloned;
    delete plugin;
}

//! A CLIP-text node (padded and causal): six inputs, five outputs, the frozen token in the limit.
void checkText(IPluginCreatorV3One* creator)
{
    Fields fields;
    fields.method = "pitome";
    fields.padded = 1;
    fields.causal = 1;
    IPluginV3* plugin = creator->createPlugin("text", fields.get(), TensorRTPhase::kBUILD);
    check(plugin != nullptr, "text: createPlugin with padded and causal");
    if (plugin == nullptr)
    {
        return;
    }
    auto* build = static_cast<IPluginV3OneBuild*>(plugin->getCapabilityInterface(PluginCapabilityType::kBUILD));
    check(build->getNbOutputs() == 5, "text: 5 outputs (merged mask and positions)");
    DataType inTypes[6] = {DataType::kHALF, DataType::kHALF, DataType::kFLOAT, DataType::kFLOAT, DataType::kFLOAT,
        DataType::kFLOAT};
    DataType outTypes[5];
    check(build->getOutputDataTypes(outTypes, 5, inTypes, 6) == 0 && outTypes[0] == DataType::kHALF
            && outTypes[2] == DataType::kINT32 && outTypes[3] == DataType::kFLOAT && outTypes[4] == DataType::kFLOAT,
        "text: output types (fp16, fp32, int32, fp32, fp32)");
    std::vector<DynamicPluginTensorDesc> io = {desc(DataType::kHALF, {-1, 77, 512}), desc(DataType::kHALF, {-1, 77, 512}),
        desc(DataType::kFLOAT, {-1, 77, 1}), desc(DataType::kFLOAT, {-1, 77}), desc(DataType::kFLOAT, {-1, 77}),
        desc(DataType::kFLOAT, {-1, 77}), desc(DataType::kHALF, {-1, 40, 512}), desc(DataType::kFLOAT, {-1, 40, 1}),
        desc(DataType::kINT32, {-1, 77}), desc(DataType::kFLOAT, {-1, 40}), desc(DataType::kFLOAT, {-1, 40})};
    bool all = true;
    for (int32_t pos = 0; pos < int32_t(io.size()); ++pos)
    {
        all = all && build->supportsFormatCombination(pos, io.data(), 6, 5);
    }
    check(all, "text: supports the fp16 combination at every position");
    fields.k = 40; // 77 - 37: at most (77 - 1 protected - 1 frozen) / 2 = 37 removed
    IPluginV3* fits = creator->createPlugin("text", fields.get(), TensorRTPhase::kBUILD);
    auto* fitsBuild = static_cast<IPluginV3OneBuild*>(fits->getCapabilityInterface(PluginCapabilityType::kBUILD));
    check(fitsBuild->configurePlugin(io.data(), 6, io.data() + 6, 5) == 0, "text: configures N=77 -> K=40");
    fields.k = 39;
    IPluginV3* tooMany = creator->createPlugin("text", fields.get(), TensorRTPhase::kBUILD);
    auto* tooManyBuild = static_cast<IPluginV3OneBuild*>(tooMany->getCapabilityInterface(PluginCapabilityType::kBUILD));
    check(tooManyBuild->configurePlugin(io.data(), 6, io.data() + 6, 5) != 0,
        "text: refuses N=77 -> K=39 (the frozen token never merges)");
    std::string const first = serialized(fits);
    IPluginV3* restored = creator->createPlugin(
        "restored", static_cast<IPluginV3OneRuntime*>(fits->getCapabilityInterface(PluginCapabilityType::kRUNTIME))->getFieldsToSerialize(),
        TensorRTPhase::kRUNTIME);
    check(restored != nullptr && serialized(restored) == first && first.find("padded=") != std::string::npos,
        "text: padded and causal survive a serialisation round trip");
    Fields unpadded = fields;
    unpadded.padded = 0;
    check(creator->createPlugin("bad", unpadded.get(), TensorRTPhase::kBUILD) == nullptr, "text: refuses causal without padded");
    delete restored;
    delete tooMany;
    delete fits;
    delete plugin;
}

} // namespace

int main(int argc, char** argv)
{
    std::setvbuf(stdout, nullptr, _IOLBF, 0);
    if (argc < 2)
    {
        std::fprintf(stderr, "usage: %s LIBRARY\n", argv[0]);
        return 100;
    }
    void* library = dlopen(argv[1], RTLD_NOW);
    using GetCreators = IPluginCreatorInterface* const* (*) (int32_t&);
    auto* getCreators = library ? reinterpret_cast<GetCreators>(dlsym(library, "getCreators")) : nullptr;
    check(getCreators != nullptr, "the library exports getCreators");
    if (getCreators == nullptr)
    {
        return 100;
    }
    int32_t count = 0;
    IPluginCreatorInterface* const* creators = getCreators(count);
    IPluginCreatorInterface* found = count == 1 ? creators[0] : nullptr;
    check(found != nullptr, "getCreators returns one creator");
    if (found == nullptr)
    {
        return 100;
    }
    check(std::strcmp(found->getInterfaceInfo().kind, "PLUGIN CREATOR_V3ONE") == 0, "the creator is an IPluginCreatorV3One");
    auto* creator = static_cast<IPluginCreatorV3One*>(found);
    PluginFieldCollection const* names = creator->getFieldNames();
    std::string listed;
    for (int32_t i = 0; i < names->nbFields; ++i)
    {
        listed += std::string(names->fields[i].name) + " ";
    }
    check(listed == "method variant K protected margin alpha turbo_weight padded causal ", "field names: " + listed);

    for (char const* method : {"tome", "crossget", "turbo"})
    {
        checkMethod(creator, method, "plain");
    }
    for (char const* variant : {"plain", "bsm", "text"})
    {
        checkMethod(creator, "pitome", variant);
    }
    checkText(creator);

    Fields bad;
    bad.method = "median";
    check(creator->createPlugin("bad", bad.get(), TensorRTPhase::kBUILD) == nullptr, "refuses an unknown method");
    bad.method = "tome";
    bad.k = 0;
    check(creator->createPlugin("bad", bad.get(), TensorRTPhase::kBUILD) == nullptr, "refuses K = 0");
    bad.k = 10;
    bad.margin = 1.5f;
    check(creator->createPlugin("bad", bad.get(), TensorRTPhase::kBUILD) == nullptr, "refuses margin >= 1");
    std::printf("%d failed\n", gFailures);
    return gFailures;
}
