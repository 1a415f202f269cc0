// The Python module of skymoe's native CPU kernels: decoding (decode.cpp) and training's fused
// elementwise work (train.cpp). The only file that includes torch/extension.h.
#include <torch/extension.h>

#include "kernels.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using namespace skymoe;
  m.def("linear", &linear,
        "x [M, K] @ weight [N, K]^T for small M (FP8 weights: times their row scales)",
        pybind11::arg("x"), pybind11::arg("weight"), pybind11::arg("scale") = pybind11::none());
  m.def("rms_norm", &rms_norm, "HF-order RMSNorm over the last dimension");
  m.def("attention_decode", &attention_decode, "one decode step of attention");
  m.def("experts_decode", &experts_decode,
        "SwiGLU experts for a few routed tokens (FP8 weights: with their row scales)",
        pybind11::arg("x"), pybind11::arg("w13"), pybind11::arg("w2"), pybind11::arg("ids"),
        pybind11::arg("weights"), pybind11::arg("w13_scale") = pybind11::none(),
        pybind11::arg("w2_scale") = pybind11::none());
  m.def("moe_layer_decode", &moe_layer_decode, "one decode step of a whole MoE decoder layer");
  m.def("fp8_to_bf16", &fp8_to_bf16, "FP8 e4m3 values widened to bf16 (exact)",
        pybind11::arg("w"), pybind11::arg("into") = pybind11::none());
  m.def("has_avx512_bf16", &has_avx512_bf16, "whether the build uses AVX512-BF16");
  m.def("swiglu_forward", &swiglu_forward, "silu(gate) * up of h = [gate | up]");
  m.def("swiglu_backward", &swiglu_backward,
        "gradient [d gate | d up] of swiglu_forward (written over h when in_place)");
  m.def("cross_entropy_rows", &cross_entropy_rows,
        "row log-sum-exp of logits and, optionally, the cross-entropy gradient rows",
        pybind11::arg("logits"), pybind11::arg("labels"), pybind11::arg("scale"),
        pybind11::arg("grad") = pybind11::none());
  m.def("combine_rows", &combine_rows,
        "per-token weighted sums of expert-sorted rows (dropped positions add nothing)");
  m.def("combine_rows_backward", &combine_rows_backward,
        "gradients of the rows and weights of combine_rows");
}
