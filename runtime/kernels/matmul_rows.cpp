// dovetail.MatMulNBitsRows: MatMulNBits (4 or 8 bits, symmetric or with float zero points) whose every output
// row is computed the same way however many rows a call runs, and whose unpacked weights serve all of its rows.
//
// Why: ORT's MatMulNBits computes a lone row by another path than a row among several (so a verify forward
// must be padded to stay identical to sequential decoding) and unpacks its weights again for every row (8 rows
// cost 2.5x one). Here each row's activations are quantized per block to int8 on their own, the products are
// summed exactly in int32 per block, and the float epilogue runs in one fixed order per row.
// AVX-512 VNNI where the CPU has it (one vpdpbusd per 64 products), else AVX2 (vpmaddubsw + vpmaddwd, 4 rows at
// a time); DOVETAIL_KERNEL_ISA=avx2 picks the latter anywhere. Without AVX2 the runtime keeps MatMulNBits.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "arena.h"
#include "ops.h"

namespace {

constexpr int kTile = 16;     // output columns per zmm of int32 sums
constexpr int kMaxRows = 8;   // rows computed together over one unpacked weight tile (AVX2: 4, its 16 registers)
constexpr int kTilesPerTask = 4;
// Weights are read once from memory and, for several rows, used at the speed of the dot products. Prefetching
// 8 KiB ahead into L2 and 1 KiB ahead into L1 keeps memory busy while the rows compute (SmolLM2's 151 matrices at
// block 128, 2 threads, against 2 KiB ahead into L1 only: 8 rows int8 5.63 / 6.78 -> 4.85 / 5.14 ms, int4 4.05 /
// 5.53 -> 3.89 / 5.26, a lone int4 row 2.57 / 2.19 -> 2.41 / 2.11). A lone 8-bit row takes one `vpdpbusd` per 64
// bytes, and the hardware prefetcher alone keeps up with it: software prefetches made it slower (4.24 / 4.41 ms
// without, 4.70 / 4.78 with).
constexpr int kPrefetchL2 = 8192, kPrefetchL1 = 1024;
constexpr int kPrefetchAvx2 = 2048;  // the AVX2 path's distance into L1, as first measured (not re-tuned)

// k values per 64 packed bytes, 16 columns x 4 k each: twice that at 4 bits (low and high nibbles).
constexpr int64_t step_of(int64_t bits) { return 32 / bits; }

#define AVX512 __attribute__((target("avx512f,avx512bw,avx512vnni")))
#define AVX2 __attribute__((target("avx2,fma,f16c")))

struct Kernel {
  int64_t K = 0, N = 0, block = 0, blocks = 0, bits = 0;
  bool wide = true;           // AVX-512 VNNI, else AVX2
  Store<uint8_t> packed;      // [N / 16][K / step][64]
  // Scales, and with float zero points mins (w = scale x q + min, min = -scale x zero point: a GGUF Q4_1 block's
  // own form), [N / 16][blocks][16], in one of three forms, the smallest that holds them exactly:
  // - GGUF K-quant super-blocks (Q4_K, Q6_K): every 256 weights' block scales (and mins) are small integers
  //   times one fp16 step, kept as int8 [N / 16][blocks][16] and fp16 steps [N / 16][blocks / group][16];
  //   a Q4_K weight then reads 0.58 bytes instead of 0.75 with fp32 scales and mins, a Q6_K one 1.07 of 1.25;
  // - fp16 where every scale is an fp16 value, as a Q4_1 file's are (at 32 weights a block, 4 of 20 bytes);
  // - fp32 otherwise.
  int64_t group = 0;          // blocks per super-block in the first form, else 0
  Store<int8_t> sub_scales, sub_mins;
  Store<uint16_t> super_scales, super_mins;
  Store<float> scales, mins;
  Store<uint16_t> half_scales, half_mins;
};

// Where a 16-column tile's packed weights, scales and mins (none: nullptr) start.
const uint8_t *tile_weights(const Kernel &k, int64_t tile) { return k.packed.data() + tile * k.K * k.bits * 2; }
template <typename S>
const S *tile_start(const Store<S> &values, const Kernel &k, int64_t tile, int64_t per_tile) {
  return values.empty() ? nullptr : values.data() + tile * per_tile * kTile;
}

AVX512 __m512 load16(const float *p) { return _mm512_loadu_ps(p); }
AVX512 __m512 load16(const uint16_t *p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i *>(p)));
}
AVX512 __m512 load16(const int8_t *p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i *>(p))));
}
AVX2 __m256 load8(const float *p) { return _mm256_loadu_ps(p); }
AVX2 __m256 load8(const uint16_t *p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i *>(p))); }
AVX2 __m256 load8(const int8_t *p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i *>(p))));
}

// A tile's scales and mins of block b, for 16 columns (AVX2: the 8 of half h), in float. Plain<S>: stored per
// block (fp32 or fp16); Stepped: int8 multiples of a super-block's fp16 step, whose products are exact in fp32,
// so both forms give the same floats for the same matrix.
template <typename S>
struct Plain {
  const S *s, *m;
  static Plain at(const Store<S> &scales, const Store<S> &mins, const Kernel &k, int64_t tile) {
    return {tile_start(scales, k, tile, k.blocks), tile_start(mins, k, tile, k.blocks)};
  }
  bool has_mins() const { return m != nullptr; }
  AVX512 __m512 scale(int64_t b) const { return load16(s + b * kTile); }
  AVX512 __m512 min(int64_t b) const { return load16(m + b * kTile); }
  AVX2 __m256 scale8(int64_t b, int h) const { return load8(s + b * kTile + 8 * h); }
  AVX2 __m256 min8(int64_t b, int h) const { return load8(m + b * kTile + 8 * h); }
};

struct Stepped {
  const int8_t *s, *m;
  const uint16_t *step, *min_step;
  int shift;  // log2 of the blocks a super-block: a shift, not a division, finds a block's step
  static Stepped at(const Kernel &k, int64_t tile) {
    const int64_t groups = k.blocks / k.group;
    return {tile_start(k.sub_scales, k, tile, k.blocks), tile_start(k.sub_mins, k, tile, k.blocks),
            tile_start(k.super_scales, k, tile, groups), tile_start(k.super_mins, k, tile, groups),
            __builtin_ctzll(static_cast<unsigned long long>(k.group))};
  }
  bool has_mins() const { return m != nullptr; }
  AVX512 __m512 scale(int64_t b) const {
    return _mm512_mul_ps(load16(s + b * kTile), load16(step + (b >> shift) * kTile));
  }
  AVX512 __m512 min(int64_t b) const {
    return _mm512_mul_ps(load16(m + b * kTile), load16(min_step + (b >> shift) * kTile));
  }
  AVX2 __m256 scale8(int64_t b, int h) const {
    return _mm256_mul_ps(load8(s + b * kTile + 8 * h), load8(step + (b >> shift) * kTile + 8 * h));
  }
  AVX2 __m256 min8(int64_t b, int h) const {
    return _mm256_mul_ps(load8(m + b * kTile + 8 * h), load8(min_step + (b >> shift) * kTile + 8 * h));
  }
};

// Activations of one call, quantized per row and block: a row's values depend on that row alone.
struct Rows {
  const Kernel *kernel;
  int64_t M;
  std::vector<int8_t> q;       // [M][K]
  std::vector<float> scale;    // [M][blocks]
  std::vector<int32_t> shift;  // [M][blocks]: the weights' zero point times the block's sum of q
  std::vector<float> total;    // [M][blocks]: the block's sum of q times its scale, for weights with mins
  float *out;
};

AVX512 void quantize(const float *a, Rows &rows) {
  const Kernel &k = *rows.kernel;
  for (int64_t m = 0; m < rows.M; m++) {
    const float *x = a + m * k.K;
    for (int64_t b = 0; b < k.blocks; b++) {
      const int64_t k0 = b * k.block, k1 = std::min(k.K, k0 + k.block);
      __m512 peak = _mm512_setzero_ps();
      for (int64_t i = k0; i < k1; i += 16) peak = _mm512_max_ps(peak, _mm512_abs_ps(_mm512_loadu_ps(x + i)));
      const float amax = _mm512_reduce_max_ps(peak);
      const __m512 inverse = _mm512_set1_ps(amax > 0 ? 127.f / amax : 0.f);
      __m512i sum = _mm512_setzero_si512();
      for (int64_t i = k0; i < k1; i += 16) {
        const __m512i v = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(x + i), inverse));
        sum = _mm512_add_epi32(sum, v);
        _mm_storeu_si128(reinterpret_cast<__m128i *>(rows.q.data() + m * k.K + i), _mm512_cvtsepi32_epi8(v));
      }
      const int32_t q_sum = _mm512_reduce_add_epi32(sum);
      rows.scale[m * k.blocks + b] = amax / 127.f;
      rows.shift[m * k.blocks + b] = (1 << (k.bits - 1)) * q_sum;
      rows.total[m * k.blocks + b] = static_cast<float>(q_sum) * (amax / 127.f);
    }
  }
}

AVX2 void quantize_avx2(const float *a, Rows &rows) {
  const Kernel &k = *rows.kernel;
  const __m256 sign = _mm256_set1_ps(-0.f);
  for (int64_t m = 0; m < rows.M; m++) {
    const float *x = a + m * k.K;
    for (int64_t b = 0; b < k.blocks; b++) {
      const int64_t k0 = b * k.block, k1 = std::min(k.K, k0 + k.block);
      __m256 peak = _mm256_setzero_ps();
      for (int64_t i = k0; i < k1; i += 8) peak = _mm256_max_ps(peak, _mm256_andnot_ps(sign, _mm256_loadu_ps(x + i)));
      alignas(32) float lanes[8];
      _mm256_store_ps(lanes, peak);
      const float amax = *std::max_element(lanes, lanes + 8);
      const __m256 inverse = _mm256_set1_ps(amax > 0 ? 127.f / amax : 0.f);
      __m256i sum = _mm256_setzero_si256();
      for (int64_t i = k0; i < k1; i += 8) {
        const __m256i v = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + i), inverse));
        sum = _mm256_add_epi32(sum, v);
        const __m128i words = _mm_packs_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
        _mm_storel_epi64(reinterpret_cast<__m128i *>(rows.q.data() + m * k.K + i), _mm_packs_epi16(words, words));
      }
      alignas(32) int32_t sums[8];
      _mm256_store_si256(reinterpret_cast<__m256i *>(sums), sum);
      int32_t total = 0;
      for (int32_t part : sums) total += part;
      rows.scale[m * k.blocks + b] = amax / 127.f;
      rows.shift[m * k.blocks + b] = (1 << (k.bits - 1)) * total;
      rows.total[m * k.blocks + b] = static_cast<float>(total) * (amax / 127.f);
    }
  }
}

template <int R, int Bits, typename Scales>
AVX512 void tile_rows(const Rows &rows, int64_t tile, int64_t m0, const Scales &scales) {
  constexpr int64_t step = step_of(Bits);
  const Kernel &k = *rows.kernel;
  const uint8_t *w = tile_weights(k, tile);
  const int8_t *a[R];
  for (int r = 0; r < R; r++) a[r] = rows.q.data() + (m0 + r) * k.K;
  const __m512i nibble = _mm512_set1_epi8(0x0F);
  __m512 y[R];
  for (int r = 0; r < R; r++) y[r] = _mm512_setzero_ps();
  for (int64_t b = 0; b < k.blocks; b++) {
    const int64_t k0 = b * k.block, k1 = std::min(k.K, k0 + k.block);
    __m512i dot[R];
    for (int r = 0; r < R; r++) dot[r] = _mm512_setzero_si512();
    for (int64_t i = k0; i < k1; i += step, w += 64) {
      if constexpr (R > 1 || Bits == 4) {
        _mm_prefetch(reinterpret_cast<const char *>(w) + kPrefetchL2, _MM_HINT_T1);
        _mm_prefetch(reinterpret_cast<const char *>(w) + kPrefetchL1, _MM_HINT_T0);
      }
      const __m512i v = _mm512_loadu_si512(w);
      if constexpr (Bits == 4) {
        const __m512i low = _mm512_and_si512(v, nibble), high = _mm512_and_si512(_mm512_srli_epi16(v, 4), nibble);
        for (int r = 0; r < R; r++) {
          int32_t a0, a1;
          std::memcpy(&a0, a[r] + i, 4);
          std::memcpy(&a1, a[r] + i + 4, 4);
          dot[r] = _mm512_dpbusd_epi32(dot[r], low, _mm512_set1_epi32(a0));
          dot[r] = _mm512_dpbusd_epi32(dot[r], high, _mm512_set1_epi32(a1));
        }
      } else {
        for (int r = 0; r < R; r++) {
          int32_t a0;
          std::memcpy(&a0, a[r] + i, 4);
          dot[r] = _mm512_dpbusd_epi32(dot[r], v, _mm512_set1_epi32(a0));
        }
      }
    }
    const __m512 weight_scale = scales.scale(b);
    const __m512 weight_min = scales.has_mins() ? scales.min(b) : _mm512_setzero_ps();
    for (int r = 0; r < R; r++) {
      const int64_t at = (m0 + r) * k.blocks + b;
      const __m512 scale = _mm512_mul_ps(weight_scale, _mm512_set1_ps(rows.scale[at]));
      if (scales.has_mins()) {  // sum of (scale q + min) a = scale sum(q a) + min sum(a)
        y[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot[r]), scale, y[r]);
        y[r] = _mm512_fmadd_ps(weight_min, _mm512_set1_ps(rows.total[at]), y[r]);
      } else {
        const __m512i exact = _mm512_sub_epi32(dot[r], _mm512_set1_epi32(rows.shift[at]));
        y[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(exact), scale, y[r]);
      }
    }
  }
  for (int r = 0; r < R; r++) _mm512_storeu_ps(rows.out + (m0 + r) * k.N + tile * kTile, y[r]);
}

// The same packed lines as two 32-byte halves of 8 columns. 4-bit weights times int8 activations fit
// vpmaddubsw's 16-bit pair sums (15 x 127 x 2); 8-bit ones do not, so they are widened to 16 bits for vpmaddwd,
// which leaves column sums in the order 0 1 4 5 2 3 6 7, put right once a block. Output rows accumulate in place.
template <int R, int Bits, typename Scales>
AVX2 void tile_rows_avx2(const Rows &rows, int64_t tile, int64_t m0, const Scales &scales) {
  constexpr int64_t step = step_of(Bits);
  const Kernel &k = *rows.kernel;
  const uint8_t *w = tile_weights(k, tile);
  const int8_t *a[R];
  float *y[R];
  for (int r = 0; r < R; r++) {
    a[r] = rows.q.data() + (m0 + r) * k.K;
    y[r] = rows.out + (m0 + r) * k.N + tile * kTile;
    _mm256_storeu_ps(y[r], _mm256_setzero_ps());
    _mm256_storeu_ps(y[r] + 8, _mm256_setzero_ps());
  }
  const __m256i nibble = _mm256_set1_epi8(0x0F), pairs = _mm256_set1_epi16(1);
  for (int64_t b = 0; b < k.blocks; b++) {
    const int64_t k0 = b * k.block, k1 = std::min(k.K, k0 + k.block);
    __m256i dot[R][2];
    for (int r = 0; r < R; r++) dot[r][0] = dot[r][1] = _mm256_setzero_si256();
    for (int64_t i = k0; i < k1; i += step, w += 64) {
      _mm_prefetch(reinterpret_cast<const char *>(w) + kPrefetchAvx2, _MM_HINT_T0);
      for (int h = 0; h < 2; h++) {
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i *>(w + 32 * h));
        if constexpr (Bits == 4) {
          const __m256i low = _mm256_and_si256(v, nibble);
          const __m256i high = _mm256_and_si256(_mm256_srli_epi16(v, 4), nibble);
          for (int r = 0; r < R; r++) {
            int32_t a0, a1;
            std::memcpy(&a0, a[r] + i, 4);
            std::memcpy(&a1, a[r] + i + 4, 4);
            const __m256i p0 = _mm256_madd_epi16(_mm256_maddubs_epi16(low, _mm256_set1_epi32(a0)), pairs);
            const __m256i p1 = _mm256_madd_epi16(_mm256_maddubs_epi16(high, _mm256_set1_epi32(a1)), pairs);
            dot[r][h] = _mm256_add_epi32(dot[r][h], _mm256_add_epi32(p0, p1));
          }
        } else {
          const __m256i first = _mm256_cvtepu8_epi16(_mm256_castsi256_si128(v));
          const __m256i second = _mm256_cvtepu8_epi16(_mm256_extracti128_si256(v, 1));
          for (int r = 0; r < R; r++) {
            int32_t a0;
            std::memcpy(&a0, a[r] + i, 4);
            const __m256i x = _mm256_cvtepi8_epi16(_mm_set1_epi32(a0));
            dot[r][h] = _mm256_add_epi32(dot[r][h], _mm256_hadd_epi32(_mm256_madd_epi16(first, x),
                                                                      _mm256_madd_epi16(second, x)));
          }
        }
      }
    }
    for (int h = 0; h < 2; h++) {
      const __m256 weight_scale = scales.scale8(b, h);
      const __m256 weight_min = scales.has_mins() ? scales.min8(b, h) : _mm256_setzero_ps();
      for (int r = 0; r < R; r++) {
        const int64_t at = (m0 + r) * k.blocks + b;
        __m256i sums = dot[r][h];
        if constexpr (Bits == 8) sums = _mm256_permute4x64_epi64(sums, 0xD8);
        const __m256 scale = _mm256_mul_ps(weight_scale, _mm256_set1_ps(rows.scale[at]));
        __m256 out = _mm256_loadu_ps(y[r] + 8 * h);
        if (scales.has_mins()) {
          out = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), scale, out);
          out = _mm256_fmadd_ps(weight_min, _mm256_set1_ps(rows.total[at]), out);
        } else {
          out = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(sums, _mm256_set1_epi32(rows.shift[at]))), scale,
                                out);
        }
        _mm256_storeu_ps(y[r] + 8 * h, out);
      }
    }
  }
}

template <int Bits, typename Scales, typename At>
void tiles_of(const Rows &rows, size_t task, At scales_of) {
  const Kernel &k = *rows.kernel;
  const int64_t tiles = k.N / kTile;
  const int64_t first = static_cast<int64_t>(task) * kTilesPerTask, last = std::min(tiles, first + kTilesPerTask);
  for (int64_t t = first; t < last; t++) {
    const Scales s = scales_of(t);
    if (k.wide) {
      for (int64_t m0 = 0; m0 < rows.M; m0 += kMaxRows) {
        switch (std::min<int64_t>(kMaxRows, rows.M - m0)) {
          case 1: tile_rows<1, Bits>(rows, t, m0, s); break;
          case 2: tile_rows<2, Bits>(rows, t, m0, s); break;
          case 3: tile_rows<3, Bits>(rows, t, m0, s); break;
          case 4: tile_rows<4, Bits>(rows, t, m0, s); break;
          case 5: tile_rows<5, Bits>(rows, t, m0, s); break;
          case 6: tile_rows<6, Bits>(rows, t, m0, s); break;
          case 7: tile_rows<7, Bits>(rows, t, m0, s); break;
          default: tile_rows<8, Bits>(rows, t, m0, s); break;
        }
      }
    } else {
      for (int64_t m0 = 0; m0 < rows.M; m0 += 4) {
        switch (std::min<int64_t>(4, rows.M - m0)) {
          case 1: tile_rows_avx2<1, Bits>(rows, t, m0, s); break;
          case 2: tile_rows_avx2<2, Bits>(rows, t, m0, s); break;
          case 3: tile_rows_avx2<3, Bits>(rows, t, m0, s); break;
          default: tile_rows_avx2<4, Bits>(rows, t, m0, s); break;
        }
      }
    }
  }
}

template <int Bits>
void tiles(void *data, size_t task) {
  const Rows &rows = *static_cast<const Rows *>(data);
  const Kernel &k = *rows.kernel;
  if (k.group) {
    tiles_of<Bits, Stepped>(rows, task, [&](int64_t t) { return Stepped::at(k, t); });
  } else if (!k.half_scales.empty())
    tiles_of<Bits, Plain<uint16_t>>(rows, task,
                                    [&](int64_t t) { return Plain<uint16_t>::at(k.half_scales, k.half_mins, k, t); });
  else
    tiles_of<Bits, Plain<float>>(rows, task, [&](int64_t t) { return Plain<float>::at(k.scales, k.mins, k, t); });
}

__attribute__((target("f16c"))) uint16_t to_half(float x) { return _cvtss_sh(x, _MM_FROUND_TO_NEAREST_INT); }
__attribute__((target("f16c"))) float from_half(uint16_t x) { return _cvtsh_ss(x); }

// Whether every super-block's values (tile layout [tiles][blocks][16], `group` blocks a super-block) are int8
// multiples of one fp16 step, each to within `tolerance` of its own magnitude: a GGUF K-quant's d x sc (and
// dmin x m). The step is the largest magnitude over 63 (Q4_K's 6-bit scales and mins), -128 or 127 (Q6_K's int8).
bool stepped(const std::vector<float> &values, int64_t tiles, int64_t blocks, int64_t group, float tolerance,
             std::vector<int8_t> &multiples, std::vector<uint16_t> &steps) {
  multiples.assign(values.size(), 0);
  steps.assign(static_cast<size_t>(tiles * blocks / group * kTile), 0);
  for (int64_t t = 0; t < tiles; t++)
    for (int64_t g = 0; g < blocks / group; g++)
      for (int c = 0; c < kTile; c++) {
        auto at = [&](int64_t j) { return static_cast<size_t>((t * blocks + g * group + j) * kTile + c); };
        float top = 0;
        for (int64_t j = 0; j < group; j++) top = std::abs(values[at(j)]) > std::abs(top) ? values[at(j)] : top;
        if (top == 0) continue;
        bool found = false;
        for (float divisor : {63.f, -128.f, 127.f}) {
          const uint16_t half = to_half(top / divisor);
          const float step = from_half(half);
          found = step != 0;
          for (int64_t j = 0; j < group && found; j++) {
            const float value = values[at(j)], q = std::nearbyint(value / step);
            found = q >= -128 && q <= 127 && std::abs(q * step - value) <= tolerance * std::abs(value);
            multiples[at(j)] = static_cast<int8_t>(found ? q : 0);
          }
          if (found) {
            steps[static_cast<size_t>((t * blocks / group + g) * kTile + c)] = half;
            break;
          }
        }
        if (!found) return false;
      }
  return true;
}

// MatMulNBits' B is [N][blocks][block x bits / 8] bytes; at 4 bits element k of a block is in the low nibble
// when k is even. Packed: per 16-column tile, 64 bytes a step, column c's 4 consecutive k in bytes 4c..4c+3
// (at 4 bits the next 4 k in the high nibbles).
void pack(Kernel &k, const uint8_t *b, const float *scales, const float *zero_points) {
  const int64_t bytes = k.block * k.bits / 8, tiles = k.N / kTile, step = step_of(k.bits);
  auto element = [&](int64_t n, int64_t i) -> uint8_t {
    const uint8_t *blob = b + (n * k.blocks + i / k.block) * bytes;
    if (k.bits == 8) return blob[i % k.block];
    const uint8_t byte = blob[(i % k.block) / 2];
    return i % 2 ? byte >> 4 : byte & 0x0F;
  };
  k.packed.assign(static_cast<size_t>(k.N * k.K * k.bits / 8), 0);
  uint8_t *out = k.packed.data();
  for (int64_t t = 0; t < tiles; t++)
    for (int64_t i = 0; i < k.K; i += step, out += 64)
      for (int j = 0; j < 64; j++) {
        const int64_t n = t * kTile + j / 4, at = i + j % 4;
        out[j] = k.bits == 8 ? element(n, at) : static_cast<uint8_t>(element(n, at) | element(n, at + 4) << 4);
      }
  std::vector<float> tile_scales(static_cast<size_t>(tiles * k.blocks * kTile)), tile_mins;
  if (zero_points) tile_mins.resize(tile_scales.size());
  for (int64_t t = 0; t < tiles; t++)
    for (int64_t blk = 0; blk < k.blocks; blk++)
      for (int c = 0; c < kTile; c++) {
        const int64_t from = (t * kTile + c) * k.blocks + blk, to = (t * k.blocks + blk) * kTile + c;
        tile_scales[to] = scales[from];
        if (zero_points) tile_mins[to] = -scales[from] * zero_points[from];
      }
  // Mins are compared to within the float rounding of -scale x zero point (a GGUF's m, given as the zero point
  // -m/d): the stored min is then the GGUF's own.
  const int64_t group = 256 % k.block == 0 ? 256 / k.block : 0;
  if (group && k.blocks % group == 0 && k.K == k.blocks * k.block) {
    std::vector<int8_t> sub_scales, sub_mins;
    std::vector<uint16_t> super_scales, super_mins;
    if (stepped(tile_scales, tiles, k.blocks, group, 0.f, sub_scales, super_scales) &&
        (!zero_points || stepped(tile_mins, tiles, k.blocks, group, 0x1p-20f, sub_mins, super_mins))) {
      k.group = group;
      k.sub_scales.assign(sub_scales.begin(), sub_scales.end());
      k.super_scales.assign(super_scales.begin(), super_scales.end());
      k.sub_mins.assign(sub_mins.begin(), sub_mins.end());
      k.super_mins.assign(super_mins.begin(), super_mins.end());
      return;
    }
  }
  // fp16 when every scale is an fp16 value and every min one.
  auto half_of = [](const std::vector<float> &values, float tolerance, std::vector<uint16_t> &out) {
    out.resize(values.size());
    for (size_t i = 0; i < values.size(); i++) {
      out[i] = to_half(values[i]);
      if (!(std::abs(from_half(out[i]) - values[i]) <= tolerance * std::abs(values[i]))) return false;
    }
    return true;
  };
  std::vector<uint16_t> half_scales, half_mins;
  if (half_of(tile_scales, 0.f, half_scales) && half_of(tile_mins, 0x1p-20f, half_mins)) {
    k.half_scales.assign(half_scales.begin(), half_scales.end());
    k.half_mins.assign(half_mins.begin(), half_mins.end());
  } else {
    k.scales.assign(tile_scales.begin(), tile_scales.end());
    k.mins.assign(tile_mins.begin(), tile_mins.end());
  }
}

OrtStatus *create(const OrtKernelInfo *info, Kernel *&out) {
  auto kernel = std::make_unique<Kernel>();
  for (auto [name, value] : {std::pair<const char *, int64_t *>{"K", &kernel->K}, {"N", &kernel->N},
                             {"block_size", &kernel->block}, {"bits", &kernel->bits}})
    if (OrtStatus *status = api_call<KernelInfoGetAttribute_int64>(info, name, value)) return status;
  if ((kernel->bits != 4 && kernel->bits != 8) || kernel->K % 16 || kernel->N % kTile || kernel->block % 16)
    return failure("MatMulNBitsRows takes 4 or 8 bits, K and block_size in 16s and N in 16s");
  kernel->blocks = (kernel->K + kernel->block - 1) / kernel->block;
  const char *isa = std::getenv("DOVETAIL_KERNEL_ISA");
  kernel->wide = !(isa && std::string(isa) == "avx2") && __builtin_cpu_supports("avx512vnni") &&
                 __builtin_cpu_supports("avx512bw");
  // Weights, scales and (optional, so absent reads as not constant) float zero points.
  const void *weights[3] = {};
  for (size_t input = 1; input <= 3; input++) {
    int constant = 0;
    const OrtValue *value = nullptr;
    if (OrtStatus *status = api_call<KernelInfoGetConstantInput_tensor>(info, input, &constant, &value)) return status;
    if (!constant || !value) {
      if (input == 3) break;
      return failure("MatMulNBitsRows needs its weights, scales and zero points as initializers");
    }
    void *data = nullptr;
    if (OrtStatus *status = api_call<GetTensorMutableData>(const_cast<OrtValue *>(value), &data)) return status;
    weights[input - 1] = data;
  }
  pack(*kernel, static_cast<const uint8_t *>(weights[0]), static_cast<const float *>(weights[1]),
       static_cast<const float *>(weights[2]));
  out = kernel.release();
  return nullptr;
}

OrtStatus *compute(const Kernel &kernel, OrtKernelContext *context) {
  const OrtValue *input = nullptr;
  if (OrtStatus *status = api_call<KernelContext_GetInput>(context, 0, &input)) return status;
  Shape shape = shape_of(input);
  if (shape.status) return shape.status;
  if (shape.dims.empty() || shape.dims.back() != kernel.K) return failure("MatMulNBitsRows: input's last axis is not K");
  int64_t rows_count = 1;
  for (size_t i = 0; i + 1 < shape.dims.size(); i++) rows_count *= shape.dims[i];
  shape.dims.back() = kernel.N;
  OrtValue *output = nullptr;
  if (OrtStatus *status = api_call<KernelContext_GetOutput>(context, 0, shape.dims.data(), shape.dims.size(), &output))
    return status;
  if (rows_count == 0) return nullptr;
  thread_local Rows rows;
  rows.kernel = &kernel;
  rows.M = rows_count;
  rows.q.resize(static_cast<size_t>(rows_count * kernel.K));
  rows.scale.resize(static_cast<size_t>(rows_count * kernel.blocks));
  rows.shift.resize(rows.scale.size());
  rows.total.resize(rows.scale.size());
  rows.out = data_of<float>(output);
  (kernel.wide ? quantize : quantize_avx2)(data_of<float>(input), rows);
  const size_t tasks = static_cast<size_t>((kernel.N / kTile + kTilesPerTask - 1) / kTilesPerTask);
  return api_call<KernelContext_ParallelFor>(context, kernel.bits == 4 ? tiles<4> : tiles<8>, tasks, 0, &rows);
}

// The operator's schema: Y (float) = A (float, [..., K]) x B (MatMulNBits' uint8 weights) with float scales and,
// optionally, float zero points.
OrtCustomOp make_op() {
  OrtCustomOp op = cpu_op<Kernel, 1, create, compute>();
  op.GetName = [](const OrtCustomOp *) { return "MatMulNBitsRows"; };
  op.GetInputTypeCount = [](const OrtCustomOp *) -> size_t { return 4; };
  op.GetInputType = [](const OrtCustomOp *, size_t i) -> int { return i == 1 ? ELEMENT_UINT8 : ELEMENT_FLOAT; };
  op.GetInputCharacteristic = [](const OrtCustomOp *, size_t i) -> int {
    return i == 3 ? INPUT_OUTPUT_OPTIONAL : INPUT_OUTPUT_REQUIRED;
  };
  return op;
}

const OrtCustomOp rows_op = make_op();

}  // namespace

const OrtCustomOp &matmul_rows_op() { return rows_op; }
