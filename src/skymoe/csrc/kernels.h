// The entry points of skymoe's native CPU kernels, bound to Python in module.cpp. The kernel
// files include only ATen (not torch/extension.h), which keeps the first-use build short.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <vector>

namespace skymoe {

// decode.cpp: decoding a few tokens per step.
at::Tensor linear(at::Tensor x, at::Tensor w, std::optional<at::Tensor> row_scale);
at::Tensor rms_norm(at::Tensor x, at::Tensor w, double eps);
at::Tensor attention_decode(at::Tensor h, at::Tensor cos, at::Tensor sin, at::Tensor kc,
                            at::Tensor vc, at::Tensor rows, at::Tensor positions, int64_t start,
                            int64_t pos_dim, at::Tensor wqkv, at::Tensor wo, int64_t heads,
                            int64_t kv_heads, int64_t window, at::Tensor wqkv_scale,
                            at::Tensor wo_scale);
at::Tensor experts_decode(at::Tensor x, at::Tensor w13, at::Tensor w2, at::Tensor ids,
                          at::Tensor weights, std::optional<at::Tensor> w13_row_scale,
                          std::optional<at::Tensor> w2_row_scale);
at::Tensor moe_layer_decode(at::Tensor x, at::Tensor cos, at::Tensor sin, at::Tensor kc,
                            at::Tensor vc, at::Tensor rows, at::Tensor positions, int64_t start,
                            int64_t pos_dim, at::Tensor ln1, at::Tensor ln2, double eps,
                            at::Tensor wqkv, at::Tensor wo, int64_t heads, int64_t kv_heads,
                            int64_t window, at::Tensor wqkv_scale, at::Tensor wo_scale,
                            at::Tensor gate, at::Tensor bias, int64_t top_k, bool use_norm,
                            double norm_scale, double norm_eps, bool mul_topk, at::Tensor w13,
                            at::Tensor w2, at::Tensor w13_scale, at::Tensor w2_scale);
at::Tensor fp8_to_bf16(at::Tensor w, std::optional<at::Tensor> into);
bool has_avx512_bf16();

// train.cpp: training's fused elementwise work.
at::Tensor swiglu_forward(at::Tensor h);
at::Tensor swiglu_backward(at::Tensor h, at::Tensor dy, bool in_place);
at::Tensor cross_entropy_rows(at::Tensor logits, at::Tensor labels, at::Tensor scale,
                              std::optional<at::Tensor> grad);
at::Tensor combine_rows(at::Tensor y, at::Tensor pos, std::optional<at::Tensor> weights,
                        bool float_out);
std::vector<at::Tensor> combine_rows_backward(at::Tensor grad_out, at::Tensor y, at::Tensor pos,
                                              at::Tensor weights);

}  // namespace skymoe
