// Schemas of the fused_residual ops (the op layer; see docs/op_layer.md) and the Python
// module init. Kernels register per dispatch key in csrc/cpu/ and csrc/cuda/; fake
// kernels are in fused_residual/ops.py.
#include <Python.h>

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

TORCH_LIBRARY(fused_residual, m) {
  m.def("bn_stats(Tensor input) -> (Tensor mean, Tensor var)");
  m.def(
      "bn_update_running_stats(Tensor mean, Tensor var, int count, Tensor(a!) running_mean, "
      "Tensor(b!) running_var, float momentum) -> ()");
  m.def(
      "bn_apply(Tensor input, Tensor? residual, Tensor mean, Tensor var, Tensor? weight, "
      "Tensor? bias, float eps, bool save_mask) -> (Tensor out, Tensor mask)");
  m.def(
      "bn_backward_reduce(Tensor grad_out, Tensor mask, Tensor input, Tensor mean, Tensor var, "
      "float eps) -> (Tensor sum_dy, Tensor sum_dy_xmu, Tensor grad_weight)");
  m.def(
      "bn_backward_apply(Tensor grad_out, Tensor mask, Tensor input, Tensor mean, Tensor var, "
      "Tensor? weight, Tensor? sum_dy, Tensor? sum_dy_xmu, float eps, int count, "
      "bool need_grad_input, bool need_grad_residual) -> (Tensor grad_input, Tensor grad_residual)");
  m.def(
      "bn_dual_apply(Tensor input, Tensor mean, Tensor var, Tensor? weight, Tensor? bias, "
      "Tensor input2, Tensor mean2, Tensor var2, Tensor? weight2, Tensor? bias2, float eps, "
      "float eps2, bool save_mask) -> (Tensor out, Tensor mask)");
}
