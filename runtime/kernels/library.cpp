// The library's entry point: ORT calls RegisterCustomOps when a session registers the library.
#include "ops.h"

extern "C" __attribute__((visibility("default"))) OrtStatus *RegisterCustomOps(OrtSessionOptions *options,
                                                                              const OrtApiBase *base) {
  ort_api_table = static_cast<const void *const *>(base->GetApi(kOrtApiVersion));
  if (!ort_api_table) return nullptr;  // an ORT older than 1.17 cannot even report it (the package pins 1.31)
  if (!__builtin_cpu_supports("avx2") || !__builtin_cpu_supports("fma") || !__builtin_cpu_supports("f16c"))
    return failure("dovetail's kernels need AVX2, FMA and F16C");
  OrtCustomOpDomain *domain = nullptr;
  if (OrtStatus *status = api_call<CreateCustomOpDomain>("dovetail", &domain)) return status;
  for (const OrtCustomOp *op : {&matmul_rows_op(), &matmul_float_rows_op(), &tree_attention_op()})
    if (OrtStatus *status = api_call<CustomOpDomain_Add>(domain, op)) return status;
  return api_call<AddCustomOpDomain>(options, domain);
}
