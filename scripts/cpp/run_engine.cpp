// Load the tokenfuse plugin library (if given) and a TensorRT engine, run one batch of zeros,
// and print each output's shape and first values. TensorRT is opened at run time:
//   run_engine vit.engine [--plugins libtokenfuse_plugins.so] [--batch 8] [--length 40] [--tensorrt libnvinfer.so.10]
// A length-adaptive text export builds into one engine per length bucket (NAME.engine.json lists
// them): run a text of L tokens with the bucket whose "lengths" ranges hold L, padded to its seq_len;
// the natural-length engine (NAME.natural.engine) takes --length L itself (its dynamic token axis).
#include <NvInferRuntime.h>
#include <cuda_runtime_api.h>
#include <dlfcn.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iterator>
#include <memory>
#include <string>
#include <vector>

namespace {

class Logger : public nvinfer1::ILogger {
  void log(Severity severity, char const* message) noexcept override {
    if (severity <= Severity::kWARNING) std::fprintf(stderr, "[tensorrt] %s\n", message);
  }
};

[[noreturn]] void fail(std::string const& message) {
  std::fprintf(stderr, "run_engine: error: %s\n", message.c_str());
  std::exit(2);
}

void check(cudaError_t status, char const* what) {
  if (status != cudaSuccess) fail(std::string(what) + ": " + cudaGetErrorString(status));
}

size_t elementSize(nvinfer1::DataType type) {
  switch (type) {
    case nvinfer1::DataType::kFLOAT: return 4;
    case nvinfer1::DataType::kHALF: return 2;
    case nvinfer1::DataType::kINT32: return 4;
    case nvinfer1::DataType::kINT64: return 8;
    case nvinfer1::DataType::kBOOL: return 1;
    default: fail("unsupported binding data type");
  }
}

struct Options {
  std::string engine, plugins, tensorrt = "libnvinfer.so.10";
  int batch = 1;
  int length = 0;  // for a dynamic token axis
};

Options parse(int argc, char** argv) {
  Options options;
  for (int i = 1; i < argc; ++i) {
    std::string arg = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) fail(arg + " needs a value");
      return argv[++i];
    };
    if (arg == "--plugins") options.plugins = value();
    else if (arg == "--batch") options.batch = std::atoi(value().c_str());
    else if (arg == "--length") options.length = std::atoi(value().c_str());
    else if (arg == "--tensorrt") options.tensorrt = value();
    else if (options.engine.empty()) options.engine = arg;
    else fail("unexpected argument " + arg);
  }
  if (options.engine.empty()) fail("usage: run_engine ENGINE [--plugins LIB] [--batch N] [--length L] [--tensorrt LIBNVINFER]");
  if (options.batch < 1) fail("--batch must be >= 1");
  if (options.length < 0) fail("--length must be >= 1");
  return options;
}

}  // namespace

int main(int argc, char** argv) {
  Options options = parse(argc, argv);
  void* library = dlopen(options.tensorrt.c_str(), RTLD_NOW | RTLD_GLOBAL);
  if (!library) fail("cannot open " + options.tensorrt + " (" + dlerror() + "); pass --tensorrt PATH");
  using CreateRuntime = void* (*)(void*, int32_t);
  auto create = reinterpret_cast<CreateRuntime>(dlsym(library, "createInferRuntime_INTERNAL"));
  if (!create) fail(options.tensorrt + " has no createInferRuntime_INTERNAL; is it TensorRT?");

  Logger logger;
  std::unique_ptr<nvinfer1::IRuntime> runtime(static_cast<nvinfer1::IRuntime*>(create(&logger, NV_TENSORRT_VERSION)));
  if (!runtime) fail("TensorRT refused to create a runtime (version mismatch with the headers?)");
  if (!options.plugins.empty() && !runtime->getPluginRegistry().loadLibrary(options.plugins.c_str()))
    fail("cannot load the plugin library " + options.plugins);

  std::ifstream file(options.engine, std::ios::binary);
  if (!file) fail("cannot read " + options.engine);
  std::vector<char> blob((std::istreambuf_iterator<char>(file)), std::istreambuf_iterator<char>());
  std::unique_ptr<nvinfer1::ICudaEngine> engine(runtime->deserializeCudaEngine(blob.data(), blob.size()));
  if (!engine) fail(options.engine + ": not an engine for this TensorRT and GPU; rebuild it with tokenfuse build");
  std::unique_ptr<nvinfer1::IExecutionContext> context(engine->createExecutionContext());

  cudaStream_t stream;
  check(cudaStreamCreate(&stream), "cudaStreamCreate");
  std::vector<void*> buffers;
  for (int i = 0; i < engine->getNbIOTensors(); ++i) {
    char const* name = engine->getIOTensorName(i);
    if (engine->getTensorIOMode(name) != nvinfer1::TensorIOMode::kINPUT) continue;
    nvinfer1::Dims dims = engine->getTensorShape(name);
    dims.d[0] = options.batch;
    for (int d = 1; d < dims.nbDims; ++d) {
      if (dims.d[d] != -1) continue;
      if (options.length < 1) fail(std::string("input ") + name + " has a dynamic token axis; pass --length L");
      dims.d[d] = options.length;
    }
    if (!context->setInputShape(name, dims)) fail(std::string("batch or length outside the engine's profile for ") + name);
  }
  for (int i = 0; i < engine->getNbIOTensors(); ++i) {
    char const* name = engine->getIOTensorName(i);
    nvinfer1::Dims dims = context->getTensorShape(name);
    size_t count = 1;
    for (int d = 0; d < dims.nbDims; ++d) count *= static_cast<size_t>(dims.d[d]);
    void* buffer = nullptr;
    size_t bytes = count * elementSize(engine->getTensorDataType(name));
    check(cudaMalloc(&buffer, bytes), "cudaMalloc");
    check(cudaMemsetAsync(buffer, 0, bytes, stream), "cudaMemset");
    context->setTensorAddress(name, buffer);
    buffers.push_back(buffer);
  }
  if (!context->enqueueV3(stream)) fail("enqueueV3 failed");
  check(cudaStreamSynchronize(stream), "cudaStreamSynchronize");

  int index = 0;
  for (int i = 0; i < engine->getNbIOTensors(); ++i) {
    char const* name = engine->getIOTensorName(i);
    void* buffer = buffers[index++];
    if (engine->getTensorIOMode(name) != nvinfer1::TensorIOMode::kOUTPUT) continue;
    nvinfer1::Dims dims = context->getTensorShape(name);
    std::printf("%s [", name);
    for (int d = 0; d < dims.nbDims; ++d) std::printf(d ? ", %lld" : "%lld", static_cast<long long>(dims.d[d]));
    std::printf("]");
    if (engine->getTensorDataType(name) == nvinfer1::DataType::kFLOAT) {
      float first[4] = {};
      check(cudaMemcpy(first, buffer, sizeof(first), cudaMemcpyDeviceToHost), "cudaMemcpy");
      std::printf(" first values %g %g %g %g", first[0], first[1], first[2], first[3]);
    }
    std::printf("\n");
  }
  for (void* buffer : buffers) cudaFree(buffer);
  cudaStreamDestroy(stream);
  return 0;
}
