/*
 * SimilarityEnergyMerge: one token-merging step (match + size-weighted merge) as a TensorRT
 * IPluginV3 plugin. Semantics: tokenfuse.exporter.methods (see this folder's README).
 */
#pragma once

#include "similarityEnergyMergeKernels.h"

#include <NvInferRuntime.h>

#include <string>
#include <vector>

namespace tokenfuse
{

//! The plugin's attributes, as ONNX node attributes and TensorRT plugin fields.
struct MergeFields
{
    MergeMethod method{MergeMethod::kPITOME};
    PitomeVariant variant{PitomeVariant::kPLAIN};
    int32_t outTokens{0}; // K
    int32_t protectedTokens{1};
    float margin{0.9f};
    float alpha{1.f};
    float turboWeight{30.f};
    int32_t padded{0}; // 1: a padding mask comes in and the merged mask goes out (text encoders)
    int32_t causal{0}; // 1: the frozen token and causal positions come in, merged positions go out (CLIP text)

    //! x, metric, size, [cls_attn (turbo)], [valid (padded)], [frozen, positions (causal)]
    int32_t nbInputs() const
    {
        return 3 + (method == MergeMethod::kTURBO ? 1 : 0) + padded + 2 * causal;
    }
    //! merged x, merged size, slots, [merged valid (padded)], [merged positions (causal)]
    int32_t nbOutputs() const
    {
        return 3 + padded + causal;
    }
};

class SimilarityEnergyMergePlugin : public nvinfer1::IPluginV3,
                                    public nvinfer1::IPluginV3OneCore,
                                    public nvinfer1::IPluginV3OneBuild,
                                    public nvinfer1::IPluginV3OneRuntime
{
public:
    explicit SimilarityEnergyMergePlugin(MergeFields const& fields);

    // IPluginV3
    nvinfer1::IPluginCapability* getCapabilityInterface(nvinfer1::PluginCapabilityType type) noexcept override;
    nvinfer1::IPluginV3* clone() noexcept override;

    // IPluginV3OneCore
    char const* getPluginName() const noexcept override;
    char const* getPluginVersion() const noexcept override;
    char const* getPluginNamespace() const noexcept override;

    // IPluginV3OneBuild
    int32_t getNbOutputs() const noexcept override;
    int32_t getOutputDataTypes(nvinfer1::DataType* outputTypes, int32_t nbOutputs,
        nvinfer1::DataType const* inputTypes, int32_t nbInputs) const noexcept override;
    int32_t getOutputShapes(nvinfer1::DimsExprs const* inputs, int32_t nbInputs, nvinfer1::DimsExprs const* shapeInputs,
        int32_t nbShapeInputs, nvinfer1::DimsExprs* outputs, int32_t nbOutputs,
        nvinfer1::IExprBuilder& exprBuilder) noexcept override;
    bool supportsFormatCombination(int32_t pos, nvinfer1::DynamicPluginTensorDesc const* inOut, int32_t nbInputs,
        int32_t nbOutputs) noexcept override;
    int32_t configurePlugin(nvinfer1::DynamicPluginTensorDesc const* in, int32_t nbInputs,
        nvinfer1::DynamicPluginTensorDesc const* out, int32_t nbOutputs) noexcept override;
    size_t getWorkspaceSize(nvinfer1::DynamicPluginTensorDesc const* inputs, int32_t nbInputs,
        nvinfer1::DynamicPluginTensorDesc const* outputs, int32_t nbOutputs) const noexcept override;

    // IPluginV3OneRuntime
    int32_t onShapeChange(nvinfer1::PluginTensorDesc const* in, int32_t nbInputs, nvinfer1::PluginTensorDesc const* out,
        int32_t nbOutputs) noexcept override;
    int32_t enqueue(nvinfer1::PluginTensorDesc const* inputDesc, nvinfer1::PluginTensorDesc const* outputDesc,
        void const* const* inputs, void* const* outputs, void* workspace, cudaStream_t stream) noexcept override;
    nvinfer1::IPluginV3* attachToContext(nvinfer1::IPluginResourceContext* context) noexcept override;
    nvinfer1::PluginFieldCollection const* getFieldsToSerialize() noexcept override;

private:
    //! Checks shapes that are known (not -1): why they do not fit, or empty.
    std::string shapeProblem(nvinfer1::Dims const* inputs, int32_t nbInputs) const;

    MergeFields mFields;
    std::string mMethodName;
    std::string mVariantName;
    std::vector<nvinfer1::PluginField> mSerialized;
    nvinfer1::PluginFieldCollection mSerializedCollection{};
};

class SimilarityEnergyMergeCreator : public nvinfer1::IPluginCreatorV3One
{
public:
    SimilarityEnergyMergeCreator();

    char const* getPluginName() const noexcept override;
    char const* getPluginVersion() const noexcept override;
    char const* getPluginNamespace() const noexcept override;
    nvinfer1::PluginFieldCollection const* getFieldNames() noexcept override;
    nvinfer1::IPluginV3* createPlugin(
        char const* name, nvinfer1::PluginFieldCollection const* fc, nvinfer1::TensorRTPhase phase) noexcept override;

private:
    std::vector<nvinfer1::PluginField> mFieldNames;
    nvinfer1::PluginFieldCollection mFieldCollection{};
};

//! Reports through the logger TensorRT hands the library (setLoggerFinder), else stderr.
void logError(std::string const& message);
void setLogger(nvinfer1::ILogger* logger);

} // namespace tokenfuse
