// The operators libdovetail_rows registers (library.cpp) in the "dovetail" domain, one source file each.
#pragma once

#include <string>
#include <vector>

#include "ort_abi.h"

const OrtCustomOp &matmul_rows_op();        // matmul_rows.cpp: MatMulNBitsRows
const OrtCustomOp &matmul_float_rows_op();  // matmul_float_rows.cpp: MatMulFloatRows
const OrtCustomOp &tree_attention_op();     // tree_attention.cpp: TreeAttention

inline OrtStatus *failure(const std::string &message) { return api_call<CreateStatus>(ORT_FAIL, message.c_str()); }

// A tensor's dimensions, or the status that kept them from being read.
struct Shape {
  std::vector<int64_t> dims;
  OrtStatus *status = nullptr;
};

inline Shape shape_of(const OrtValue *value) {
  Shape shape;
  OrtTensorTypeAndShapeInfo *info = nullptr;
  if ((shape.status = api_call<GetTensorTypeAndShape>(value, &info))) return shape;
  size_t rank = 0;
  shape.status = api_call<GetDimensionsCount>(info, &rank);
  shape.dims.resize(rank);
  if (!shape.status) shape.status = api_call<GetDimensions>(info, shape.dims.data(), rank);
  api_call<ReleaseTensorTypeAndShapeInfo>(info);
  return shape;
}

// A tensor's data (ORT's getter fails only for a value that is no tensor, which the schema rules out).
template <typename T>
T *data_of(const OrtValue *value) {
  void *data = nullptr;
  api_call<GetTensorMutableData>(const_cast<OrtValue *>(value), &data);
  return static_cast<T *>(data);
}

// What every operator here shares: the CPU execution provider, Outputs fp32 outputs (all required), default memory,
// and a kernel object that Create makes, Compute runs and ORT deletes. Each operator sets its name and inputs.
template <typename Kernel, size_t Outputs, OrtStatus *(*Create)(const OrtKernelInfo *, Kernel *&),
          OrtStatus *(*Compute)(const Kernel &, OrtKernelContext *)>
OrtCustomOp cpu_op() {
  OrtCustomOp op{};
  op.version = kOrtApiVersion;
  op.GetExecutionProviderType = [](const OrtCustomOp *) -> const char * { return nullptr; };
  op.GetOutputTypeCount = [](const OrtCustomOp *) -> size_t { return Outputs; };
  op.GetOutputType = [](const OrtCustomOp *, size_t) -> int { return ELEMENT_FLOAT; };
  op.GetOutputCharacteristic = [](const OrtCustomOp *, size_t) -> int { return INPUT_OUTPUT_REQUIRED; };
  op.GetInputMemoryType = [](const OrtCustomOp *, size_t) -> int { return MEM_TYPE_DEFAULT; };
  op.CreateKernelV2 = [](const OrtCustomOp *, const void *, const OrtKernelInfo *info, void **out) -> OrtStatus * {
    Kernel *kernel = nullptr;
    OrtStatus *status = Create(info, kernel);
    *out = kernel;
    return status;
  };
  op.KernelComputeV2 = [](void *kernel, OrtKernelContext *context) {
    return Compute(*static_cast<const Kernel *>(kernel), context);
  };
  op.KernelDestroy = [](void *kernel) { delete static_cast<Kernel *>(kernel); };
  return op;
}
