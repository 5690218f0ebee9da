// Operator registration (torch.ops.skyformer.*) and the Python module skyformer_ext._C.
//
// Fake (meta) kernels and autograd are registered from Python (skyformer_ext/_extension.py) with
// torch.library.register_fake / register_autograd.
#include "landmark_solve.h"

#include <Python.h>
#include <torch/library.h>

namespace skyformer {
namespace {

// CUDA entry points pick the shared-memory kernel or the ATen path themselves; this keeps CPU-only builds
// free of any CUDA symbol.
TORCH_LIBRARY(skyformer, m) {
  m.def("cholesky_solve(Tensor gram, Tensor summary, float ridge) -> (Tensor solution, Tensor factor, "
        "Tensor status)");
  m.def("cholesky_solve_factored(Tensor factor, Tensor rhs) -> Tensor");
  // The ATen (LAPACK / cuSOLVER) implementation of cholesky_solve with the same failure policy; the CUDA
  // op uses it for m > 256, tests run it on CPU to keep that path honest.
  m.def("cholesky_solve_generic(Tensor gram, Tensor summary, float ridge) -> (Tensor solution, "
        "Tensor factor, Tensor status)");
  m.def("newton_schulz_solve(Tensor gram, Tensor summary, float ridge, int iters) -> Tensor");
  m.def("newton_schulz_solve_backward(Tensor grad_solution, Tensor gram, Tensor summary, float ridge, "
        "int iters) -> (Tensor grad_gram, Tensor grad_summary)");
}

TORCH_LIBRARY_IMPL(skyformer, CPU, m) {
  m.impl("cholesky_solve", &cholesky_solve_cpu);
  m.impl("cholesky_solve_factored", &cholesky_solve_factored_cpu);
  m.impl("cholesky_solve_generic", &cholesky_solve_generic);
  m.impl("newton_schulz_solve", &newton_schulz_solve);
  m.impl("newton_schulz_solve_backward", &newton_schulz_solve_backward);
}

#ifdef SKYFORMER_WITH_CUDA
TORCH_LIBRARY_IMPL(skyformer, CUDA, m) {
  m.impl("cholesky_solve", &cholesky_solve_cuda);
  m.impl("cholesky_solve_factored", &cholesky_solve_factored_cuda);
  m.impl("cholesky_solve_generic", &cholesky_solve_generic);
  m.impl("newton_schulz_solve", &newton_schulz_solve);
  m.impl("newton_schulz_solve_backward", &newton_schulz_solve_backward);
}
#endif

PyObject* build_info(PyObject*, PyObject*) {
#ifdef SKYFORMER_WITH_CUDA
  const int version = compiled_cuda_version();
  return Py_BuildValue("{s:O,s:s,s:i}", "cuda", Py_True, "cuda_archs", compiled_cuda_archs(), "cuda_version",
                       version);
#else
  return Py_BuildValue("{s:O,s:s,s:i}", "cuda", Py_False, "cuda_archs", "", "cuda_version", 0);
#endif
}

PyMethodDef module_methods[] = {
    {"build_info", build_info, METH_NOARGS,
     "{'cuda': bool, 'cuda_archs': nvcc's __CUDA_ARCH_LIST__ (e.g. '800,900'), 'cuda_version': CUDART_VERSION}"},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C",
                          "skyformer-ext compiled landmark solve; importing it registers torch.ops.skyformer.*",
                          -1, module_methods};

}  // namespace
}  // namespace skyformer

PyMODINIT_FUNC PyInit__C(void) {
  return PyModule_Create(&skyformer::module_def);
}
