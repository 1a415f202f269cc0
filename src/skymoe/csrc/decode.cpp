// Native CPU kernels for decoding: few tokens per step, where PyTorch's per-op overhead and
// its GEMM kernels (tuned for large matrices) leave most of the memory bandwidth unused.
//
// Every matmul here is "few rows of x times a big weight": each weight row is read from memory
// once and multiplied with all rows of x while it sits in L1. Accumulation is fp32 throughout;
// results are rounded to the model dtype where the PyTorch path rounds, so outputs match it up
// to summation order. Weights are in the model dtype or FP8 e4m3 (one byte each, widened to
// bf16 in registers, with one scale per weight row). Built at first use with the machine's own
// instruction set (-march=native; AVX512-BF16 dot products where the CPU has them).

#include "common.h"
#include "kernels.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <type_traits>
#include <vector>

#if defined(__AVX512BF16__) && defined(__AVX512BW__)
#include <immintrin.h>
#define SKYMOE_AVX512_BF16 1
#endif

namespace skymoe {

constexpr int kRowBlock = 8;  // rows of x multiplied per pass over a weight row
// The bf16 dot products prefetch the weights this far ahead (a few rows of the small K here):
// without it a weight row fetched from memory stalls the multiplications, which halved the
// throughput of 5-16-row matmuls over weights streamed from memory (LM head, experts).
constexpr int64_t kPrefetchBytes = 4096;
// Rows at least this long are read four at a time by a batch-1 decode (DotWeightRows).
constexpr int64_t kLongRow = 2048;

// out[i] = dot(w[0:K], x[i*ldx : i*ldx+K]) for i < MB, weights of type W (the model dtype, or
// FP8 e4m3 values whose scale the caller applies). Portable: 16 independent lanes, which the
// compiler vectorizes without reassociating a single sum.
template <typename T, typename W, int MB>
struct DotRows {
  static void run(const W* w, const T* x, int64_t ldx, int64_t K, float* out) {
    constexpr int L = 16;
    float acc[MB][L] = {};
    int64_t k = 0;
    for (; k + L <= K; k += L) {
      float wf[L];
      for (int j = 0; j < L; ++j) wf[j] = to_f(w[k + j]);
      for (int i = 0; i < MB; ++i)
        for (int j = 0; j < L; ++j) acc[i][j] += to_f(x[i * ldx + k + j]) * wf[j];
    }
    for (int i = 0; i < MB; ++i) {
      float s = 0.f;
      for (int j = 0; j < L; ++j) s += acc[i][j];
      for (int64_t r = k; r < K; ++r) s += to_f(x[i * ldx + r]) * to_f(w[r]);
      out[i] = s;
    }
  }
};

#ifdef SKYMOE_AVX512_BF16
// out[i] = sum of the 16 lanes of acc[i], for MB vectors: pairs are folded together before the
// last lanes are summed, so 8 sums cost about a third of 8 separate horizontal reductions.
template <int MB>
inline void reduce_store(const __m512* acc, float* out) {
  if constexpr (MB < 4) {
    for (int i = 0; i < MB; ++i) out[i] = _mm512_reduce_add_ps(acc[i]);
  } else {
    __m256 half[MB];  // 16 lanes -> 8
    for (int i = 0; i < MB; ++i) {
      const __m256 high = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(acc[i]), 1));
      half[i] = _mm256_add_ps(_mm512_castps512_ps256(acc[i]), high);
    }
    for (int i = 0; i + 4 <= MB; i += 4) {  // four vectors -> one with 2 partial sums each
      const __m256 s = _mm256_hadd_ps(_mm256_hadd_ps(half[i], half[i + 1]),
                                      _mm256_hadd_ps(half[i + 2], half[i + 3]));
      _mm_storeu_ps(out + i, _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1)));
    }
    for (int i = MB / 4 * 4; i < MB; ++i) out[i] = _mm512_reduce_add_ps(acc[i]);
  }
}

// Weights as bf16 lanes, from bf16 (as they are) or from e4m3 bytes widened in registers:
// every e4m3 value is a bf16 value, so this is exact. ``Widen<W>`` holds what the widening
// needs in registers for a kernel's loop; ``pair`` gives 64 consecutive weights as two vectors,
// ``lanes`` up to 32 (``mask``).
template <typename W>
struct Widen;

template <>
struct Widen<c10::BFloat16> {
  void pair(const c10::BFloat16* w, __m512i& a, __m512i& b) const {
    a = _mm512_loadu_si512(w);
    b = _mm512_loadu_si512(w + 32);
  }
  __m512i lanes(const c10::BFloat16* w, __mmask32 mask) const {
    return _mm512_maskz_loadu_epi16(mask, w);
  }
};

// e4m3 (e4m3fn's NaN encoding is not handled: quantized weights are finite). ``lanes``: a
// normal value keeps its sign and mantissa and moves its exponent from bias 7 to bias 127; the
// seven subnormal magnitudes (m x 2^-9) come from a table. ``pair`` (with AVX512-VBMI): byte
// tables of the bf16 bits of all 128 magnitudes, low and high bytes looked up 64 at a time (the
// lookup ignores the sign bit, then put into the high byte); the bytes are first reordered so
// that interleaving low and high bytes yields the weights in order: 7 instructions per 64
// weights instead of 20.
struct E4m3Tables {
  uint16_t subnormals[32];
  uint8_t lo[128], hi[128], order[64];
};

inline const E4m3Tables& e4m3_tables() {
  static const E4m3Tables tables = [] {
    E4m3Tables t{};
    for (int m = 0; m < 128; ++m) {
      const uint16_t bits = c10::BFloat16(static_cast<float>(
          c10::Float8_e4m3fn(static_cast<uint8_t>(m), c10::Float8_e4m3fn::from_bits()))).x;
      if (m < 8) t.subnormals[m] = bits;
      t.lo[m] = static_cast<uint8_t>(bits & 0xFF);
      t.hi[m] = static_cast<uint8_t>(bits >> 8);
    }
    for (int lane = 0; lane < 4; ++lane)
      for (int j = 0; j < 8; ++j) {
        t.order[16 * lane + j] = static_cast<uint8_t>(8 * lane + j);           // unpacklo
        t.order[16 * lane + 8 + j] = static_cast<uint8_t>(32 + 8 * lane + j);  // unpackhi
      }
    return t;
  }();
  return tables;
}

template <>
struct Widen<c10::Float8_e4m3fn> {
  __m512i subnormals, lo0, lo1, hi0, hi1, order;

  Widen() {
    const E4m3Tables& t = e4m3_tables();
    subnormals = _mm512_loadu_si512(t.subnormals);
    lo0 = _mm512_loadu_si512(t.lo);
    lo1 = _mm512_loadu_si512(t.lo + 64);
    hi0 = _mm512_loadu_si512(t.hi);
    hi1 = _mm512_loadu_si512(t.hi + 64);
    order = _mm512_loadu_si512(t.order);
  }

  __m512i lanes(const c10::Float8_e4m3fn* w, __mmask32 mask) const {
    const __m512i bytes = _mm512_cvtepu8_epi16(_mm256_maskz_loadu_epi8(mask, w));
    const __m512i mag = _mm512_and_si512(bytes, _mm512_set1_epi16(0x7F));
    const __m512i normal = _mm512_add_epi16(_mm512_slli_epi16(mag, 4),
                                            _mm512_set1_epi16(120 << 7));
    const __m512i subnormal = _mm512_permutexvar_epi16(mag, subnormals);
    const __mmask32 is_subnormal = _mm512_cmplt_epu16_mask(mag, _mm512_set1_epi16(8));
    const __m512i sign = _mm512_slli_epi16(_mm512_and_si512(bytes, _mm512_set1_epi16(0x80)), 8);
    return _mm512_or_si512(_mm512_mask_blend_epi16(is_subnormal, normal, subnormal), sign);
  }

  void pair(const c10::Float8_e4m3fn* w, __m512i& a, __m512i& b) const {
#ifdef __AVX512VBMI__
    const __m512i bytes = _mm512_permutexvar_epi8(order, _mm512_loadu_si512(w));
    const __m512i lo = _mm512_permutex2var_epi8(lo0, bytes, lo1);
    const __m512i hi = _mm512_ternarylogic_epi32(_mm512_permutex2var_epi8(hi0, bytes, hi1),
                                                 bytes, _mm512_set1_epi8(char(0x80)), 0xF8);
    a = _mm512_unpacklo_epi8(lo, hi);
    b = _mm512_unpackhi_epi8(lo, hi);
#else
    a = lanes(w, ~__mmask32(0));
    b = lanes(w + 32, ~__mmask32(0));
#endif
  }
};

// bf16 activations with AVX512-BF16: one instruction multiplies 32 bf16 pairs exactly and adds
// them in fp32; the weights are bf16 or e4m3 (widened in registers: one byte read per weight).
template <typename W, int MB>
struct DotRowsBf16 {
  static void run(const W* w, const c10::BFloat16* x, int64_t ldx, int64_t K, float* out) {
    const Widen<W> widen;
    __m512 acc[MB];
    for (int i = 0; i < MB; ++i) acc[i] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 64 <= K; k += 64) {
      _mm_prefetch(reinterpret_cast<const char*>(w + k) + kPrefetchBytes, _MM_HINT_T0);
      __m512i wa, wb;
      widen.pair(w + k, wa, wb);
      for (int i = 0; i < MB; ++i) {
        acc[i] = _mm512_dpbf16_ps(acc[i], (__m512bh)_mm512_loadu_si512(x + i * ldx + k),
                                  (__m512bh)wa);
        acc[i] = _mm512_dpbf16_ps(acc[i], (__m512bh)_mm512_loadu_si512(x + i * ldx + k + 32),
                                  (__m512bh)wb);
      }
    }
    for (; k + 32 <= K; k += 32) {
      const __m512bh wv = (__m512bh)widen.lanes(w + k, ~__mmask32(0));
      for (int i = 0; i < MB; ++i)
        acc[i] = _mm512_dpbf16_ps(acc[i], (__m512bh)_mm512_loadu_si512(x + i * ldx + k), wv);
    }
    if (k < K) {
      const __mmask32 mask = __mmask32((1u << (K - k)) - 1);
      const __m512bh wv = (__m512bh)widen.lanes(w + k, mask);
      for (int i = 0; i < MB; ++i)
        acc[i] = _mm512_dpbf16_ps(
            acc[i], (__m512bh)_mm512_maskz_loadu_epi16(mask, x + i * ldx + k), wv);
    }
    reduce_store<MB>(acc, out);
  }
};

// One row (batch-1 decode, memory bound): four accumulators keep four dot products in flight.
template <typename W>
struct DotRowsBf16<W, 1> {
  static void run(const W* w, const c10::BFloat16* x, int64_t, int64_t K, float* out) {
    const Widen<W> widen;
    __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(),
                     _mm512_setzero_ps()};
    const __mmask32 all = ~__mmask32(0);
    int64_t k = 0;
    for (; k + 128 <= K; k += 128) {  // (no software prefetch: it slows this one stream)
      __m512i wv[4];
      widen.pair(w + k, wv[0], wv[1]);
      widen.pair(w + k + 64, wv[2], wv[3]);
      for (int u = 0; u < 4; ++u)
        acc[u] = _mm512_dpbf16_ps(acc[u], (__m512bh)_mm512_loadu_si512(x + k + 32 * u),
                                  (__m512bh)wv[u]);
    }
    for (; k < K; k += 32) {
      const __mmask32 mask = K - k >= 32 ? all : __mmask32((1u << (K - k)) - 1);
      acc[0] = _mm512_dpbf16_ps(acc[0], (__m512bh)_mm512_maskz_loadu_epi16(mask, x + k),
                                (__m512bh)widen.lanes(w + k, mask));
    }
    out[0] = _mm512_reduce_add_ps(
        _mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3])));
  }
};

template <int MB>
struct DotRows<c10::BFloat16, c10::BFloat16, MB> : DotRowsBf16<c10::BFloat16, MB> {};
template <int MB>
struct DotRows<c10::BFloat16, c10::Float8_e4m3fn, MB> : DotRowsBf16<c10::Float8_e4m3fn, MB> {};
#endif

// out[j] = dot(w[j*ldw : j*ldw+K], x[0:K]) for nw <= 4 weight rows and one row of x.
template <typename T, typename W>
struct DotWeightRows {
  static void run(const W* w, int64_t ldw, const T* x, int64_t K, int64_t nw, float* out) {
    for (int64_t j = 0; j < nw; ++j) DotRows<T, W, 1>::run(w + j * ldw, x, K, K, out + j);
  }
};

#ifdef SKYMOE_AVX512_BF16
// Batch-1 decode over long weight rows (``kLongRow`` values or more): four rows at once. Four
// weight streams in flight keep more of the memory bandwidth busy than one (measured on 2 Zen 5
// cores, bf16: 32 vs 23-29 GB/s for rows of 4096; for rows of 512 one row at a time is faster,
// 25 vs 20 GB/s).
template <typename W>
struct DotWeightRowsBf16 {
  static void run(const W* w, int64_t ldw, const c10::BFloat16* x, int64_t K, int64_t nw,
                  float* out) {
    if (nw < 4) {
      for (int64_t j = 0; j < nw; ++j)
        DotRowsBf16<W, 1>::run(w + j * ldw, x, K, K, out + j);
      return;
    }
    const Widen<W> widen;
    __m512 acc[4][2];
    for (auto& a : acc) a[0] = a[1] = _mm512_setzero_ps();
    const __mmask32 all = ~__mmask32(0);
    int64_t k = 0;
    for (; k + 64 <= K; k += 64) {
      const __m512bh x0 = (__m512bh)_mm512_loadu_si512(x + k);
      const __m512bh x1 = (__m512bh)_mm512_loadu_si512(x + k + 32);
      for (int j = 0; j < 4; ++j) {
        __m512i wa, wb;
        widen.pair(w + j * ldw + k, wa, wb);
        acc[j][0] = _mm512_dpbf16_ps(acc[j][0], x0, (__m512bh)wa);
        acc[j][1] = _mm512_dpbf16_ps(acc[j][1], x1, (__m512bh)wb);
      }
    }
    for (; k < K; k += 32) {
      const __mmask32 mask = K - k >= 32 ? all : __mmask32((1u << (K - k)) - 1);
      const __m512bh x0 = (__m512bh)_mm512_maskz_loadu_epi16(mask, x + k);
      for (int j = 0; j < 4; ++j)
        acc[j][0] = _mm512_dpbf16_ps(acc[j][0], x0,
                                     (__m512bh)widen.lanes(w + j * ldw + k, mask));
    }
    for (int j = 0; j < 4; ++j)
      out[j] = _mm512_reduce_add_ps(_mm512_add_ps(acc[j][0], acc[j][1]));
  }
};

template <>
struct DotWeightRows<c10::BFloat16, c10::BFloat16> : DotWeightRowsBf16<c10::BFloat16> {};
template <>
struct DotWeightRows<c10::BFloat16, c10::Float8_e4m3fn>
    : DotWeightRowsBf16<c10::Float8_e4m3fn> {};
#endif

template <typename T, typename W = T>
void dot_rows(const W* w, const T* x, int64_t ldx, int64_t rows, int64_t K, float* out) {
  for (int64_t m = 0; m < rows; m += kRowBlock) {
    const T* xm = x + m * ldx;
    switch (std::min<int64_t>(kRowBlock, rows - m)) {
      case 1: DotRows<T, W, 1>::run(w, xm, ldx, K, out + m); break;
      case 2: DotRows<T, W, 2>::run(w, xm, ldx, K, out + m); break;
      case 3: DotRows<T, W, 3>::run(w, xm, ldx, K, out + m); break;
      case 4: DotRows<T, W, 4>::run(w, xm, ldx, K, out + m); break;
      case 5: DotRows<T, W, 5>::run(w, xm, ldx, K, out + m); break;
      case 6: DotRows<T, W, 6>::run(w, xm, ldx, K, out + m); break;
      case 7: DotRows<T, W, 7>::run(w, xm, ldx, K, out + m); break;
      default: DotRows<T, W, 8>::run(w, xm, ldx, K, out + m); break;
    }
  }
}

// Several matmuls sharing one parallel loop: for each group g, rows [first[g], first[g+1]) of
// x [*, K] times weight matrix mats[g] of w (each [N, K]) go to the same rows of y [*, N]
// (fp32). Threads split all groups' weight rows, so a layer's experts run without a barrier
// between experts. With FP8 weights, ``scale`` holds each weight row's scale (matrix m's row n
// at m * N + n), applied to the fp32 dot products; null for weights in the model dtype.
template <typename T, typename W>
void grouped_linear_f32(const T* x, int64_t K, const W* w, int64_t N,
                        const std::vector<int64_t>& mats, const std::vector<int64_t>& first,
                        float* y, const float* scale = nullptr) {
  const int64_t G = static_cast<int64_t>(mats.size());
  const int64_t grain = std::max<int64_t>(16, (1 << 15) / std::max<int64_t>(K, 1));
  at::parallel_for(0, G * N, grain, [&](int64_t i0, int64_t i1) {
    std::vector<float> col;
    for (int64_t i = i0; i < i1;) {
      const int64_t g = i / N, n = i % N, m0 = first[g], rows = first[g + 1] - m0;
      const int64_t row = mats[g] * N + n;
      if (rows == 1) {  // one row of x: long weight rows 4 at a time
        const int64_t nw = K >= kLongRow ? std::min<int64_t>(4, std::min(i1 - i, N - n)) : 1;
        float d[4];
        DotWeightRows<T, W>::run(w + row * K, K, x + m0 * K, K, nw, d);
        for (int64_t j = 0; j < nw; ++j)
          y[m0 * N + n + j] = d[j] * (scale ? scale[row + j] : 1.f);
        i += nw;
        continue;
      }
      col.resize(rows);
      dot_rows(w + row * K, x + m0 * K, K, rows, K, col.data());
      const float s = scale ? scale[row] : 1.f;
      for (int64_t m = 0; m < rows; ++m) y[(m0 + m) * N + n] = col[m] * s;
      ++i;
    }
  });
}

// y[M, N] (fp32) = x[M, K] @ w[N, K]^T (times the row scales), threads splitting the weight rows.
template <typename T, typename W>
void linear_f32(const T* x, int64_t M, int64_t K, const W* w, int64_t N, float* y,
                const float* scale = nullptr) {
  grouped_linear_f32(x, K, w, N, {0}, {0, M}, y, scale);
}

// The weights' element type for activations of type T: T itself, or FP8 e4m3 values with one
// fp32 scale per weight row (``scale``: ``rows`` of them). Calls fn with a W-typed null
// pointer and the scales' pointer (null without scales).
template <typename T, typename Fn>
void with_weights(const at::Tensor& w, const at::Tensor& scale, int64_t rows, const char* what,
                  Fn&& fn) {
  const bool scaled = scale.defined() && scale.numel() > 0;
  if (w.scalar_type() == at::kFloat8_e4m3fn) {
    TORCH_CHECK(scaled, what, ": FP8 weights need their row scales");
    check_cpu_contiguous(scale, what);
    TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.numel() == rows, what,
                ": FP8 weights need one fp32 scale per weight row (", rows, "), got ",
                scale.numel());
    fn(static_cast<const c10::Float8_e4m3fn*>(nullptr), scale.data_ptr<float>());
    return;
  }
  TORCH_CHECK(w.scalar_type() == c10::CppTypeToScalarType<T>::value, what,
              ": weight and input dtypes differ (weights must be in the input's dtype, or FP8 "
              "e4m3 with row scales)");
  TORCH_CHECK(!scaled, what, ": scales are for FP8 weights only");
  fn(static_cast<const T*>(nullptr), static_cast<const float*>(nullptr));
}

// with_weights for a layer's two weight tensors, which share their element type: calls
// fn(W-typed null pointer, a's scales, b's scales).
template <typename T, typename Fn>
void with_weight_pair(const at::Tensor& a, const at::Tensor& a_scale, int64_t a_rows,
                      const at::Tensor& b, const at::Tensor& b_scale, int64_t b_rows,
                      const char* what, Fn&& fn) {
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), what, ": both weights must share a dtype");
  with_weights<T>(a, a_scale, a_rows, what, [&](auto wt, const float* sa) {
    with_weights<T>(b, b_scale, b_rows, what, [&](auto, const float* sb) { fn(wt, sa, sb); });
  });
}

// The element type a with_weights callback's null pointer stands for.
template <typename P>
using Pointee = std::remove_cv_t<std::remove_pointer_t<P>>;

at::Tensor linear(at::Tensor x, at::Tensor w, std::optional<at::Tensor> row_scale) {
  const at::Tensor scale = row_scale.value_or(at::Tensor());
  check_cpu_contiguous(x, "x");
  check_cpu_contiguous(w, "weight");
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1),
              "linear: x [M, K] and weight [N, K] expected");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  auto y32 = at::empty({M, N}, x.options().dtype(at::kFloat));
  AT_DISPATCH_FLOATING_TYPES_AND(at::ScalarType::BFloat16, x.scalar_type(), "linear", [&] {
    with_weights<scalar_t>(w, scale, N, "linear", [&](auto wt, const float* s) {
      using W = Pointee<decltype(wt)>;
      linear_f32(x.data_ptr<scalar_t>(), M, K, static_cast<const W*>(w.data_ptr()), N,
                 y32.data_ptr<float>(), s);
    });
  });
  return y32.to(x.scalar_type());
}

// HF Llama/Mixtral RMSNorm: normalize in fp32, round to the dtype, then scale by the weight.
template <typename T>
void rms_norm_rows(const T* x, const T* w, int64_t M, int64_t H, double eps, T* y) {
  for (int64_t m = 0; m < M; ++m) {
    const T* xr = x + m * H;
    float ss = 0.f;
    for (int64_t h = 0; h < H; ++h) ss += to_f(xr[h]) * to_f(xr[h]);
    const float r = 1.f / std::sqrt(ss / H + static_cast<float>(eps));
    for (int64_t h = 0; h < H; ++h)
      y[m * H + h] = static_cast<T>(to_f(w[h]) * round_to<T>(to_f(xr[h]) * r));
  }
}

at::Tensor rms_norm(at::Tensor x, at::Tensor w, double eps) {
  check_cpu_contiguous(x, "x");
  check_cpu_contiguous(w, "weight");
  TORCH_CHECK(x.scalar_type() == w.scalar_type(), "rms_norm: x and weight dtypes differ");
  const int64_t H = x.size(-1);
  TORCH_CHECK(w.numel() == H, "rms_norm: weight size ", w.numel(), " != hidden size ", H);
  auto y = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES_AND(at::ScalarType::BFloat16, x.scalar_type(), "rms_norm", [&] {
    rms_norm_rows(x.data_ptr<scalar_t>(), w.data_ptr<scalar_t>(), x.numel() / H, H, eps,
                  y.data_ptr<scalar_t>());
  });
  return y;
}

// Rotate-half RoPE of one head vector in place, with the tables' signed sin (see
// RotaryEmbedding): v*cos + roll(v, D/2)*sin, each product and the sum rounded to T as the
// PyTorch path does with tables in T.
template <typename T>
void rope(float* v, const float* cos, const float* sin, int64_t D, float* tmp) {
  const int64_t half = D / 2;
  for (int64_t i = 0; i < D; ++i) {
    const float rolled = v[i < half ? i + half : i - half];
    tmp[i] = round_to<T>(round_to<T>(v[i] * round_to<T>(cos[i])) +
                         round_to<T>(rolled * round_to<T>(sin[i])));
  }
  std::copy(tmp, tmp + D, v);
}

// One decode step of attention for B sequences, one new token each: q/k/v projections, RoPE,
// the new k/v written into the cache, attention over positions [lo, pos] and the output
// projection. Cache tensors are [slots, kv_heads, L, D] (pos_dim 2) or [slots, L, kv_heads, D]
// (pos_dim 1); row b is cache slot rows[b] at position positions[b], with rotary cos and
// signed sin [B, D] at that position (or [D] shared by all rows).
template <typename T, typename W>
void attention_step(const T* h, int64_t B, int64_t H, const W* wqkv, const W* wo,
                    const float* sqkv, const float* so, const float* cos_BD,
                    const float* sin_BD, bool shared_rotary,
                    at::Tensor& kc, at::Tensor& vc, const int64_t* rows,
                    const int64_t* positions, int64_t pos_dim, int64_t heads,
                    int64_t kv_heads, int64_t D, int64_t window, float* out /* [B, H] fp32 */) {
  const int64_t nq = heads * D, nkv = kv_heads * D, nqkv = nq + 2 * nkv;
  std::vector<float> qkv(B * nqkv);
  linear_f32(h, B, H, wqkv, nqkv, qkv.data(), sqkv);
  T* kp = kc.data_ptr<T>();
  T* vp = vc.data_ptr<T>();
  const int64_t s_slot = kc.stride(0), s_pos = kc.stride(pos_dim), s_head = kc.stride(3 - pos_dim);
  std::vector<float> tmp(D);
  for (int64_t b = 0; b < B; ++b) {  // round to T, RoPE on q and k, store k/v
    float* r = qkv.data() + b * nqkv;
    for (int64_t i = 0; i < nqkv; ++i) r[i] = round_to<T>(r[i]);
    const float* c = cos_BD + (shared_rotary ? 0 : b * D);
    const float* s = sin_BD + (shared_rotary ? 0 : b * D);
    for (int64_t hd = 0; hd < heads + kv_heads; ++hd) rope<T>(r + hd * D, c, s, D, tmp.data());
    for (int64_t g = 0; g < kv_heads; ++g) {
      const int64_t off = rows[b] * s_slot + positions[b] * s_pos + g * s_head;
      for (int64_t d = 0; d < D; ++d) {
        kp[off + d] = static_cast<T>(r[nq + g * D + d]);
        vp[off + d] = static_cast<T>(r[nq + nkv + g * D + d]);
      }
    }
  }
  std::vector<T> attn(B * nq);
  const int64_t group = heads / kv_heads;
  const float scale = 1.f / std::sqrt(static_cast<float>(D));
  at::parallel_for(0, B * kv_heads, 1, [&](int64_t t0, int64_t t1) {
    std::vector<T> q(group * D);
    std::vector<float> scores, acc(D);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / kv_heads, g = t % kv_heads, pos = positions[b];
      const int64_t lo = window > 0 ? std::max<int64_t>(0, pos - window + 1) : 0, n = pos - lo + 1;
      const int64_t base = rows[b] * s_slot + g * s_head;
      const float* qf = qkv.data() + b * nqkv + g * group * D;
      for (int64_t i = 0; i < group * D; ++i) q[i] = static_cast<T>(qf[i]);
      scores.resize(group * n);
      // Each query head (already rounded to T) against the keys 8 at a time: the keys play the
      // rows of x, so the dot products of 8 positions are reduced together.
      for (int64_t j = 0; j < group; ++j) {
        float* sc = scores.data() + j * n;
        dot_rows(q.data() + j * D, kp + base + lo * s_pos, s_pos, n, D, sc);
        for (int64_t i = 0; i < n; ++i) sc[i] *= scale;
      }
      for (int64_t j = 0; j < group; ++j) {
        float* sc = scores.data() + j * n;
        const float mx = *std::max_element(sc, sc + n);
        float total = 0.f;
        for (int64_t i = 0; i < n; ++i) total += (sc[i] = std::exp(sc[i] - mx));
        std::fill(acc.begin(), acc.end(), 0.f);
        for (int64_t p = lo; p <= pos; ++p) {
          const T* v = vp + base + p * s_pos;
          const float wgt = sc[p - lo] / total;
          for (int64_t d = 0; d < D; ++d) acc[d] += wgt * to_f(v[d]);
        }
        T* o = attn.data() + b * nq + (g * group + j) * D;
        for (int64_t d = 0; d < D; ++d) o[d] = static_cast<T>(acc[d]);
      }
    }
  });
  linear_f32(attn.data(), B, nq, wo, H, out, so);
}

// Arguments: the step (input, rotary, caches, where each row goes), then the layer's weights
// (with FP8 weights, their row scales; empty tensors otherwise).
at::Tensor attention_decode(at::Tensor h, at::Tensor cos, at::Tensor sin,
                               at::Tensor kc, at::Tensor vc, at::Tensor rows,
                               at::Tensor positions, int64_t start, int64_t pos_dim,
                               at::Tensor wqkv, at::Tensor wo, int64_t heads,
                               int64_t kv_heads, int64_t window, at::Tensor wqkv_scale,
                               at::Tensor wo_scale) {
  for (auto* t : {&h, &wqkv, &wo, &rows, &positions})
    check_cpu_contiguous(*t, "attention_decode input");
  TORCH_CHECK(kc.dim() == 4 && vc.sizes() == kc.sizes() && kc.strides() == vc.strides() &&
              kc.scalar_type() == vc.scalar_type() && kc.device().is_cpu() &&
              vc.device().is_cpu(),
              "attention_decode: key and value caches must be 4-D CPU tensors of one layout");
  TORCH_CHECK(kc.stride(3) == 1, "attention_decode: cache head vectors must be contiguous");
  TORCH_CHECK(pos_dim == 1 || pos_dim == 2, "attention_decode: pos_dim must be 1 or 2");
  TORCH_CHECK(heads % kv_heads == 0, "attention_decode: heads must be a multiple of kv_heads");
  TORCH_CHECK(rows.scalar_type() == at::kLong && positions.scalar_type() == at::kLong,
              "attention_decode: rows and positions must be int64");
  const int64_t B = h.size(0), H = h.size(1), D = kc.size(3);
  TORCH_CHECK(wqkv.size(0) == (heads + 2 * kv_heads) * D && wqkv.size(1) == H &&
              wo.size(0) == H && wo.size(1) == heads * D,
              "attention_decode: projection shapes do not match heads/kv_heads/head_dim");
  // Empty rows/positions: row b is cache slot b, every row at position `start`.
  TORCH_CHECK((rows.numel() == B || rows.numel() == 0) &&
              (positions.numel() == B || positions.numel() == 0),
              "attention_decode: one cache row and position per sequence (or none) expected");
  std::vector<int64_t> row_of(B), pos_of(B, start);
  for (int64_t b = 0; b < B; ++b) row_of[b] = rows.numel() ? rows.data_ptr<int64_t>()[b] : b;
  if (positions.numel()) std::copy_n(positions.data_ptr<int64_t>(), B, pos_of.begin());
  const int64_t max_pos = *std::max_element(pos_of.begin(), pos_of.end());
  for (int64_t r : row_of)
    TORCH_CHECK(r >= 0 && r < kc.size(0), "attention_decode: cache row ", r, " out of range");
  TORCH_CHECK(*std::min_element(pos_of.begin(), pos_of.end()) >= 0,
              "attention_decode: negative position");
  TORCH_CHECK(max_pos < kc.size(pos_dim), "attention_decode: position ", max_pos,
              " beyond the cache's ", kc.size(pos_dim));
  TORCH_CHECK(cos.numel() == sin.numel() && (cos.numel() == B * D || cos.numel() == D),
              "attention_decode: rotary cos/sin of [B, head_dim] or [head_dim] expected");
  const auto cos32 = cos.to(at::kFloat).contiguous(), sin32 = sin.to(at::kFloat).contiguous();
  auto out32 = at::empty({B, H}, h.options().dtype(at::kFloat));
  AT_DISPATCH_FLOATING_TYPES_AND(at::ScalarType::BFloat16, h.scalar_type(), "attention", [&] {
    TORCH_CHECK(kc.scalar_type() == h.scalar_type(),
                "attention_decode: cache and input must share a dtype");
    with_weight_pair<scalar_t>(
        wqkv, wqkv_scale, wqkv.size(0), wo, wo_scale, H, "attention_decode qkv and o",
        [&](auto wt, const float* sqkv, const float* so) {
          using W = Pointee<decltype(wt)>;
          attention_step<scalar_t, W>(h.data_ptr<scalar_t>(), B, H,
                                      static_cast<const W*>(wqkv.data_ptr()),
                                      static_cast<const W*>(wo.data_ptr()), sqkv, so,
                                      cos32.data_ptr<float>(), sin32.data_ptr<float>(),
                                      cos.numel() == D, kc, vc, row_of.data(), pos_of.data(),
                                      pos_dim, heads, kv_heads, D, window,
                                      out32.data_ptr<float>());
        });
  });
  return out32.to(h.scalar_type());
}

// SwiGLU experts for a few tokens: the tokens of each chosen expert are gathered, multiplied
// through w13 (rounded to T), silu(gate) * up (each rounded to T, as F.silu and the product
// are), w2 (rounded to T), weighted and summed per token in fp32. FP8 weights: their row
// scales (s13 [E, 2F], s2 [E, H]) multiply the fp32 dot products before the rounding.
template <typename T, typename W>
void experts_step(const T* x, int64_t Tn, int64_t H, const W* w13, const W* w2,
                  const float* s13, const float* s2, int64_t E, int64_t F, const int64_t* ids,
                  const float* weights, int64_t k, float* out) {
  std::vector<std::vector<int64_t>> slots(E);  // (token * k + slot) per expert
  for (int64_t i = 0; i < Tn * k; ++i) {
    TORCH_CHECK(ids[i] >= 0 && ids[i] < E, "experts_decode: expert id ", ids[i], " out of range");
    slots[ids[i]].push_back(i);
  }
  std::vector<int64_t> used, first{0};  // experts with tokens; where their rows start
  for (int64_t e = 0; e < E; ++e)
    if (!slots[e].empty()) {
      used.push_back(e);
      first.push_back(first.back() + static_cast<int64_t>(slots[e].size()));
    }
  const int64_t rows = first.back();
  std::vector<int64_t> token(rows), slot(rows);  // row -> (token, its (token * k + slot))
  for (size_t g = 0, r = 0; g < used.size(); ++g)
    for (int64_t i : slots[used[g]]) token[r] = i / k, slot[r++] = i;
  std::vector<T> xs(rows * H);
  for (int64_t r = 0; r < rows; ++r)
    std::copy(x + token[r] * H, x + (token[r] + 1) * H, xs.begin() + r * H);
  std::vector<float> gu(rows * 2 * F);
  grouped_linear_f32(xs.data(), H, w13, 2 * F, used, first, gu.data(), s13);
  std::vector<T> act(rows * F);
  at::parallel_for(0, rows * F, 4096, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t r = i / F, f = i % F;
      const float g = round_to<T>(gu[r * 2 * F + f]), u = round_to<T>(gu[r * 2 * F + F + f]);
      act[i] = static_cast<T>(round_to<T>(g / (1.f + std::exp(-g))) * u);
    }
  });
  std::vector<float> y(rows * H);
  grouped_linear_f32(act.data(), F, w2, H, used, first, y.data(), s2);
  std::fill(out, out + Tn * H, 0.f);
  for (int64_t r = 0; r < rows; ++r) {
    float* o = out + token[r] * H;
    const float wgt = weights[slot[r]];
    for (int64_t j = 0; j < H; ++j) o[j] += wgt * round_to<T>(y[r * H + j]);
  }
}

at::Tensor experts_decode(at::Tensor x, at::Tensor w13, at::Tensor w2,
                             at::Tensor ids, at::Tensor weights,
                             std::optional<at::Tensor> w13_row_scale,
                             std::optional<at::Tensor> w2_row_scale) {
  const at::Tensor w13_scale = w13_row_scale.value_or(at::Tensor());
  const at::Tensor w2_scale = w2_row_scale.value_or(at::Tensor());
  for (auto* t : {&x, &w13, &w2, &ids, &weights}) check_cpu_contiguous(*t, "experts_decode input");
  TORCH_CHECK(ids.scalar_type() == at::kLong && weights.scalar_type() == at::kFloat,
              "experts_decode: ids must be int64 and weights fp32");
  TORCH_CHECK(x.dim() == 2 && w13.dim() == 3 && w2.dim() == 3 && ids.sizes() == weights.sizes() &&
              ids.size(0) == x.size(0), "experts_decode: shapes do not match");
  const int64_t Tn = x.size(0), H = x.size(1), E = w13.size(0), F = w2.size(2);
  TORCH_CHECK(w13.size(1) == 2 * F && w13.size(2) == H && w2.size(0) == E && w2.size(1) == H,
              "experts_decode: w13 [E, 2F, H] and w2 [E, H, F] expected");
  auto out32 = at::empty({Tn, H}, x.options().dtype(at::kFloat));
  AT_DISPATCH_FLOATING_TYPES_AND(at::ScalarType::BFloat16, x.scalar_type(), "experts", [&] {
    with_weight_pair<scalar_t>(
        w13, w13_scale, E * 2 * F, w2, w2_scale, E * H, "experts_decode w13 and w2",
        [&](auto wt, const float* s13, const float* s2) {
          using W = Pointee<decltype(wt)>;
          experts_step<scalar_t, W>(x.data_ptr<scalar_t>(), Tn, H,
                                    static_cast<const W*>(w13.data_ptr()),
                                    static_cast<const W*>(w2.data_ptr()), s13, s2, E, F,
                                    ids.data_ptr<int64_t>(), weights.data_ptr<float>(),
                                    ids.size(1), out32.data_ptr<float>());
        });
  });
  return out32.to(x.scalar_type());
}

// Skywork-MoE routing of B tokens (moe.py's router_logits + route): fp32 gate logits,
// optional gating logit normalization (unbiased std, guarded by norm_eps), softmax, top-k and
// renormalization of the k weights.
template <typename T>
void route_step(const T* h, int64_t B, int64_t H, const float* gate, const float* bias,
                int64_t E, int64_t k, bool use_norm, float norm_scale, float norm_eps,
                int64_t* ids, float* weights) {
  std::vector<float> hf(H), logits(E), score(E);
  std::vector<int64_t> order(E);
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t j = 0; j < H; ++j) hf[j] = to_f(h[b * H + j]);
    for (int64_t e = 0; e < E; ++e)
      DotRows<float, float, 1>::run(gate + e * H, hf.data(), H, H, &logits[e]);
    if (use_norm) {
      float mean = 0.f, var = 0.f;
      for (float z : logits) mean += z;
      mean /= E;
      for (float z : logits) var += (z - mean) * (z - mean);
      const float stdev = std::max(std::sqrt(var / (E - 1)), norm_eps);
      for (float& z : logits) z = (z - mean) * (norm_scale / stdev);
    }
    const float mx = *std::max_element(logits.begin(), logits.end());
    float total = 0.f;
    for (float& z : logits) total += (z = std::exp(z - mx));
    for (float& z : logits) z /= total;
    // The choice ranks probability + routing bias (when the layer has one); the weights are
    // the chosen probabilities.
    for (int64_t e = 0; e < E; ++e) {
      order[e] = e;
      score[e] = bias ? logits[e] + bias[e] : logits[e];
    }
    std::partial_sort(order.begin(), order.begin() + k, order.end(), [&](int64_t a, int64_t c) {
      return score[a] > score[c] || (score[a] == score[c] && a < c);
    });
    float chosen = 0.f;
    for (int64_t i = 0; i < k; ++i) chosen += logits[order[i]];
    for (int64_t i = 0; i < k; ++i) {
      ids[b * k + i] = order[i];
      weights[b * k + i] = logits[order[i]] / chosen;
    }
  }
}

// A whole pre-norm MoE decoder layer for one new token per sequence:
// x1 = x + attention(rms_norm(x)); out = x1 + experts(route(rms_norm(x1))).
// Arguments: the step as for attention_decode, then the layer's norms, attention and MoE.
at::Tensor moe_layer_decode(at::Tensor x, at::Tensor cos, at::Tensor sin,
                               at::Tensor kc, at::Tensor vc, at::Tensor rows,
                               at::Tensor positions, int64_t start, int64_t pos_dim,
                               at::Tensor ln1, at::Tensor ln2, double eps,
                               at::Tensor wqkv, at::Tensor wo, int64_t heads,
                               int64_t kv_heads, int64_t window, at::Tensor wqkv_scale,
                               at::Tensor wo_scale, at::Tensor gate, at::Tensor bias,
                               int64_t top_k, bool use_norm, double norm_scale, double norm_eps,
                               bool mul_topk, at::Tensor w13, at::Tensor w2,
                               at::Tensor w13_scale, at::Tensor w2_scale) {
  check_cpu_contiguous(x, "x");
  check_cpu_contiguous(gate, "gate");
  TORCH_CHECK(gate.scalar_type() == at::kFloat && gate.dim() == 2 && gate.size(1) == x.size(1),
              "moe_layer_decode: fp32 gate [E, H] expected");
  const int64_t B = x.size(0), H = x.size(1), E = gate.size(0);
  const bool has_bias = bias.numel() > 0;  // an empty tensor: the layer has no routing bias
  if (has_bias) {
    check_cpu_contiguous(bias, "bias");
    TORCH_CHECK(bias.scalar_type() == at::kFloat && bias.dim() == 1 && bias.size(0) == E,
                "moe_layer_decode: fp32 routing bias [E] expected");
  }
  TORCH_CHECK(top_k >= 1 && top_k <= E, "moe_layer_decode: top_k must be in [1, E]");
  auto h1 = rms_norm(x, ln1, eps);
  auto attn = attention_decode(h1, cos, sin, kc, vc, rows, positions, start, pos_dim, wqkv, wo,
                               heads, kv_heads, window, wqkv_scale, wo_scale);
  auto x1 = x + attn;  // both in T: one rounding, as in the module
  auto h2 = rms_norm(x1, ln2, eps);
  auto ids = at::empty({B, top_k}, x.options().dtype(at::kLong));
  auto weights = at::empty({B, top_k}, x.options().dtype(at::kFloat));
  AT_DISPATCH_FLOATING_TYPES_AND(at::ScalarType::BFloat16, x.scalar_type(), "route", [&] {
    route_step<scalar_t>(h2.data_ptr<scalar_t>(), B, H, gate.data_ptr<float>(),
                         has_bias ? bias.data_ptr<float>() : nullptr, E, top_k, use_norm, static_cast<float>(norm_scale), static_cast<float>(norm_eps),
                         ids.data_ptr<int64_t>(), weights.data_ptr<float>());
  });
  auto expert_in = mul_topk ? h2 * static_cast<double>(top_k) : h2;
  return x1 + experts_decode(expert_in, w13, w2, ids, weights, w13_scale, w2_scale);
}

// FP8 e4m3 values widened to bf16 (exact), at memory speed: what the GEMMs of a prefill read.
// Into ``into`` when given (a reused buffer: a fresh large one faults its pages in first).
at::Tensor fp8_to_bf16(at::Tensor w, std::optional<at::Tensor> into) {
  check_cpu_contiguous(w, "fp8_to_bf16 input");
  TORCH_CHECK(w.scalar_type() == at::kFloat8_e4m3fn, "fp8_to_bf16: float8_e4m3fn values expected");
  auto out = into.has_value() ? *into : at::empty(w.sizes(), w.options().dtype(at::kBFloat16));
  check_cpu_contiguous(out, "fp8_to_bf16 output");
  TORCH_CHECK(out.scalar_type() == at::kBFloat16 && out.numel() == w.numel(),
              "fp8_to_bf16: a bf16 output of the input's size expected");
  const auto* src = w.data_ptr<c10::Float8_e4m3fn>();
  auto* dst = out.data_ptr<c10::BFloat16>();
  at::parallel_for(0, w.numel(), 1 << 16, [&](int64_t i0, int64_t i1) {
    int64_t i = i0;
#ifdef SKYMOE_AVX512_BF16
    const Widen<c10::Float8_e4m3fn> widen;
    for (; i + 64 <= i1; i += 64) {
      __m512i a, b;
      widen.pair(src + i, a, b);
      _mm512_storeu_si512(dst + i, a);
      _mm512_storeu_si512(dst + i + 32, b);
    }
#endif
    for (; i < i1; ++i) dst[i] = c10::BFloat16(static_cast<float>(src[i]));
  });
  return out;
}

bool has_avx512_bf16() {
#ifdef SKYMOE_AVX512_BF16
  return true;
#else
  return false;
#endif
}

}  // namespace skymoe
