// Native CPU kernels for training's elementwise hot spots, where PyTorch makes one pass over
// memory per op (and SwiGLU's backward adds a concatenation): the SwiGLU activation, forward and
// backward, and the cross-entropy's log-sum-exp and gradient. Each kernel reads its inputs once
// and writes its outputs once, computing in fp32 and rounding to the tensor dtype exactly where
// the PyTorch ops it replaces round, so results match them up to the last bit of exp.

#include "common.h"
#include "kernels.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace skymoe {
namespace {

// e^x to about 2 ulp (Cephes' expf polynomial), written so that loops calling it vectorize:
// std::exp does not without -ffast-math. NaN propagates; the input is clamped to [-87, 88].
inline float exp_vec(float x) {
  constexpr float kShift = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  constexpr uint32_t kShiftBits = 0x4B400000u;
  x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
  float t = x * 1.44269504088896341f + kShift;
  const float n = t - kShift;  // round(x / ln 2)
  float r = x - n * 0.693359375f;
  r += n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  uint32_t bits;
  std::memcpy(&bits, &t, sizeof bits);
  bits = (bits - kShiftBits + 127u) << 23;  // 2^n
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

// Rows per parallel task: enough elements per task to amortize the scheduling.
inline int64_t rows_grain(int64_t row_elements) {
  return std::max<int64_t>(1, 32768 / std::max<int64_t>(row_elements, 1));
}

// y = silu(gate) * up for rows h = [gate | up] ([S, 2F] -> [S, F]); as PyTorch computes
// F.silu(gate) * up: silu = x / (1 + e^-x) rounded to T, then the product rounded to T.
template <typename T>
void swiglu_forward_rows(const T* h, T* y, int64_t S, int64_t F) {
  at::parallel_for(0, S, rows_grain(F), [&](int64_t s0, int64_t s1) {
    for (int64_t s = s0; s < s1; ++s) {
      const T* __restrict gate = h + s * 2 * F;
      const T* __restrict up = gate + F;
      T* __restrict out = y + s * F;
      for (int64_t j = 0; j < F; ++j) {
        const float g = to_f(gate[j]);
        const float act = round_to<T>(g / (1.0f + exp_vec(-g)));
        out[j] = static_cast<T>(act * to_f(up[j]));
      }
    }
  });
}

// dh = [d gate | d up] from h and dy, as autograd computes it through mul and silu:
// d up = dy * silu(gate), d silu = dy * up (each rounded to T), and
// d gate = d silu * sigmoid * (1 + gate * (1 - sigmoid)) (silu_backward), rounded to T.
// dh may be h itself: each row's d gate waits in a row buffer until the row is read.
template <typename T>
void swiglu_backward_rows(const T* h, const T* dy, T* dh, int64_t S, int64_t F) {
  at::parallel_for(0, S, rows_grain(F), [&](int64_t s0, int64_t s1) {
    std::vector<T> d_gate_row(F);
    T* __restrict d_gate_buf = d_gate_row.data();
    for (int64_t s = s0; s < s1; ++s) {
      const T* gate = h + s * 2 * F;
      const T* up = gate + F;
      const T* __restrict grad = dy + s * F;
      // One output per pass (each vectorizes); the row stays in L1.
      for (int64_t j = 0; j < F; ++j) {
        const float g = to_f(gate[j]);
        const float sig = 1.0f / (1.0f + exp_vec(-g));
        const float d_act = round_to<T>(to_f(grad[j]) * to_f(up[j]));
        d_gate_buf[j] = static_cast<T>(d_act * sig * (1.0f + g * (1.0f - sig)));
      }
      T* d_up = dh + s * 2 * F + F;  // may overwrite up, which is no longer read
      for (int64_t j = 0; j < F; ++j) {
        const float g = to_f(gate[j]);
        d_up[j] = static_cast<T>(to_f(grad[j]) * round_to<T>(g / (1.0f + exp_vec(-g))));
      }
      std::copy(d_gate_buf, d_gate_buf + F, dh + s * 2 * F);
    }
  });
}

void check_swiglu_input(const at::Tensor& h) {
  check_cpu_contiguous(h, "swiglu input");
  TORCH_CHECK(h.dim() >= 1 && h.size(-1) % 2 == 0,
              "swiglu: input [..., 2F] ([gate | up]) expected, got ", h.sizes());
}

// One row of logits: returns log(sum(exp(x))) in fp32; with grad, writes
// (softmax(x) - onehot(label)) * scale in T. buf holds V floats (the row's exponentials).
// The reductions are explicitly reassociated (omp simd) so they vectorize.
template <typename T>
float row_cross_entropy(const T* __restrict x, int64_t V, int64_t label, float scale,
                        float* __restrict buf, T* __restrict grad) {
  float mx = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : mx)
  for (int64_t v = 0; v < V; ++v) mx = std::max(mx, to_f(x[v]));
  float total = 0.f;
#pragma omp simd reduction(+ : total)
  for (int64_t v = 0; v < V; ++v) {
    buf[v] = exp_vec(to_f(x[v]) - mx);
    total += buf[v];
  }
  if (grad != nullptr) {
    const float k = scale / total;
    for (int64_t v = 0; v < V; ++v) grad[v] = static_cast<T>(buf[v] * k);
    grad[label] = static_cast<T>((buf[label] / total - 1.0f) * scale);
  }
  return mx + std::log(total);
}

// out[t] = sum over k of w[t, k] * y[pos[t, k]] (w = 1 without weights), summed in fp32 in the
// order of k and rounded once to O; positions outside [0, S) (dropped assignments) add nothing.
// As PyTorch computes (y * w) (fp32), gathered by position, summed over k, cast to O.
template <typename T, typename O>
void combine_rows_impl(const T* y, int64_t S, int64_t H, const int64_t* pos, const float* w,
                       int64_t rows, int64_t K, O* out) {
  at::parallel_for(0, rows, rows_grain(H * K), [&](int64_t t0, int64_t t1) {
    std::vector<float> acc(H);
    for (int64_t t = t0; t < t1; ++t) {
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t k = 0; k < K; ++k) {
        const int64_t p = pos[t * K + k];
        if (p < 0 || p >= S) continue;
        const float wk = w == nullptr ? 1.0f : w[t * K + k];
        const T* __restrict src = y + p * H;
        float* __restrict a = acc.data();
        for (int64_t h = 0; h < H; ++h) a[h] += to_f(src[h]) * wk;
      }
      O* __restrict dst = out + t * H;
      for (int64_t h = 0; h < H; ++h) dst[h] = static_cast<O>(acc[h]);
    }
  });
}

// Backward of the weighted combine: d y[pos[t, k]] = w[t, k] * d out[t] (rounded to T) and
// d w[t, k] = dot(d out[t], y[pos[t, k]]) in fp32 (0 for dropped assignments). Every row of
// y is one kept assignment, so each row of d y is written exactly once.
template <typename T, typename O>
void combine_rows_backward_impl(const O* grad_out, const T* y, int64_t S, int64_t H,
                                const int64_t* pos, const float* w, int64_t rows, int64_t K,
                                T* grad_y, float* grad_w) {
  at::parallel_for(0, rows, rows_grain(H * K), [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const O* __restrict g = grad_out + t * H;
      for (int64_t k = 0; k < K; ++k) {
        const int64_t p = pos[t * K + k];
        if (p < 0 || p >= S) {
          grad_w[t * K + k] = 0.f;
          continue;
        }
        const float wk = w[t * K + k];
        const T* __restrict src = y + p * H;
        T* __restrict dst = grad_y + p * H;
        float dot = 0.f;
#pragma omp simd reduction(+ : dot)
        for (int64_t h = 0; h < H; ++h) {
          const float gh = to_f(g[h]);
          dst[h] = static_cast<T>(gh * wk);
          dot += gh * to_f(src[h]);
        }
        grad_w[t * K + k] = dot;
      }
    }
  });
}

void check_combine_args(const at::Tensor& y, const at::Tensor& pos,
                        const std::optional<at::Tensor>& weights) {
  check_cpu_contiguous(y, "combine_rows rows");
  check_cpu_contiguous(pos, "combine_rows positions");
  TORCH_CHECK(y.dim() == 2 && pos.dim() == 2 && pos.scalar_type() == at::kLong,
              "combine_rows: rows [S, H] and int64 positions [T, K] expected");
  if (weights.has_value()) {
    check_cpu_contiguous(*weights, "combine_rows weights");
    TORCH_CHECK(weights->scalar_type() == at::kFloat && weights->sizes() == pos.sizes(),
                "combine_rows: fp32 weights shaped like the positions expected");
  }
}

}  // namespace

at::Tensor swiglu_forward(at::Tensor h) {
  check_swiglu_input(h);
  const int64_t F = h.size(-1) / 2, S = h.numel() / std::max<int64_t>(2 * F, 1);
  auto out_shape = h.sizes().vec();
  out_shape.back() = F;
  auto y = at::empty(out_shape, h.options());
  AT_DISPATCH_FLOATING_TYPES_AND(at::ScalarType::BFloat16, h.scalar_type(), "swiglu", [&] {
    swiglu_forward_rows(h.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), S, F);
  });
  return y;
}

// With in_place, the gradient overwrites h (for callers whose h is used by nothing else).
at::Tensor swiglu_backward(at::Tensor h, at::Tensor dy, bool in_place) {
  check_swiglu_input(h);
  check_cpu_contiguous(dy, "swiglu gradient");
  const int64_t F = h.size(-1) / 2, S = h.numel() / std::max<int64_t>(2 * F, 1);
  TORCH_CHECK(dy.scalar_type() == h.scalar_type() && dy.numel() == S * F,
              "swiglu_backward: gradient of shape [..., F] and the input's dtype expected");
  auto dh = in_place ? h : at::empty_like(h);
  AT_DISPATCH_FLOATING_TYPES_AND(at::ScalarType::BFloat16, h.scalar_type(), "swiglu_bwd", [&] {
    swiglu_backward_rows(h.data_ptr<scalar_t>(), dy.data_ptr<scalar_t>(),
                         dh.data_ptr<scalar_t>(), S, F);
  });
  return dh;
}

// Row-wise log-sum-exp of logits [N, V] (fp32 [N]); with grad (a tensor like logits), also
// writes the mean cross-entropy's gradient rows (softmax - onehot(labels)) * scale.
at::Tensor cross_entropy_rows(at::Tensor logits, at::Tensor labels, at::Tensor scale,
                                 std::optional<at::Tensor> grad) {
  check_cpu_contiguous(logits, "logits");
  check_cpu_contiguous(labels, "labels");
  check_cpu_contiguous(scale, "scale");
  TORCH_CHECK(logits.dim() == 2, "cross_entropy_rows: logits [N, V] expected");
  const int64_t N = logits.size(0), V = logits.size(1);
  TORCH_CHECK(labels.scalar_type() == at::kLong && labels.numel() == N,
              "cross_entropy_rows: int64 labels [N] expected");
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.numel() == N,
              "cross_entropy_rows: fp32 scale [N] expected");
  TORCH_CHECK(N == 0 || (labels.min().item<int64_t>() >= 0 && labels.max().item<int64_t>() < V),
              "cross_entropy_rows: labels must lie in [0, ", V, ")");
  if (grad.has_value()) {
    check_cpu_contiguous(*grad, "grad");
    TORCH_CHECK(grad->sizes() == logits.sizes() && grad->scalar_type() == logits.scalar_type(),
                "cross_entropy_rows: grad must have the logits' shape and dtype");
  }
  auto lse = at::empty({N}, logits.options().dtype(at::kFloat));
  const int64_t* lab = labels.data_ptr<int64_t>();
  const float* sc = scale.data_ptr<float>();
  float* out = lse.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND(at::ScalarType::BFloat16, logits.scalar_type(), "ce_rows", [&] {
    const scalar_t* x = logits.data_ptr<scalar_t>();
    scalar_t* g = grad.has_value() ? grad->data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, N, rows_grain(V), [&](int64_t n0, int64_t n1) {
      std::vector<float> buf(V);
      for (int64_t n = n0; n < n1; ++n)
        out[n] = row_cross_entropy(x + n * V, V, lab[n], sc[n], buf.data(),
                                   g == nullptr ? nullptr : g + n * V);
    });
  });
  return lse;
}

// Rows of y summed back per token (see combine_rows_impl); fp32 output when float_out, else
// y's dtype.
at::Tensor combine_rows(at::Tensor y, at::Tensor pos, std::optional<at::Tensor> weights,
                        bool float_out) {
  check_combine_args(y, pos, weights);
  const int64_t S = y.size(0), H = y.size(1), rows = pos.size(0), K = pos.size(1);
  auto out = at::empty({rows, H}, y.options().dtype(float_out ? at::kFloat : y.scalar_type()));
  const float* w = weights.has_value() ? weights->data_ptr<float>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND(at::ScalarType::BFloat16, y.scalar_type(), "combine", [&] {
    const scalar_t* yp = y.data_ptr<scalar_t>();
    if (float_out)
      combine_rows_impl(yp, S, H, pos.data_ptr<int64_t>(), w, rows, K, out.data_ptr<float>());
    else
      combine_rows_impl(yp, S, H, pos.data_ptr<int64_t>(), w, rows, K,
                        out.data_ptr<scalar_t>());
  });
  return out;
}

// Gradients (d y, d weights) of the weighted combine_rows.
std::vector<at::Tensor> combine_rows_backward(at::Tensor grad_out, at::Tensor y, at::Tensor pos,
                                              at::Tensor weights) {
  check_combine_args(y, pos, weights);
  check_cpu_contiguous(grad_out, "combine_rows gradient");
  const int64_t S = y.size(0), H = y.size(1), rows = pos.size(0), K = pos.size(1);
  const bool float_grad = grad_out.scalar_type() == at::kFloat;
  TORCH_CHECK(grad_out.sizes() == at::IntArrayRef({rows, H}) &&
                  (float_grad || grad_out.scalar_type() == y.scalar_type()),
              "combine_rows_backward: gradient [T, H] in fp32 or the rows' dtype expected");
  auto grad_y = at::empty_like(y);
  auto grad_w = at::empty_like(weights);
  AT_DISPATCH_FLOATING_TYPES_AND(at::ScalarType::BFloat16, y.scalar_type(), "combine_bwd", [&] {
    const scalar_t* yp = y.data_ptr<scalar_t>();
    const int64_t* pp = pos.data_ptr<int64_t>();
    const float* wp = weights.data_ptr<float>();
    if (float_grad)
      combine_rows_backward_impl(grad_out.data_ptr<float>(), yp, S, H, pp, wp, rows, K,
                                 grad_y.data_ptr<scalar_t>(), grad_w.data_ptr<float>());
    else
      combine_rows_backward_impl(grad_out.data_ptr<scalar_t>(), yp, S, H, pp, wp, rows, K,
                                 grad_y.data_ptr<scalar_t>(), grad_w.data_ptr<float>());
  });
  return {grad_y, grad_w};
}

}  // namespace skymoe
