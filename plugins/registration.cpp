/*
 * The library's entry points for dynamic loading: IPluginRegistry::loadLibrary,
 * `trtexec --dynamicPlugins=...` and Python's `get_plugin_registry().load_library(...)`.
 */
#include "similarityEnergyMergePlugin/similarityEnergyMergePlugin.h"

using namespace nvinfer1;

extern "C"
{

//! Every creator of the library (IPluginV3 creators).
__attribute__((visibility("default"))) IPluginCreatorInterface* const* getCreators(int32_t& nbCreators)
{
    static tokenfuse::SimilarityEnergyMergeCreator similarityEnergyMerge;
    static IPluginCreatorInterface* const creators[] = {&similarityEnergyMerge};
    nbCreators = static_cast<int32_t>(sizeof(creators) / sizeof(creators[0]));
    return creators;
}

//! TensorRT hands the library its logger before it asks for the creators.
__attribute__((visibility("default"))) void setLoggerFinder(ILoggerFinder* finder)
{
    tokenfuse::setLogger(finder != nullptr ? finder->findLogger() : nullptr);
}

} // extern "C"
