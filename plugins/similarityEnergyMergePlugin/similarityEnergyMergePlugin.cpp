#include "similarityEnergyMergePlugin.h"

#include <cstring>
#include <iostream>
#include <mutex>

using namespace nvinfer1;

namespace tokenfuse
{
namespace
{

char const* const kPluginName = "SimilarityEnergyMerge";
char const* const kPluginVersion = "1";
char const* const kPluginNamespace = "tokenfuse";

// Attributes the ONNX parser may hand over that are not ours.
char const* const kParserFields[] = {"plugin_namespace", "plugin_version"};

struct Named
{
    char const* name;
    int32_t value;
};
Named const kMethods[] = {{"tome", int32_t(MergeMethod::kTOME)}, {"pitome", int32_t(MergeMethod::kPITOME)},
    {"crossget", int32_t(MergeMethod::kCROSSGET)}, {"turbo", int32_t(MergeMethod::kTURBO)}};
Named const kVariants[] = {{"plain", int32_t(PitomeVariant::kPLAIN)}, {"bsm", int32_t(PitomeVariant::kBSM)},
    {"text", int32_t(PitomeVariant::kTEXT)}};

template <size_t N>
char const* nameOf(Named const (&table)[N], int32_t value)
{
    for (auto const& entry : table)
    {
        if (entry.value == value)
        {
            return entry.name;
        }
    }
    return "?";
}

template <size_t N>
bool valueOf(Named const (&table)[N], std::string const& name, int32_t& value)
{
    for (auto const& entry : table)
    {
        if (name == entry.name)
        {
            value = entry.value;
            return true;
        }
    }
    return false;
}

std::mutex gLoggerMutex;
ILogger* gLogger{nullptr};

std::string text(PluginField const& field)
{
    std::string value(static_cast<char const*>(field.data), static_cast<size_t>(field.length));
    return value.substr(0, value.find('\0'));
}

//! A one-element field stored as `Narrow` (type tag `narrow`) or `Wide` (`wide`), read as T.
template <typename T, typename Narrow, typename Wide>
bool scalar(PluginField const& field, PluginFieldType narrow, PluginFieldType wide, T& value)
{
    if (field.length != 1 || (field.type != narrow && field.type != wide))
    {
        return false;
    }
    value = field.type == narrow ? static_cast<T>(*static_cast<Narrow const*>(field.data))
                                 : static_cast<T>(*static_cast<Wide const*>(field.data));
    return true;
}

bool integer(PluginField const& field, int32_t& value)
{
    return scalar<int32_t, int32_t, int64_t>(field, PluginFieldType::kINT32, PluginFieldType::kINT64, value);
}

bool real(PluginField const& field, float& value)
{
    return scalar<float, float, double>(field, PluginFieldType::kFLOAT32, PluginFieldType::kFLOAT64, value);
}

//! Reads the fields into `out`; returns why they are invalid, or an empty string.
std::string parseFields(PluginFieldCollection const* fc, MergeFields& out)
{
    bool haveK = false;
    for (int32_t f = 0; fc != nullptr && f < fc->nbFields; ++f)
    {
        PluginField const& field = fc->fields[f];
        std::string const name = field.name ? field.name : "";
        bool ok = true;
        if (name == "method")
        {
            int32_t value = 0;
            ok = field.type == PluginFieldType::kCHAR && valueOf(kMethods, text(field), value);
            out.method = static_cast<MergeMethod>(value);
            if (!ok)
            {
                return "method must be one of tome, pitome, crossget, turbo (got '" + text(field) + "')";
            }
        }
        else if (name == "variant")
        {
            int32_t value = 0;
            ok = field.type == PluginFieldType::kCHAR && valueOf(kVariants, text(field), value);
            out.variant = static_cast<PitomeVariant>(value);
            if (!ok)
            {
                return "variant must be one of plain, bsm, text (got '" + text(field) + "')";
            }
        }
        else if (name == "K")
        {
            ok = haveK = integer(field, out.outTokens);
        }
        else if (name == "protected")
        {
            ok = integer(field, out.protectedTokens);
        }
        else if (name == "margin")
        {
            ok = real(field, out.margin);
        }
        else if (name == "alpha")
        {
            ok = real(field, out.alpha);
        }
        else if (name == "turbo_weight")
        {
            ok = real(field, out.turboWeight);
        }
        else if (name == "padded")
        {
            ok = integer(field, out.padded);
        }
        else if (name == "causal")
        {
            ok = integer(field, out.causal);
        }
        else
        {
            bool parserField = false;
            for (char const* known : kParserFields)
            {
                parserField = parserField || name == known;
            }
            if (!parserField)
            {
                return "unknown field '" + name + "'";
            }
        }
        if (!ok)
        {
            return "field '" + name + "' has the wrong type or length";
        }
    }
    if (!haveK || out.outTokens < 1)
    {
        return "K (the number of output tokens) must be given and at least 1";
    }
    if (out.protectedTokens < 0)
    {
        return "protected must be >= 0";
    }
    if (!(out.margin < 1.f))
    {
        return "margin must be < 1";
    }
    if ((out.padded != 0 && out.padded != 1) || (out.causal != 0 && out.causal != 1))
    {
        return "padded and causal must be 0 or 1";
    }
    if (out.causal && !out.padded)
    {
        return "causal (frozen token and positions) needs padded (the padding mask) too";
    }
    return {};
}

} // namespace

void setLogger(ILogger* logger)
{
    std::lock_guard<std::mutex> lock(gLoggerMutex);
    gLogger = logger;
}

void logError(std::string const& message)
{
    std::string const line = std::string(kPluginNamespace) + "::" + kPluginName + ": " + message;
    std::lock_guard<std::mutex> lock(gLoggerMutex);
    if (gLogger != nullptr)
    {
        gLogger->log(ILogger::Severity::kERROR, line.c_str());
    }
    else
    {
        std::cerr << line << std::endl;
    }
}

SimilarityEnergyMergePlugin::SimilarityEnergyMergePlugin(MergeFields const& fields)
    : mFields(fields)
    , mMethodName(nameOf(kMethods, int32_t(fields.method)))
    , mVariantName(nameOf(kVariants, int32_t(fields.variant)))
{
}

IPluginCapability* SimilarityEnergyMergePlugin::getCapabilityInterface(PluginCapabilityType type) noexcept
{
    switch (type)
    {
    case PluginCapabilityType::kCORE: return static_cast<IPluginV3OneCore*>(this);
    case PluginCapabilityType::kBUILD: return static_cast<IPluginV3OneBuild*>(this);
    case PluginCapabilityType::kRUNTIME: return static_cast<IPluginV3OneRuntime*>(this);
    }
    return nullptr;
}

IPluginV3* SimilarityEnergyMergePlugin::clone() noexcept
{
    try
    {
        return new SimilarityEnergyMergePlugin(mFields);
    }
    catch (std::exception const& e)
    {
        logError(e.what());
        return nullptr;
    }
}

char const* SimilarityEnergyMergePlugin::getPluginName() const noexcept
{
    return kPluginName;
}

char const* SimilarityEnergyMergePlugin::getPluginVersion() const noexcept
{
    return kPluginVersion;
}

char const* SimilarityEnergyMergePlugin::getPluginNamespace() const noexcept
{
    return kPluginNamespace;
}

int32_t SimilarityEnergyMergePlugin::getNbOutputs() const noexcept
{
    return mFields.nbOutputs();
}

int32_t SimilarityEnergyMergePlugin::getOutputDataTypes(
    DataType* outputTypes, int32_t nbOutputs, DataType const* inputTypes, int32_t nbInputs) const noexcept
{
    if (nbOutputs != mFields.nbOutputs() || nbInputs != mFields.nbInputs())
    {
        logError("expects " + std::to_string(mFields.nbInputs()) + " inputs and " + std::to_string(mFields.nbOutputs())
            + " outputs");
        return -1;
    }
    outputTypes[0] = inputTypes[0];
    outputTypes[1] = DataType::kFLOAT;
    outputTypes[2] = DataType::kINT32;
    for (int32_t i = 3; i < nbOutputs; ++i) // merged mask, merged positions
    {
        outputTypes[i] = DataType::kFLOAT;
    }
    return 0;
}

std::string SimilarityEnergyMergePlugin::shapeProblem(Dims const* in, int32_t nbInputs) const
{
    if (nbInputs != mFields.nbInputs())
    {
        return mMethodName + " takes " + std::to_string(mFields.nbInputs()) + " inputs, got " + std::to_string(nbInputs);
    }
    for (int32_t i = 0; i < nbInputs; ++i)
    {
        int32_t const rank = i < 3 ? 3 : 2; // x, metric, size; then [B, N] rows
        if (in[i].nbDims != rank)
        {
            return "input " + std::to_string(i) + " must have rank " + std::to_string(rank);
        }
    }
    int64_t const tokens = in[0].d[1];
    for (int32_t i = 1; i < nbInputs; ++i)
    {
        if (in[i].d[1] >= 0 && tokens >= 0 && in[i].d[1] != tokens)
        {
            return "input " + std::to_string(i) + " has " + std::to_string(in[i].d[1]) + " tokens, x has "
                + std::to_string(tokens);
        }
    }
    if (in[2].d[2] >= 0 && in[2].d[2] != 1)
    {
        return "size must be [B, N, 1]";
    }
    if (tokens < 0)
    {
        return {};
    }
    if (tokens > kMaxTokens)
    {
        return std::to_string(tokens) + " tokens; at most " + std::to_string(kMaxTokens) + " are supported";
    }
    int64_t const removed = tokens - mFields.outTokens;
    int32_t const limit
        = maxRemovable(mFields.method, static_cast<int32_t>(tokens), mFields.protectedTokens + mFields.causal, mFields.causal != 0);
    if (removed < 0 || removed > limit)
    {
        return mMethodName + " can go from " + std::to_string(tokens) + " tokens to between "
            + std::to_string(tokens - limit) + " and " + std::to_string(tokens) + ", not K = "
            + std::to_string(mFields.outTokens);
    }
    return {};
}

int32_t SimilarityEnergyMergePlugin::getOutputShapes(DimsExprs const* inputs, int32_t nbInputs,
    DimsExprs const* /*shapeInputs*/, int32_t /*nbShapeInputs*/, DimsExprs* outputs, int32_t nbOutputs,
    IExprBuilder& exprBuilder) noexcept
{
    if (nbInputs != mFields.nbInputs() || nbOutputs != mFields.nbOutputs() || inputs[0].nbDims != 3)
    {
        logError("expects " + std::to_string(mFields.nbInputs()) + " inputs (x of rank 3) and "
            + std::to_string(mFields.nbOutputs()) + " outputs");
        return -1;
    }
    IDimensionExpr const* k = exprBuilder.constant(mFields.outTokens);
    outputs[0].nbDims = 3;
    outputs[0].d[0] = inputs[0].d[0];
    outputs[0].d[1] = k;
    outputs[0].d[2] = inputs[0].d[2];
    outputs[1].nbDims = 3;
    outputs[1].d[0] = inputs[0].d[0];
    outputs[1].d[1] = k;
    outputs[1].d[2] = exprBuilder.constant(1);
    outputs[2].nbDims = 2;
    outputs[2].d[0] = inputs[0].d[0];
    outputs[2].d[1] = inputs[0].d[1];
    for (int32_t i = 3; i < nbOutputs; ++i) // merged mask, merged positions: [B, K]
    {
        outputs[i].nbDims = 2;
        outputs[i].d[0] = inputs[0].d[0];
        outputs[i].d[1] = k;
    }
    return 0;
}

bool SimilarityEnergyMergePlugin::supportsFormatCombination(
    int32_t pos, DynamicPluginTensorDesc const* inOut, int32_t nbInputs, int32_t nbOutputs) noexcept
{
    if (nbInputs != mFields.nbInputs() || nbOutputs != mFields.nbOutputs() || pos < 0 || pos >= nbInputs + nbOutputs)
    {
        return false;
    }
    PluginTensorDesc const& desc = inOut[pos].desc;
    if (desc.format != TensorFormat::kLINEAR)
    {
        return false;
    }
    DataType const xType = inOut[0].desc.type;
    int32_t const out = pos - nbInputs;
    if (pos == 0)
    {
        return desc.type == DataType::kFLOAT || desc.type == DataType::kHALF;
    }
    if (pos == 1 || out == 0) // metric and merged x: x's type
    {
        return desc.type == xType;
    }
    if (out == 2) // slots
    {
        return desc.type == DataType::kINT32;
    }
    return desc.type == DataType::kFLOAT; // size, cls_attn, valid, frozen, positions; merged size, mask, positions
}

int32_t SimilarityEnergyMergePlugin::configurePlugin(
    DynamicPluginTensorDesc const* in, int32_t nbInputs, DynamicPluginTensorDesc const* /*out*/, int32_t nbOutputs) noexcept
{
    std::vector<Dims> dims;
    for (int32_t i = 0; i < nbInputs; ++i)
    {
        dims.push_back(in[i].desc.dims);
    }
    std::string const problem = nbOutputs == mFields.nbOutputs()
        ? shapeProblem(dims.data(), nbInputs)
        : "expects " + std::to_string(mFields.nbOutputs()) + " outputs";
    if (!problem.empty())
    {
        logError(problem);
        return -1;
    }
    return 0;
}

size_t SimilarityEnergyMergePlugin::getWorkspaceSize(DynamicPluginTensorDesc const* inputs, int32_t /*nbInputs*/,
    DynamicPluginTensorDesc const* /*outputs*/, int32_t /*nbOutputs*/) const noexcept
{
    return mergeWorkspaceSize(static_cast<int32_t>(inputs[0].max.d[0]), static_cast<int32_t>(inputs[0].max.d[1]),
        static_cast<int32_t>(inputs[1].max.d[2]));
}

int32_t SimilarityEnergyMergePlugin::onShapeChange(
    PluginTensorDesc const* in, int32_t nbInputs, PluginTensorDesc const* /*out*/, int32_t /*nbOutputs*/) noexcept
{
    std::vector<Dims> dims;
    for (int32_t i = 0; i < nbInputs; ++i)
    {
        dims.push_back(in[i].dims);
    }
    std::string const problem = shapeProblem(dims.data(), nbInputs);
    if (!problem.empty())
    {
        logError(problem);
        return -1;
    }
    return 0;
}

int32_t SimilarityEnergyMergePlugin::enqueue(PluginTensorDesc const* inputDesc, PluginTensorDesc const* /*outputDesc*/,
    void const* const* inputs, void* const* outputs, void* workspace, cudaStream_t stream) noexcept
{
    MergeParams params{};
    params.method = mFields.method;
    params.variant = mFields.variant;
    params.batch = static_cast<int32_t>(inputDesc[0].dims.d[0]);
    params.tokens = static_cast<int32_t>(inputDesc[0].dims.d[1]);
    params.outTokens = mFields.outTokens;
    params.channels = static_cast<int32_t>(inputDesc[0].dims.d[2]);
    params.metricDim = static_cast<int32_t>(inputDesc[1].dims.d[2]);
    params.protectedTokens = mFields.protectedTokens;
    params.margin = mFields.margin;
    params.alpha = mFields.alpha;
    params.turboWeight = mFields.turboWeight;
    float const* size = static_cast<float const*>(inputs[2]);
    int32_t next = 3; // the optional inputs follow in their order
    float const* clsAttn = mFields.method == MergeMethod::kTURBO ? static_cast<float const*>(inputs[next++]) : nullptr;
    TextTokens text;
    if (mFields.padded)
    {
        text.valid = static_cast<float const*>(inputs[next++]);
        text.outValid = static_cast<float*>(outputs[3]);
    }
    if (mFields.causal)
    {
        text.frozen = static_cast<float const*>(inputs[next++]);
        text.positions = static_cast<float const*>(inputs[next++]);
        text.outPositions = static_cast<float*>(outputs[4]);
    }
    auto* outSize = static_cast<float*>(outputs[1]);
    auto* slots = static_cast<int32_t*>(outputs[2]);
    cudaError_t status;
    if (inputDesc[0].type == DataType::kHALF)
    {
        status = launchSimilarityEnergyMerge(params, static_cast<__half const*>(inputs[0]),
            static_cast<__half const*>(inputs[1]), size, clsAttn, static_cast<__half*>(outputs[0]), outSize, slots,
            workspace, stream, text);
    }
    else
    {
        status = launchSimilarityEnergyMerge(params, static_cast<float const*>(inputs[0]),
            static_cast<float const*>(inputs[1]), size, clsAttn, static_cast<float*>(outputs[0]), outSize, slots,
            workspace, stream, text);
    }
    if (status != cudaSuccess)
    {
        logError(std::string("launch failed: ") + cudaGetErrorString(status));
        return -1;
    }
    return 0;
}

IPluginV3* SimilarityEnergyMergePlugin::attachToContext(IPluginResourceContext* /*context*/) noexcept
{
    return clone();
}

PluginFieldCollection const* SimilarityEnergyMergePlugin::getFieldsToSerialize() noexcept
{
    mMethodName = nameOf(kMethods, int32_t(mFields.method));
    mVariantName = nameOf(kVariants, int32_t(mFields.variant));
    mSerialized = {
        PluginField("method", mMethodName.c_str(), PluginFieldType::kCHAR, static_cast<int32_t>(mMethodName.size())),
        PluginField("variant", mVariantName.c_str(), PluginFieldType::kCHAR, static_cast<int32_t>(mVariantName.size())),
        PluginField("K", &mFields.outTokens, PluginFieldType::kINT32, 1),
        PluginField("protected", &mFields.protectedTokens, PluginFieldType::kINT32, 1),
        PluginField("margin", &mFields.margin, PluginFieldType::kFLOAT32, 1),
        PluginField("alpha", &mFields.alpha, PluginFieldType::kFLOAT32, 1),
        PluginField("turbo_weight", &mFields.turboWeight, PluginFieldType::kFLOAT32, 1),
        PluginField("padded", &mFields.padded, PluginFieldType::kINT32, 1),
        PluginField("causal", &mFields.causal, PluginFieldType::kINT32, 1),
    };
    mSerializedCollection.nbFields = static_cast<int32_t>(mSerialized.size());
    mSerializedCollection.fields = mSerialized.data();
    return &mSerializedCollection;
}

SimilarityEnergyMergeCreator::SimilarityEnergyMergeCreator()
{
    mFieldNames = {
        PluginField("method", nullptr, PluginFieldType::kCHAR),
        PluginField("variant", nullptr, PluginFieldType::kCHAR),
        PluginField("K", nullptr, PluginFieldType::kINT32, 1),
        PluginField("protected", nullptr, PluginFieldType::kINT32, 1),
        PluginField("margin", nullptr, PluginFieldType::kFLOAT32, 1),
        PluginField("alpha", nullptr, PluginFieldType::kFLOAT32, 1),
        PluginField("turbo_weight", nullptr, PluginFieldType::kFLOAT32, 1),
        PluginField("padded", nullptr, PluginFieldType::kINT32, 1),
        PluginField("causal", nullptr, PluginFieldType::kINT32, 1),
    };
    mFieldCollection.nbFields = static_cast<int32_t>(mFieldNames.size());
    mFieldCollection.fields = mFieldNames.data();
}

char const* SimilarityEnergyMergeCreator::getPluginName() const noexcept
{
    return kPluginName;
}

char const* SimilarityEnergyMergeCreator::getPluginVersion() const noexcept
{
    return kPluginVersion;
}

char const* SimilarityEnergyMergeCreator::getPluginNamespace() const noexcept
{
    return kPluginNamespace;
}

PluginFieldCollection const* SimilarityEnergyMergeCreator::getFieldNames() noexcept
{
    return &mFieldCollection;
}

IPluginV3* SimilarityEnergyMergeCreator::createPlugin(
    char const* name, PluginFieldCollection const* fc, TensorRTPhase /*phase*/) noexcept
{
    try
    {
        MergeFields fields;
        std::string const problem = parseFields(fc, fields);
        if (!problem.empty())
        {
            logError(std::string(name ? name : "") + ": " + problem);
            return nullptr;
        }
        return new SimilarityEnergyMergePlugin(fields);
    }
    catch (std::exception const& e)
    {
        logError(e.what());
        return nullptr;
    }
}

} // namespace tokenfuse
