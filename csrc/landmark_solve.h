// The small m x m landmark problem of Skyformer: Y = (M + ridge I)^-1 Z, batched over batch * heads.
//
// Shapes: gram M (..., m, m), summary Z (..., m, p), same leading dims, float32 or float64, any strides.
// Every op returns freshly allocated contiguous tensors (no aliasing of inputs).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <tuple>

namespace skyformer {

// Failure policy of the Cholesky solve, identical in every implementation (CPU kernel, CUDA kernel, ATen
// fallback, and the Python fallback in skyformer_ext/solve.py):
// - The factored matrix is sym(M) + ridge I with sym(M) = (M + M^T) / 2.
// - gram holding NaN/Inf: solution and factor are NaN, status kNonFinite (NaN in -> NaN out, no error).
// - Cholesky fails when a pivot (L_jj^2) is not finite or <= tau = m * eps(dtype) * max_i |M_ii| (max_i |M_ii|
//   taken as 1 when it is 0), i.e. the matrix is not positive definite in working precision: retry with
//   ridge + tau * 10^s, s = 1..kMaxJitterSteps; status = the step that succeeded (0 = none).
// - Still failing: solution and factor NaN, status kNotPositiveDefinite. The Python wrapper warns once on
//   any escalation and raises on kNotPositiveDefinite.
constexpr int32_t kNonFinite = -1;
constexpr int32_t kMaxJitterSteps = 3;
constexpr int32_t kNotPositiveDefinite = kMaxJitterSteps + 1;
constexpr double kJitterGrowth = 10.0;

// Largest m the CUDA kernel handles in shared memory; larger m use the ATen (cuSOLVER) path.
constexpr int64_t kMaxKernelLandmarks = 256;

// Validated, batch-flattened contiguous views: gram (B, m, m), rhs (B, m, p).
struct SolveProblem {
  at::Tensor gram;
  at::Tensor rhs;
  int64_t batch;
  int64_t m;
  int64_t p;
};

SolveProblem prepare_problem(const at::Tensor& gram, const at::Tensor& rhs, const char* gram_name,
                             const char* rhs_name);

// (solution, factor, status): factor is the lower Cholesky factor L (zeros above the diagonal) of the
// matrix actually solved, status int32 (...,) per matrix as described above.
std::tuple<at::Tensor, at::Tensor, at::Tensor> cholesky_solve_cpu(const at::Tensor& gram,
                                                                  const at::Tensor& summary, double ridge);
// Solves (L L^T) X = rhs reading only the lower triangle of factor.
at::Tensor cholesky_solve_factored_cpu(const at::Tensor& factor, const at::Tensor& rhs);

// Device-generic ATen implementations (torch.linalg / cuSOLVER underneath): the CUDA path for large m and
// the Newton-Schulz ops on every device.
std::tuple<at::Tensor, at::Tensor, at::Tensor> cholesky_solve_generic(const at::Tensor& gram,
                                                                      const at::Tensor& summary, double ridge);
at::Tensor cholesky_solve_factored_generic(const at::Tensor& factor, const at::Tensor& rhs);
at::Tensor newton_schulz_solve(const at::Tensor& gram, const at::Tensor& summary, double ridge, int64_t iters);
std::tuple<at::Tensor, at::Tensor> newton_schulz_solve_backward(const at::Tensor& grad_solution,
                                                                const at::Tensor& gram,
                                                                const at::Tensor& summary, double ridge,
                                                                int64_t iters);

#ifdef SKYFORMER_WITH_CUDA
std::tuple<at::Tensor, at::Tensor, at::Tensor> cholesky_solve_cuda(const at::Tensor& gram,
                                                                   const at::Tensor& summary, double ridge);
at::Tensor cholesky_solve_factored_cuda(const at::Tensor& factor, const at::Tensor& rhs);
// nvcc's __CUDA_ARCH_LIST__ of this build, e.g. "800,900", and the CUDA runtime version it was built with.
const char* compiled_cuda_archs();
int compiled_cuda_version();
#endif

}  // namespace skyformer
