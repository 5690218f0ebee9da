// Device-generic parts written with ATen ops: argument checks, the cuSOLVER/LAPACK Cholesky path (CUDA for
// m beyond the shared-memory kernel), and Newton-Schulz forward and its exact backward on every device.
#include "landmark_solve.h"

#include <ATen/ATen.h>

#include <cmath>
#include <limits>
#include <vector>

namespace skyformer {

SolveProblem prepare_problem(const at::Tensor& gram, const at::Tensor& rhs, const char* gram_name,
                             const char* rhs_name) {
  TORCH_CHECK(gram.dim() >= 2 && gram.size(-1) == gram.size(-2), gram_name,
              " must have shape (..., m, m), got ", gram.sizes());
  TORCH_CHECK(gram.size(-1) >= 1, gram_name, " must hold at least one landmark (m >= 1), got ", gram.sizes());
  TORCH_CHECK(rhs.dim() == gram.dim() && rhs.sizes().slice(0, rhs.dim() - 1) == gram.sizes().slice(0, gram.dim() - 1),
              rhs_name, " must have shape (..., m, p) with the leading dims and m of ", gram_name, " ",
              gram.sizes(), ", got ", rhs.sizes());
  TORCH_CHECK(gram.scalar_type() == at::kFloat || gram.scalar_type() == at::kDouble, gram_name,
              " must be float32 or float64, got ", gram.scalar_type());
  TORCH_CHECK(rhs.scalar_type() == gram.scalar_type(), rhs_name, ".dtype (", rhs.scalar_type(),
              ") must equal ", gram_name, ".dtype (", gram.scalar_type(), ")");
  TORCH_CHECK(rhs.device() == gram.device(), rhs_name, " is on ", rhs.device(), " but ", gram_name, " is on ",
              gram.device());
  const int64_t m = gram.size(-1);
  const int64_t p = rhs.size(-1);
  const int64_t batch = gram.numel() / (m * m);
  return {gram.reshape({batch, m, m}).contiguous(), rhs.reshape({batch, m, p}).contiguous(), batch, m, p};
}

namespace {

at::Tensor add_to_diagonal(const at::Tensor& matrices, const at::Tensor& shift) {
  // matrices (B, m, m), shift (B,) -> matrices + shift_b I
  const int64_t m = matrices.size(-1);
  return matrices + shift.view({-1, 1, 1}) * at::eye(m, matrices.options());
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> cholesky_solve_generic(const at::Tensor& gram,
                                                                      const at::Tensor& summary, double ridge) {
  const SolveProblem problem = prepare_problem(gram, summary, "gram", "summary");
  const at::Tensor& g = problem.gram;
  const int64_t m = problem.m;
  const at::Tensor non_finite = g.isfinite().logical_not().flatten(1).any(1);
  const at::Tensor symmetric = 0.5 * (g + g.transpose(-1, -2));
  const double eps = g.scalar_type() == at::kDouble ? std::numeric_limits<double>::epsilon()
                                                     : std::numeric_limits<float>::epsilon();
  at::Tensor diag_scale = g.diagonal(0, -2, -1).abs().amax(-1);
  diag_scale = at::where(diag_scale == 0, at::ones_like(diag_scale), diag_scale);
  const at::Tensor tau = static_cast<double>(m) * eps * diag_scale;

  // A non-finite matrix is replaced by the identity so the factorisation cannot misbehave; its results are
  // overwritten with NaN below.
  const at::Tensor base = at::where(non_finite.view({-1, 1, 1}), at::eye(m, g.options()), symmetric);
  // Cholesky "succeeds" on a pivot that is positive but at rounding level; the policy counts pivots <= tau
  // (L_jj^2 <= tau) as failures, like the kernels do.
  const auto factor_failed = [&](const at::Tensor& lower, const at::Tensor& info) {
    const at::Tensor pivots = lower.diagonal(0, -2, -1).square();
    return info.ne(0).logical_or(pivots.le(tau.unsqueeze(-1)).any(-1));
  };
  auto [factor, info] = at::linalg_cholesky_ex(add_to_diagonal(base, at::full_like(tau, ridge)));
  at::Tensor status = at::zeros({problem.batch}, g.options().dtype(at::kInt));
  at::Tensor failed = factor_failed(factor, info).logical_and(non_finite.logical_not());
  double jitter = 1.0;
  for (int32_t step = 1; step <= kMaxJitterSteps && failed.any().item<bool>(); ++step) {
    jitter *= kJitterGrowth;
    auto [retry, retry_info] = at::linalg_cholesky_ex(add_to_diagonal(base, ridge + jitter * tau));
    factor = at::where(failed.view({-1, 1, 1}), retry, factor);
    status = at::where(failed, at::full_like(status, step), status);
    failed = failed.logical_and(factor_failed(retry, retry_info));
  }
  status = at::where(failed, at::full_like(status, kNotPositiveDefinite), status);
  status = at::where(non_finite, at::full_like(status, kNonFinite), status);
  const at::Tensor bad = failed.logical_or(non_finite).view({-1, 1, 1});
  factor = at::where(bad, at::full_like(factor, std::numeric_limits<double>::quiet_NaN()), factor).contiguous();
  at::Tensor solution = at::cholesky_solve(problem.rhs, factor, /*upper=*/false).contiguous();
  return {solution.view(summary.sizes()), factor.view(gram.sizes()),
          status.view(gram.sizes().slice(0, gram.dim() - 2))};
}

at::Tensor cholesky_solve_factored_generic(const at::Tensor& factor, const at::Tensor& rhs) {
  const SolveProblem problem = prepare_problem(factor, rhs, "factor", "rhs");
  return at::cholesky_solve(problem.rhs, problem.gram.tril(), /*upper=*/false).contiguous().view(rhs.sizes());
}

// ---- Newton-Schulz (the paper's iteration; see skyformer_ext/reference.py:newton_schulz_inverse) --------

namespace {

// One update V <- 1/4 V T3 with X = N V, T1 = 7I - X, T2 = 15I - X T1, T3 = 13I - X T2.
struct NewtonSchulzStep {
  at::Tensor product, t1, t2, t3;
};

struct NewtonSchulzState {
  at::Tensor regularized;  // A = M + ridge I
  at::Tensor scaling;      // d = rowsum(A)^-1/2, (B, m)
  at::Tensor normalized;   // N = D A D
  at::Tensor colsum;       // 1^T N, (B, m)
  at::Tensor step_size;    // s = max_j colsum_j, (B,)
  std::vector<at::Tensor> iterates;  // V_0 .. V_iters (only the last one unless kept for backward)
  std::vector<NewtonSchulzStep> steps;  // the products of each update, kept for backward
};

NewtonSchulzStep newton_schulz_step(const at::Tensor& normalized, const at::Tensor& iterate, const at::Tensor& eye) {
  NewtonSchulzStep step;
  step.product = at::bmm(normalized, iterate);
  step.t1 = 7 * eye - step.product;
  step.t2 = 15 * eye - at::bmm(step.product, step.t1);
  step.t3 = 13 * eye - at::bmm(step.product, step.t2);
  return step;
}

NewtonSchulzState newton_schulz_forward(const at::Tensor& gram, double ridge, int64_t iters, bool for_backward) {
  const int64_t m = gram.size(-1);
  const at::Tensor eye = at::eye(m, gram.options());
  NewtonSchulzState state;
  state.regularized = gram + ridge * eye;
  state.scaling = state.regularized.sum(-1).rsqrt();
  state.normalized = state.scaling.unsqueeze(-1) * state.regularized * state.scaling.unsqueeze(-2);
  state.colsum = state.normalized.sum(-2);
  state.step_size = state.colsum.amax(-1);
  at::Tensor iterate = state.normalized.transpose(-1, -2) / state.step_size.view({-1, 1, 1});
  state.iterates.push_back(iterate);
  for (int64_t k = 0; k < iters; ++k) {
    NewtonSchulzStep step = newton_schulz_step(state.normalized, iterate, eye);
    iterate = at::bmm(0.25 * iterate, step.t3);
    if (for_backward) {
      state.iterates.push_back(iterate);
      state.steps.push_back(std::move(step));
    } else {
      state.iterates.back() = iterate;
    }
  }
  return state;
}

at::Tensor approximate_inverse(const NewtonSchulzState& state) {
  return state.scaling.unsqueeze(-1) * state.iterates.back() * state.scaling.unsqueeze(-2);
}

void check_iters(int64_t iters) {
  TORCH_CHECK(iters >= 1, "ns_iters must be >= 1, got ", iters);
}

}  // namespace

at::Tensor newton_schulz_solve(const at::Tensor& gram, const at::Tensor& summary, double ridge, int64_t iters) {
  check_iters(iters);
  const SolveProblem problem = prepare_problem(gram, summary, "gram", "summary");
  const NewtonSchulzState state = newton_schulz_forward(problem.gram, ridge, iters, /*for_backward=*/false);
  return at::bmm(approximate_inverse(state), problem.rhs).contiguous().view(summary.sizes());
}

// Exact reverse-mode derivative of the iteration (what autograd of the reference computes): recomputes
// the forward keeping every iterate and product (transient, ~5 m x m per iteration and matrix), then walks
// the steps backwards.
std::tuple<at::Tensor, at::Tensor> newton_schulz_solve_backward(const at::Tensor& grad_solution,
                                                                const at::Tensor& gram,
                                                                const at::Tensor& summary, double ridge,
                                                                int64_t iters) {
  check_iters(iters);
  const SolveProblem problem = prepare_problem(gram, summary, "gram", "summary");
  const SolveProblem grad = prepare_problem(gram, grad_solution, "gram", "grad_solution");
  const at::Tensor& z = problem.rhs;
  const at::Tensor& dy = grad.rhs;
  const NewtonSchulzState state = newton_schulz_forward(problem.gram, ridge, iters, /*for_backward=*/true);
  const at::Tensor& d = state.scaling;
  const at::Tensor& n = state.normalized;
  const at::Tensor& a = state.regularized;
  const at::Tensor d_row = d.unsqueeze(-1), d_col = d.unsqueeze(-2);

  // Y = W Z, W = D V D.
  const at::Tensor inverse = approximate_inverse(state);
  const at::Tensor grad_summary = at::bmm(inverse.transpose(-1, -2), dy);
  const at::Tensor grad_inverse = at::bmm(dy, z.transpose(-1, -2));
  const at::Tensor& v_last = state.iterates.back();
  at::Tensor grad_d = (grad_inverse * v_last * d_col).sum(-1) + (grad_inverse * v_last * d_row).sum(-2);
  at::Tensor grad_v = d_row * grad_inverse * d_col;
  at::Tensor grad_n = at::zeros_like(n);

  for (int64_t k = iters - 1; k >= 0; --k) {
    const at::Tensor& v = state.iterates[k];
    const NewtonSchulzStep& step = state.steps[k];
    // V' = 1/4 V T3
    const at::Tensor grad_t3 = 0.25 * at::bmm(v.transpose(-1, -2), grad_v);
    at::Tensor grad_v_prev = 0.25 * at::bmm(grad_v, step.t3.transpose(-1, -2));
    // T3 = 13I - X T2, T2 = 15I - X T1, T1 = 7I - X
    at::Tensor grad_x = -at::bmm(grad_t3, step.t2.transpose(-1, -2));
    const at::Tensor grad_t2 = -at::bmm(step.product.transpose(-1, -2), grad_t3);
    grad_x -= at::bmm(grad_t2, step.t1.transpose(-1, -2));
    const at::Tensor grad_t1 = -at::bmm(step.product.transpose(-1, -2), grad_t2);
    grad_x -= grad_t1;
    // X = N V
    grad_n += at::bmm(grad_x, v.transpose(-1, -2));
    grad_v_prev += at::bmm(n.transpose(-1, -2), grad_x);
    grad_v = grad_v_prev;
  }

  // V_0 = N^T / s, s = max_j colsum_j(N); ties share the gradient evenly (as autograd's amax does).
  const at::Tensor s = state.step_size.view({-1, 1, 1});
  grad_n += grad_v.transpose(-1, -2) / s;
  const at::Tensor grad_s = -(grad_v * state.iterates.front()).sum({-1, -2}) / state.step_size;
  const at::Tensor is_max = state.colsum.eq(state.step_size.unsqueeze(-1)).to(n.scalar_type());
  const at::Tensor grad_colsum = grad_s.unsqueeze(-1) * is_max / is_max.sum(-1, /*keepdim=*/true);
  grad_n += grad_colsum.unsqueeze(-2);
  // N = D A D, d = rowsum(A)^-1/2
  at::Tensor grad_a = d_row * grad_n * d_col;
  grad_d += (grad_n * a * d_col).sum(-1) + (grad_n * a * d_row).sum(-2);
  const at::Tensor grad_rowsum = -0.5 * grad_d * d * d * d;
  grad_a += grad_rowsum.unsqueeze(-1);
  return {grad_a.contiguous().view(gram.sizes()), grad_summary.contiguous().view(summary.sizes())};
}

}  // namespace skyformer
