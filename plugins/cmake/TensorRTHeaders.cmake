# Sets TENSORRT_INCLUDE_DIR for the tokenfuse C++ projects (the plugin library, scripts/cpp).
# Search order: the user's TensorRT (TENSORRT_ROOT, as a CMake variable or in the environment),
# the system, JetPack, then the TensorRT 10.14 headers of the PyPI package kernel-lens:
# KERNEL_LENS_INCLUDE_DIR when the caller defines it (even empty: the caller already looked),
# else found through the Python interpreter CMake finds.
set(TENSORRT_ROOT "$ENV{TENSORRT_ROOT}" CACHE PATH "TensorRT install prefix")
find_path(TENSORRT_INCLUDE_DIR NvInferRuntime.h
  HINTS ${TENSORRT_ROOT}
  PATH_SUFFIXES include
  PATHS /usr/include/x86_64-linux-gnu /usr/include/aarch64-linux-gnu /usr/local/tensorrt/include
        /usr/src/tensorrt/include /usr/include
  NO_CMAKE_FIND_ROOT_PATH)
if(NOT TENSORRT_INCLUDE_DIR AND NOT DEFINED KERNEL_LENS_INCLUDE_DIR)
  find_package(Python3 COMPONENTS Interpreter)
  if(Python3_FOUND)
    execute_process(
      COMMAND ${Python3_EXECUTABLE} -c "import importlib.util, pathlib; s = importlib.util.find_spec('kernel_lens'); print(pathlib.Path(s.submodule_search_locations[0]) / 'include' / 'tensorrt')"
      OUTPUT_VARIABLE KERNEL_LENS_INCLUDE_DIR OUTPUT_STRIP_TRAILING_WHITESPACE ERROR_QUIET)
  endif()
endif()
if(NOT TENSORRT_INCLUDE_DIR AND KERNEL_LENS_INCLUDE_DIR)
  find_path(TENSORRT_INCLUDE_DIR NvInferRuntime.h PATHS ${KERNEL_LENS_INCLUDE_DIR} NO_DEFAULT_PATH)
endif()
if(NOT TENSORRT_INCLUDE_DIR)
  message(FATAL_ERROR "TensorRT headers (NvInferRuntime.h) not found: set TENSORRT_ROOT to your TensorRT "
                      "install, or pip install --no-deps kernel-lens")
endif()
message(STATUS "TensorRT headers: ${TENSORRT_INCLUDE_DIR}")
