// The few pieces of ONNX Runtime's C ABI that a custom-operator library needs, declared here so that the kernel
// builds with a bare C++ compiler: the onnxruntime wheel ships no headers.
//
// OrtApi is a table of function pointers that ORT only ever appends to (its stated ABI promise), so each entry's
// position is fixed for good. Positions below were counted in onnxruntime_c_api.h (API version 29); every entry
// used exists since API version 17 (ORT 1.17), the version this library asks for.
#pragma once

#include <cstddef>
#include <cstdint>

struct OrtStatus;
struct OrtKernelInfo;
struct OrtKernelContext;
struct OrtValue;
struct OrtTensorTypeAndShapeInfo;
struct OrtSessionOptions;
struct OrtCustomOpDomain;
struct OrtShapeInferContext;

constexpr uint32_t kOrtApiVersion = 17;

enum OrtErrorCode { ORT_OK = 0, ORT_FAIL = 1 };
enum ElementType { ELEMENT_FLOAT = 1, ELEMENT_UINT8 = 2, ELEMENT_INT32 = 6, ELEMENT_INT64 = 7 };  // ONNXTensorElementDataType
enum Characteristic { INPUT_OUTPUT_REQUIRED = 0, INPUT_OUTPUT_OPTIONAL = 1 };  // OrtCustomOpInputOutputCharacteristic
enum MemType { MEM_TYPE_DEFAULT = 0 };                      // OrtMemType

struct OrtApiBase {
  const void *(*GetApi)(uint32_t version);
  const char *(*GetVersionString)();
};

// An OrtApi entry: its position in the table and its signature.
#define ORT_ENTRY(name, position, ...)                         \
  struct name {                                                \
    static constexpr int index = position;                     \
    using type = __VA_ARGS__;                                  \
  }
ORT_ENTRY(CreateStatus, 0, OrtStatus *(*)(int code, const char *message));
ORT_ENTRY(CreateCustomOpDomain, 26, OrtStatus *(*)(const char *domain, OrtCustomOpDomain **out));
ORT_ENTRY(CustomOpDomain_Add, 27, OrtStatus *(*)(OrtCustomOpDomain *domain, const struct OrtCustomOp *op));
ORT_ENTRY(AddCustomOpDomain, 28, OrtStatus *(*)(OrtSessionOptions *options, OrtCustomOpDomain *domain));
ORT_ENTRY(GetTensorMutableData, 51, OrtStatus *(*)(OrtValue *value, void **out));
ORT_ENTRY(GetDimensionsCount, 61, OrtStatus *(*)(const OrtTensorTypeAndShapeInfo *info, size_t *out));
ORT_ENTRY(GetDimensions, 62, OrtStatus *(*)(const OrtTensorTypeAndShapeInfo *info, int64_t *dims, size_t count));
ORT_ENTRY(GetTensorTypeAndShape, 65, OrtStatus *(*)(const OrtValue *value, OrtTensorTypeAndShapeInfo **out));
ORT_ENTRY(KernelInfoGetAttribute_float, 85, OrtStatus *(*)(const OrtKernelInfo *info, const char *name, float *out));
ORT_ENTRY(KernelInfoGetAttribute_int64, 86, OrtStatus *(*)(const OrtKernelInfo *info, const char *name, int64_t *out));
ORT_ENTRY(KernelContext_GetInput, 90, OrtStatus *(*)(const OrtKernelContext *context, size_t index, const OrtValue **out));
ORT_ENTRY(KernelContext_GetOutput, 91, OrtStatus *(*)(OrtKernelContext *context, size_t index, const int64_t *dims,
                                                      size_t count, OrtValue **out));
ORT_ENTRY(ReleaseTensorTypeAndShapeInfo, 99, void (*)(OrtTensorTypeAndShapeInfo *info));
ORT_ENTRY(KernelInfoGetConstantInput_tensor, 249, OrtStatus *(*)(const OrtKernelInfo *info, size_t index,
                                                                 int *is_constant, const OrtValue **out));
ORT_ENTRY(KernelContext_ParallelFor, 274, OrtStatus *(*)(const OrtKernelContext *context, void (*fn)(void *, size_t),
                                                         size_t total, size_t batches, void *data));
#undef ORT_ENTRY

// The table RegisterCustomOps was given; set once, before any kernel runs.
inline const void *const *ort_api_table = nullptr;

template <typename Entry, typename... Args>
auto api_call(Args... args) {
  return reinterpret_cast<typename Entry::type>(ort_api_table[Entry::index])(args...);
}

// An operator's schema and callbacks, as ORT reads them (struct OrtCustomOp). ORT reads a member only when
// `version` is at least the version that added it; members this library does not use stay null.
struct OrtCustomOp {
  uint32_t version;
  void *(*CreateKernel)(const OrtCustomOp *, const void *api, const OrtKernelInfo *);
  const char *(*GetName)(const OrtCustomOp *);
  const char *(*GetExecutionProviderType)(const OrtCustomOp *);
  int (*GetInputType)(const OrtCustomOp *, size_t index);
  size_t (*GetInputTypeCount)(const OrtCustomOp *);
  int (*GetOutputType)(const OrtCustomOp *, size_t index);
  size_t (*GetOutputTypeCount)(const OrtCustomOp *);
  void (*KernelCompute)(void *kernel, OrtKernelContext *);
  void (*KernelDestroy)(void *kernel);
  int (*GetInputCharacteristic)(const OrtCustomOp *, size_t index);
  int (*GetOutputCharacteristic)(const OrtCustomOp *, size_t index);
  int (*GetInputMemoryType)(const OrtCustomOp *, size_t index);
  int (*GetVariadicInputMinArity)(const OrtCustomOp *);
  int (*GetVariadicInputHomogeneity)(const OrtCustomOp *);
  int (*GetVariadicOutputMinArity)(const OrtCustomOp *);
  int (*GetVariadicOutputHomogeneity)(const OrtCustomOp *);
  OrtStatus *(*CreateKernelV2)(const OrtCustomOp *, const void *api, const OrtKernelInfo *, void **kernel);
  OrtStatus *(*KernelComputeV2)(void *kernel, OrtKernelContext *);
  OrtStatus *(*InferOutputShapeFn)(const OrtCustomOp *, OrtShapeInferContext *);
  int (*GetStartVersion)(const OrtCustomOp *);
  int (*GetEndVersion)(const OrtCustomOp *);
  size_t (*GetMayInplace)(int **input_index, int **output_index);
  void (*ReleaseMayInplace)(int *input_index, int *output_index);
  size_t (*GetAliasMap)(int **input_index, int **output_index);
  void (*ReleaseAliasMap)(int *input_index, int *output_index);
};
