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
