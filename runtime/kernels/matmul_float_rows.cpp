// dovetail.MatMulFloatRows: MatMul by a constant fp32 matrix B [K, N], every output row computed the same way
// however many rows a call runs, the weights streamed once for up to 8 rows.
//
// Why: one fp32 forward streams every weight once; ORT's MatMul (MLAS, its own packed copy in 4 KiB pages) did it at
// about 26 GB/s here. B is repacked into 16-column tiles, each tile's K rows contiguous, in huge pages
// (arena.h) and prefetched ahead: SmolLM2's 151 matrices, 2 threads, 12.3 ms a row against 16.9 in 4 KiB pages.
// A row's sums run over k in order in one FMA chain per 16 columns, so a tree row equals its row run alone.
// AVX-512 where the CPU has it (8 rows a tile), else AVX2 (3 rows, its 16 registers).
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>

#include "arena.h"
#include "ops.h"

namespace {

constexpr int64_t kTile = 16, kTilesPerTask = 4;
// Sums run in spans of 64 k, then across spans: rounding error grows with a chain's length, and one chain over
// K = 1536 strayed 1.2e-3 in a logit from ORT's MatMul where the export's check allows 1e-3 against PyTorch.
constexpr int64_t kSpan = 64;
constexpr int kPrefetchBytes = 1024;  // 1 KiB ahead: 1 row 12.3 ms, against 16.9 at 4 KiB and 16.1 without

#define AVX512 __attribute__((target("avx512f")))
#define AVX2 __attribute__((target("avx2,fma")))

struct Kernel {
  int64_t K = 0, N = 0;
  bool wide = true;     // AVX-512, else AVX2
  Store<float> packed;  // [N / 16][K][16]
};

struct Call {
  const Kernel *kernel;
  int64_t M;
  const float *a;  // [M][K]
  float *out;      // [M][N]
};

template <int R>
AVX512 void tile_rows(const Call &call, int64_t tile, int64_t m0) {
  const Kernel &k = *call.kernel;
  const float *w = k.packed.data() + tile * k.K * kTile, *a = call.a + m0 * k.K;
  __m512 y[R];
  for (int r = 0; r < R; r++) y[r] = _mm512_setzero_ps();
  for (int64_t i0 = 0; i0 < k.K; i0 += kSpan) {
    __m512 part[R];
    for (int r = 0; r < R; r++) part[r] = _mm512_setzero_ps();
    for (int64_t i = i0; i < std::min(k.K, i0 + kSpan); i++, w += kTile) {
      _mm_prefetch(reinterpret_cast<const char *>(w) + kPrefetchBytes, _MM_HINT_T0);
      const __m512 v = _mm512_loadu_ps(w);
      for (int r = 0; r < R; r++) part[r] = _mm512_fmadd_ps(_mm512_set1_ps(a[r * k.K + i]), v, part[r]);
    }
    for (int r = 0; r < R; r++) y[r] = _mm512_add_ps(y[r], part[r]);
  }
  for (int r = 0; r < R; r++) _mm512_storeu_ps(call.out + (m0 + r) * k.N + tile * kTile, y[r]);
}

template <int R>
AVX2 void tile_rows_avx2(const Call &call, int64_t tile, int64_t m0) {
  const Kernel &k = *call.kernel;
  const float *w = k.packed.data() + tile * k.K * kTile, *a = call.a + m0 * k.K;
  __m256 y[R][2];
  for (int r = 0; r < R; r++) y[r][0] = y[r][1] = _mm256_setzero_ps();
  for (int64_t i0 = 0; i0 < k.K; i0 += kSpan) {
    __m256 part[R][2];
    for (int r = 0; r < R; r++) part[r][0] = part[r][1] = _mm256_setzero_ps();
    for (int64_t i = i0; i < std::min(k.K, i0 + kSpan); i++, w += kTile) {
      _mm_prefetch(reinterpret_cast<const char *>(w) + kPrefetchBytes, _MM_HINT_T0);
      const __m256 low = _mm256_loadu_ps(w), high = _mm256_loadu_ps(w + 8);
      for (int r = 0; r < R; r++) {
        const __m256 x = _mm256_set1_ps(a[r * k.K + i]);
        part[r][0] = _mm256_fmadd_ps(x, low, part[r][0]);
        part[r][1] = _mm256_fmadd_ps(x, high, part[r][1]);
      }
    }
    for (int r = 0; r < R; r++)
      for (int h = 0; h < 2; h++) y[r][h] = _mm256_add_ps(y[r][h], part[r][h]);
  }
  for (int r = 0; r < R; r++) {
    _mm256_storeu_ps(call.out + (m0 + r) * k.N + tile * kTile, y[r][0]);
    _mm256_storeu_ps(call.out + (m0 + r) * k.N + tile * kTile + 8, y[r][1]);
  }
}

void tiles(void *data, size_t task) {
  const Call &call = *static_cast<const Call *>(data);
  const Kernel &k = *call.kernel;
  const int64_t first = static_cast<int64_t>(task) * kTilesPerTask, last = std::min(k.N / kTile, first + kTilesPerTask);
  for (int64_t t = first; t < last; t++) {
    if (k.wide) {
      for (int64_t m0 = 0; m0 < call.M; m0 += 8) {
        switch (std::min<int64_t>(8, call.M - m0)) {
          case 1: tile_rows<1>(call, t, m0); break;
          case 2: tile_rows<2>(call, t, m0); break;
          case 3: tile_rows<3>(call, t, m0); break;
          case 4: tile_rows<4>(call, t, m0); break;
          case 5: tile_rows<5>(call, t, m0); break;
          case 6: tile_rows<6>(call, t, m0); break;
          case 7: tile_rows<7>(call, t, m0); break;
          default: tile_rows<8>(call, t, m0); break;
        }
      }
    } else {
      for (int64_t m0 = 0; m0 < call.M; m0 += 3) {
        switch (std::min<int64_t>(3, call.M - m0)) {
          case 1: tile_rows_avx2<1>(call, t, m0); break;
          case 2: tile_rows_avx2<2>(call, t, m0); break;
          default: tile_rows_avx2<3>(call, t, m0); break;
        }
      }
    }
  }
}

OrtStatus *create(const OrtKernelInfo *info, Kernel *&out) {
  int constant = 0;
  const OrtValue *value = nullptr;
  if (OrtStatus *status = api_call<KernelInfoGetConstantInput_tensor>(info, 1, &constant, &value)) return status;
  if (!constant || !value) return failure("MatMulFloatRows needs its weights as an initializer");
  Shape shape = shape_of(value);
  if (shape.status) return shape.status;
  if (shape.dims.size() != 2 || shape.dims[1] % kTile) return failure("MatMulFloatRows takes B [K, N], N in 16s");
  auto kernel = std::make_unique<Kernel>();
  kernel->K = shape.dims[0];
  kernel->N = shape.dims[1];
  const char *isa = std::getenv("DOVETAIL_KERNEL_ISA");
  kernel->wide = !(isa && std::string(isa) == "avx2") && __builtin_cpu_supports("avx512f");
  const float *b = data_of<float>(value);
  kernel->packed.resize(static_cast<size_t>(kernel->K * kernel->N));
  float *to = kernel->packed.data();
  for (int64_t t = 0; t < kernel->N / kTile; t++)
    for (int64_t i = 0; i < kernel->K; i++, to += kTile)
      std::memcpy(to, b + i * kernel->N + t * kTile, kTile * sizeof(float));
  out = kernel.release();
  return nullptr;
}

OrtStatus *compute(const Kernel &kernel, OrtKernelContext *context) {
  const OrtValue *input = nullptr;
  if (OrtStatus *status = api_call<KernelContext_GetInput>(context, 0, &input)) return status;
  Shape shape = shape_of(input);
  if (shape.status) return shape.status;
  if (shape.dims.empty() || shape.dims.back() != kernel.K) return failure("MatMulFloatRows: input's last axis is not K");
  int64_t rows = 1;
  for (size_t i = 0; i + 1 < shape.dims.size(); i++) rows *= shape.dims[i];
  shape.dims.back() = kernel.N;
  OrtValue *output = nullptr;
  if (OrtStatus *status = api_call<KernelContext_GetOutput>(context, 0, shape.dims.data(), shape.dims.size(), &output))
    return status;
  if (rows == 0) return nullptr;
  Call call{&kernel, rows, data_of<float>(input), data_of<float>(output)};
  const size_t tasks = static_cast<size_t>((kernel.N / kTile + kTilesPerTask - 1) / kTilesPerTask);
  return api_call<KernelContext_ParallelFor>(context, tiles, tasks, 0, &call);
}

OrtCustomOp make_op() {
  OrtCustomOp op = cpu_op<Kernel, 1, create, compute>();
  op.GetName = [](const OrtCustomOp *) { return "MatMulFloatRows"; };
  op.GetInputTypeCount = [](const OrtCustomOp *) -> size_t { return 2; };
  op.GetInputType = [](const OrtCustomOp *, size_t) -> int { return ELEMENT_FLOAT; };
  op.GetInputCharacteristic = [](const OrtCustomOp *, size_t) -> int { return INPUT_OUTPUT_REQUIRED; };
  return op;
}

const OrtCustomOp float_rows_op = make_op();

}  // namespace

const OrtCustomOp &matmul_float_rows_op() { return float_rows_op; }
