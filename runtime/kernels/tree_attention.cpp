// dovetail.TreeAttention: GroupQueryAttention's contract as the builder's graphs use it (packed Q/K/V, rotary
// embedding at explicit positions, an additive bias over past + new keys, new K/V rows written in place after the
// past) computed so that a query row's result depends on its own query and the keys it sees, nothing else.
//
// Why: ORT's GroupQueryAttention computes a lone query row by another path than several (quantized graphs padded it
// to two rows), and a tree row that skips other branches' keys sums in another order than sequential decoding (so
// quantized targets verified chains only). Here every score is one fixed sequence of FMAs over the head dimension
// and the softmax and value sums run over keys in order, where a masked key adds nothing: a tree row equals its
// token decoded alone, bit for bit. At long context it also reads each K/V row once per query head and row instead
// of GroupQueryAttention's slower path (SmolLM2 at 2,000 tokens: 9 ms of a 1-row forward, 18 ms padded to 2 rows).
// AVX2 and FMA, which every CPU running the row kernel has.
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <utility>
#include <vector>

#include "ops.h"

namespace {

#define AVX2 __attribute__((target("avx2,fma")))

constexpr int64_t kRowsPerTask = 4;     // query rows of one head that share each block of keys
constexpr int64_t kKeysPerBlock = 64;   // 16 KiB of K at 64 dims: stays in L1 while the task's rows pass over it
constexpr float kNoWeight = -87.f;   // exp below this is taken as 0, so a masked key (bias -3.4e38) adds nothing
enum Input { QKV, KEY, VALUE, PAST_KEY, PAST_VALUE, SEQLENS, TOTAL, COS, SIN, POSITIONS, BIAS, SINK, INPUTS };

struct Attention {
  int64_t heads = 0, kv_heads = 0;
  float scale = 0;
  bool rotary = true;
};

// One call: the rotated queries, and K/V (past and new rows) in the present buffers [kv_heads][capacity][dim].
struct Call {
  const Attention *op;
  int64_t rows, past, capacity, dim, total;
  const float *queries;        // [rows][heads][dim], rotated
  const float *bias;           // [attention rows][total]; row i's at bias + i * total
  float *keys, *values;
  float *out;                  // [rows][heads][dim]
};

// Scores of one query row against keys [k0, k1) over one slice of its dims (C 8-float chunks, at most 64): the
// query's slice stays in registers while the keys stream past (a block of them stays in L1 for the task's other
// rows). Each key's products are one FMA chain and a fixed reduction, summed over slices in order, then scaled and
// biased: the same steps for every key wherever it falls.
template <int C>
AVX2 void slice_scores(const float *q, const float *keys, int64_t dim, int64_t k0, int64_t k1, bool first, bool last,
                       float scale, const float *bias, float *scores) {
  __m256 slice[C];
  for (int c = 0; c < C; c++) slice[c] = _mm256_loadu_ps(q + 8 * c);
  for (int64_t k = k0; k < k1; k++) {
    const float *key = keys + k * dim;
    __m256 sum = _mm256_mul_ps(slice[0], _mm256_loadu_ps(key));
    for (int c = 1; c < C; c++) sum = _mm256_fmadd_ps(slice[c], _mm256_loadu_ps(key + 8 * c), sum);
    __m128 x = _mm_add_ps(_mm256_castps256_ps128(sum), _mm256_extractf128_ps(sum, 1));
    x = _mm_add_ps(x, _mm_movehl_ps(x, x));
    x = _mm_add_ss(x, _mm_movehdup_ps(x));
    if (!first) x = _mm_add_ss(_mm_set_ss(scores[k]), x);
    if (last) x = _mm_fmadd_ss(x, _mm_set_ss(scale), _mm_set_ss(bias[k]));
    scores[k] = _mm_cvtss_f32(x);
  }
}

AVX2 void scores_of(int chunks, const float *q, const float *keys, int64_t dim, int64_t k0, int64_t k1, bool first,
                    bool last, float scale, const float *bias, float *scores) {
  switch (chunks) {
    case 1: return slice_scores<1>(q, keys, dim, k0, k1, first, last, scale, bias, scores);
    case 2: return slice_scores<2>(q, keys, dim, k0, k1, first, last, scale, bias, scores);
    case 3: return slice_scores<3>(q, keys, dim, k0, k1, first, last, scale, bias, scores);
    case 4: return slice_scores<4>(q, keys, dim, k0, k1, first, last, scale, bias, scores);
    case 5: return slice_scores<5>(q, keys, dim, k0, k1, first, last, scale, bias, scores);
    case 6: return slice_scores<6>(q, keys, dim, k0, k1, first, last, scale, bias, scores);
    case 7: return slice_scores<7>(q, keys, dim, k0, k1, first, last, scale, bias, scores);
    default: return slice_scores<8>(q, keys, dim, k0, k1, first, last, scale, bias, scores);
  }
}

// exp(x) for x <= 0 (Cephes' expf: x = n ln 2 + r, a degree-6 polynomial in r), exactly 0 below kNoWeight.
AVX2 __m256 exp_of(__m256 x) {
  const __m256 none = _mm256_cmp_ps(x, _mm256_set1_ps(kNoWeight), _CMP_LT_OQ);
  x = _mm256_max_ps(x, _mm256_set1_ps(kNoWeight));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  for (float c : {1.3981999507e-3f, 8.3334519073e-3f, 4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f})
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.f)));
  const __m256i two_n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_andnot_ps(none, _mm256_mul_ps(p, _mm256_castsi256_ps(two_n)));
}

// out += sum over keys, in order, of weight x value (C 8-float chunks of one 64-wide slice); returns the sum of the
// weights, added in the same order. Keys of weight 0 are skipped: they would add exact zeros.
template <int C>
AVX2 float weigh(const float *weights, int64_t keys, const float *values, int64_t dim, float *out) {
  __m256 sum[C], total = _mm256_setzero_ps();
  for (int c = 0; c < C; c++) sum[c] = _mm256_setzero_ps();
  for (int64_t k = 0; k < keys; k++) {
    if (weights[k] == 0.f) continue;
    const __m256 w = _mm256_set1_ps(weights[k]);
    total = _mm256_add_ps(total, w);
    for (int c = 0; c < C; c++) sum[c] = _mm256_fmadd_ps(w, _mm256_loadu_ps(values + k * dim + 8 * c), sum[c]);
  }
  for (int c = 0; c < C; c++) _mm256_storeu_ps(out + 8 * c, sum[c]);
  return _mm_cvtss_f32(_mm256_castps256_ps128(total));
}

AVX2 float weigh_slice(int chunks, const float *weights, int64_t keys, const float *values, int64_t dim, float *out) {
  switch (chunks) {
    case 1: return weigh<1>(weights, keys, values, dim, out);
    case 2: return weigh<2>(weights, keys, values, dim, out);
    case 3: return weigh<3>(weights, keys, values, dim, out);
    case 4: return weigh<4>(weights, keys, values, dim, out);
    case 5: return weigh<5>(weights, keys, values, dim, out);
    case 6: return weigh<6>(weights, keys, values, dim, out);
    case 7: return weigh<7>(weights, keys, values, dim, out);
    default: return weigh<8>(weights, keys, values, dim, out);
  }
}

// Task: one head, up to kRowsPerTask query rows. Every row sees keys [0, past + rows) through its bias.
AVX2 void attend(void *data, size_t task) {
  const Call &call = *static_cast<const Call *>(data);
  const Attention &op = *call.op;
  const int64_t dim = call.dim, chunks_of_rows = (call.rows + kRowsPerTask - 1) / kRowsPerTask;
  const int64_t head = static_cast<int64_t>(task) / chunks_of_rows, group = head / (op.heads / op.kv_heads);
  const int64_t first = static_cast<int64_t>(task) % chunks_of_rows * kRowsPerTask;
  const int64_t last = std::min(call.rows, first + kRowsPerTask), keys = call.past + call.rows;
  const int64_t padded = (keys + 7) / 8 * 8;
  const float *k_rows = call.keys + group * call.capacity * dim, *v_rows = call.values + group * call.capacity * dim;
  thread_local std::vector<float> scores;
  scores.assign(static_cast<size_t>((last - first) * padded), std::numeric_limits<float>::lowest());
  for (int64_t k0 = 0; k0 < keys; k0 += kKeysPerBlock)
    for (int64_t i = first; i < last; i++)
      for (int64_t d = 0; d < dim; d += 64)
        scores_of(static_cast<int>(std::min<int64_t>(64, dim - d) / 8), call.queries + (i * op.heads + head) * dim + d,
                  k_rows + d, dim, k0, std::min(keys, k0 + kKeysPerBlock), d == 0, d + 64 >= dim, op.scale,
                  call.bias + i * call.total, scores.data() + (i - first) * padded);
  for (int64_t i = first; i < last; i++) {
    float *row = scores.data() + (i - first) * padded;
    __m256 peak = _mm256_loadu_ps(row);
    for (int64_t k = 8; k < padded; k += 8) peak = _mm256_max_ps(peak, _mm256_loadu_ps(row + k));
    float lanes[8];
    _mm256_storeu_ps(lanes, peak);
    const __m256 top = _mm256_set1_ps(*std::max_element(lanes, lanes + 8));
    for (int64_t k = 0; k < padded; k += 8) _mm256_storeu_ps(row + k, exp_of(_mm256_sub_ps(_mm256_loadu_ps(row + k), top)));
    float *out = call.out + (i * op.heads + head) * dim;
    float weight = 0;
    for (int64_t d = 0; d < dim; d += 64)
      weight = weigh_slice(static_cast<int>(std::min<int64_t>(64, dim - d) / 8), row, keys, v_rows + d, dim, out + d);
    const __m256 inverse = _mm256_set1_ps(1.f / weight);
    for (int64_t d = 0; d < dim; d += 8) _mm256_storeu_ps(out + d, _mm256_mul_ps(_mm256_loadu_ps(out + d), inverse));
  }
}

// Rotary embedding of one head vector (rotate-half form: dims d and d + half turn by the position's angle d).
void rotate(const float *in, float *out, int64_t dim, int64_t half, const float *cos, const float *sin) {
  std::memcpy(out, in, static_cast<size_t>(dim) * sizeof(float));
  for (int64_t d = 0; d < half; d++) {
    out[d] = in[d] * cos[d] - in[d + half] * sin[d];
    out[d + half] = in[d + half] * cos[d] + in[d] * sin[d];
  }
}

OrtStatus *compute(const Attention &op, OrtKernelContext *context) {
  const OrtValue *in[INPUTS] = {};
  for (size_t i = 0; i < INPUTS; i++)
    if (OrtStatus *status = api_call<KernelContext_GetInput>(context, i, &in[i])) return status;
  if (in[KEY] || in[VALUE] || in[SINK]) return failure("TreeAttention takes packed Q/K/V and no head sink");
  Shape qkv = shape_of(in[QKV]), past = shape_of(in[PAST_KEY]), positions = shape_of(in[POSITIONS]),
        bias = shape_of(in[BIAS]), cos = shape_of(in[COS]);
  for (const Shape *s : {&qkv, &past, &positions, &bias, &cos})
    if (s->status) return s->status;
  if (qkv.dims.size() != 3 || past.dims.size() != 4 || positions.dims.size() != 2 || bias.dims.size() != 4 ||
      cos.dims.size() != 2)
    return failure("TreeAttention: inputs of the wrong rank");
  const int64_t rows = qkv.dims[1], dim = past.dims[3], capacity = past.dims[2], total = *data_of<int32_t>(in[TOTAL]);
  const int64_t attention_rows = positions.dims[1], half = cos.dims[1], past_rows = total - attention_rows;
  if (qkv.dims[0] != 1 || qkv.dims[2] != (op.heads + 2 * op.kv_heads) * dim || past.dims[1] != op.kv_heads ||
      dim % 8 || 2 * half > dim)
    return failure("TreeAttention: batch 1, packed Q/K/V of the heads, head size in 8s");
  if (attention_rows < rows || past_rows < 0 || past_rows > capacity || bias.dims[2] != attention_rows ||
      bias.dims[3] != total)
    return failure("TreeAttention: positions and bias must cover the rows, over past + attention rows keys");
  const int64_t present_dims[4] = {1, op.kv_heads, std::max(capacity, past_rows + rows), dim};
  OrtValue *present[2] = {};
  for (size_t i = 0; i < 2; i++)
    if (OrtStatus *status = api_call<KernelContext_GetOutput>(context, 1 + i, present_dims, 4, &present[i]))
      return status;
  const int64_t out_dims[3] = {1, rows, op.heads * dim};
  OrtValue *out = nullptr;
  if (OrtStatus *status = api_call<KernelContext_GetOutput>(context, 0, out_dims, 3, &out)) return status;

  const float *qkv_rows = data_of<float>(in[QKV]), *cos_rows = data_of<float>(in[COS]), *sin_rows = data_of<float>(in[SIN]);
  const int64_t *position = data_of<int64_t>(in[POSITIONS]);
  const int64_t width = qkv.dims[2], present_capacity = present_dims[2];
  thread_local std::vector<float> queries;  // one call per layer and forward: kept, not allocated each time
  queries.resize(static_cast<size_t>(rows * op.heads * dim));
  Call call{&op, rows, past_rows, present_capacity, dim, total, queries.data(), data_of<float>(in[BIAS]), nullptr,
            nullptr, data_of<float>(out)};
  for (int kind = 0; kind < 2; kind++) {
    const float *past_data = data_of<float>(in[PAST_KEY + kind]);
    float *present_data = data_of<float>(present[kind]);
    if (present_data != past_data)  // not bound in place: the past is copied first, as GroupQueryAttention does
      for (int64_t g = 0; g < op.kv_heads; g++)
        std::memcpy(present_data + g * present_capacity * dim, past_data + g * capacity * dim,
                    static_cast<size_t>(past_rows * dim) * sizeof(float));
    (kind ? call.values : call.keys) = present_data;
  }
  for (int64_t i = 0; i < rows; i++) {
    if (position[i] < 0 || position[i] >= cos.dims[0]) return failure("TreeAttention: a position past the rotary cache");
    const float *c = cos_rows + position[i] * half, *s = sin_rows + position[i] * half, *row = qkv_rows + i * width;
    const int64_t turn = op.rotary ? half : 0;
    for (int64_t h = 0; h < op.heads; h++)
      rotate(row + h * dim, queries.data() + (i * op.heads + h) * dim, dim, turn, c, s);
    for (int64_t g = 0; g < op.kv_heads; g++) {
      const int64_t at = (g * present_capacity + past_rows + i) * dim;
      rotate(row + (op.heads + g) * dim, call.keys + at, dim, turn, c, s);
      std::memcpy(call.values + at, row + (op.heads + op.kv_heads + g) * dim,
                  static_cast<size_t>(dim) * sizeof(float));
    }
  }
  if (rows == 0) return nullptr;
  const size_t tasks = static_cast<size_t>(op.heads * ((rows + kRowsPerTask - 1) / kRowsPerTask));
  return api_call<KernelContext_ParallelFor>(context, attend, tasks, 0, &call);
}

OrtStatus *create(const OrtKernelInfo *info, Attention *&out) {
  auto op = std::make_unique<Attention>();
  int64_t rotary = 0, interleaved = 0, window = -1;
  float softcap = 0;
  for (auto [name, value] : {std::pair<const char *, int64_t *>{"num_heads", &op->heads}, {"kv_num_heads", &op->kv_heads},
                             {"do_rotary", &rotary}, {"rotary_interleaved", &interleaved}, {"local_window_size", &window}})
    if (OrtStatus *status = api_call<KernelInfoGetAttribute_int64>(info, name, value)) return status;
  for (auto [name, value] : {std::pair<const char *, float *>{"scale", &op->scale}, {"softcap", &softcap}})
    if (OrtStatus *status = api_call<KernelInfoGetAttribute_float>(info, name, value)) return status;
  if (op->heads <= 0 || op->kv_heads <= 0 || op->heads % op->kv_heads || interleaved || window != -1 || softcap != 0)
    return failure("TreeAttention: grouped heads, rotate-half rotary, no local window, no softcap");
  op->rotary = rotary != 0;
  out = op.release();
  return nullptr;
}

OrtCustomOp make_op() {
  OrtCustomOp op = cpu_op<Attention, 3, create, compute>();
  op.GetName = [](const OrtCustomOp *) { return "TreeAttention"; };
  op.GetInputTypeCount = [](const OrtCustomOp *) -> size_t { return INPUTS; };
  op.GetInputType = [](const OrtCustomOp *, size_t i) -> int {
    return i == SEQLENS || i == TOTAL ? ELEMENT_INT32 : i == POSITIONS ? ELEMENT_INT64 : ELEMENT_FLOAT;
  };
  op.GetInputCharacteristic = [](const OrtCustomOp *, size_t i) -> int {
    return i == KEY || i == VALUE || i == SINK ? INPUT_OUTPUT_OPTIONAL : INPUT_OUTPUT_REQUIRED;
  };
  return op;
}

const OrtCustomOp attention_op = make_op();

}  // namespace

const OrtCustomOp &tree_attention_op() { return attention_op; }
