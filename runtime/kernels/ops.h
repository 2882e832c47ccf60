// The operators libdovetail_rows registers (library.cpp) in the "dovetail" domain, one source file each.
#pragma once

#include <string>

#include "ort_abi.h"

const OrtCustomOp &matmul_rows_op();     // matmul_rows.cpp: MatMulNBitsRows
const OrtCustomOp &tree_attention_op();  // tree_attention.cpp: TreeAttention

inline OrtStatus *failure(const std::string &message) { return api_call<CreateStatus>(ORT_FAIL, message.c_str()); }
