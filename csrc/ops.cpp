// Schemas of the fused_residual ops (the op layer; see docs/op_layer.md) and the Python
// module init. Kernels register per dispatch key in csrc/cpu/ and csrc/cuda/; fake
// kernels are in fused_residual/ops.py.
#include <Python.h>

#include <ATen/core/enum_tag.h>
#include <torch/library.h>

extern "C" {
// `import fused_residual._C` loads this shared library, which runs the static
// TORCH_LIBRARY initializers below; the module itself has no Python members.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",
      "fused_residual C++/CUDA kernels, registered as torch.ops.fused_residual.*",
      -1,
      nullptr,
  };
  return PyModule_Create(&module_def);
}
}

// Tagged flexible_layout: every op takes its tensors in any strides and returns its element
// outputs in the input's working layout (docs/op_layer.md), which the fake kernels in
// fused_residual/ops.py compute from the input's strides. Without a tag, Inductor applies its
// default custom-op constraint and hands each op its inputs in the strides they had when the
// graph was traced; on CPU, where Inductor turns the convolutions of an NCHW model to
// channels_last, that put a layout copy before and after every fused op of a compiled model
// (issue 21: torch.compile + convert was slower than torch.compile on ResNet-50).
#define FUSED_RESIDUAL_TAGS {at::Tag::flexible_layout}

TORCH_LIBRARY(fused_residual, m) {
  m.def("bn_stats(Tensor input) -> (Tensor mean, Tensor var)", FUSED_RESIDUAL_TAGS);
  m.def(
      "bn_update_running_stats(Tensor mean, Tensor var, int count, Tensor(a!) running_mean, "
      "Tensor(b!) running_var, float momentum) -> ()", FUSED_RESIDUAL_TAGS);
  m.def(
      "bn_apply(Tensor input, Tensor? residual, Tensor mean, Tensor var, Tensor? weight, "
      "Tensor? bias, float eps, bool save_mask) -> (Tensor out, Tensor mask)",
      FUSED_RESIDUAL_TAGS);
  m.def(
      "bn_backward_reduce(Tensor grad_out, Tensor mask, Tensor input, Tensor mean, Tensor var, "
      "float eps) -> (Tensor sum_dy, Tensor sum_dy_xmu, Tensor grad_weight)",
      FUSED_RESIDUAL_TAGS);
  m.def(
      "bn_backward_apply(Tensor grad_out, Tensor mask, Tensor input, Tensor mean, Tensor var, "
      "Tensor? weight, Tensor? sum_dy, Tensor? sum_dy_xmu, float eps, int count, "
      "bool need_grad_input, bool need_grad_residual) -> (Tensor grad_input, Tensor grad_residual)",
      FUSED_RESIDUAL_TAGS);
  m.def(
      "bn_dual_apply(Tensor input, Tensor mean, Tensor var, Tensor? weight, Tensor? bias, "
      "Tensor input2, Tensor mean2, Tensor var2, Tensor? weight2, Tensor? bias2, float eps, "
      "float eps2, bool save_mask) -> (Tensor out, Tensor mask)", FUSED_RESIDUAL_TAGS);
}

#undef FUSED_RESIDUAL_TAGS
