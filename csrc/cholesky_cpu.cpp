// CPU Cholesky solve: one matrix per task (at::parallel_for over the batch), unblocked right-looking
// factorisation into the upper factor U (A = U^T U, rows contiguous so every inner loop is a unit-stride
// axpy the compiler vectorises), then the two triangular solves on the right-hand side in place.
#include "landmark_solve.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace skyformer {
namespace {

// Factors sym(gram) + shift I into upper (m x m row-major, only k >= i written). False on a pivot that is
// not both finite and above min_pivot (not positive definite in working precision).
template <typename scalar_t>
bool try_factor(const scalar_t* gram, int64_t m, scalar_t shift, scalar_t min_pivot, scalar_t* upper) {
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t k = i; k < m; ++k) {
      upper[i * m + k] = scalar_t(0.5) * (gram[i * m + k] + gram[k * m + i]) + (i == k ? shift : scalar_t(0));
    }
  }
  for (int64_t j = 0; j < m; ++j) {
    scalar_t* row_j = upper + j * m;
    const scalar_t pivot = row_j[j];
    if (!(pivot > min_pivot) || !std::isfinite(pivot)) {
      return false;
    }
    const scalar_t diag = std::sqrt(pivot);
    const scalar_t inv_diag = scalar_t(1) / diag;
    row_j[j] = diag;
    for (int64_t k = j + 1; k < m; ++k) {
      row_j[k] *= inv_diag;
    }
    for (int64_t i = j + 1; i < m; ++i) {
      const scalar_t coeff = row_j[i];
      scalar_t* __restrict__ row_i = upper + i * m;
      const scalar_t* __restrict__ src = row_j;
      for (int64_t k = i; k < m; ++k) {
        row_i[k] -= coeff * src[k];
      }
    }
  }
  return true;
}

// Returns the status code of the failure policy (landmark_solve.h) and leaves the factor in upper.
template <typename scalar_t>
int32_t factor_with_jitter(const scalar_t* gram, int64_t m, double ridge, scalar_t* upper) {
  scalar_t diag_scale = 0;
  for (int64_t i = 0; i < m * m; ++i) {
    if (!std::isfinite(gram[i])) {
      return kNonFinite;
    }
  }
  for (int64_t i = 0; i < m; ++i) {
    diag_scale = std::max(diag_scale, std::abs(gram[i * m + i]));
  }
  if (diag_scale == 0) {
    diag_scale = 1;
  }
  const double tau = static_cast<double>(m) * std::numeric_limits<scalar_t>::epsilon() * diag_scale;
  double jitter = tau;
  for (int32_t step = 0; step <= kMaxJitterSteps; ++step) {
    const double shift = step == 0 ? ridge : ridge + (jitter *= kJitterGrowth);
    if (try_factor(gram, m, static_cast<scalar_t>(shift), static_cast<scalar_t>(tau), upper)) {
      return step;
    }
  }
  return kNotPositiveDefinite;
}

// Solves (U^T U) X = rhs in place; rhs is (m x p) row-major.
template <typename scalar_t>
void solve_with_upper(const scalar_t* upper, int64_t m, int64_t p, scalar_t* rhs) {
  for (int64_t j = 0; j < m; ++j) {  // U^T y = z, forward
    scalar_t* __restrict__ row_j = rhs + j * p;
    const scalar_t inv_diag = scalar_t(1) / upper[j * m + j];
    for (int64_t c = 0; c < p; ++c) {
      row_j[c] *= inv_diag;
    }
    for (int64_t i = j + 1; i < m; ++i) {
      const scalar_t coeff = upper[j * m + i];
      scalar_t* __restrict__ row_i = rhs + i * p;
      for (int64_t c = 0; c < p; ++c) {
        row_i[c] -= coeff * row_j[c];
      }
    }
  }
  for (int64_t j = m - 1; j >= 0; --j) {  // U x = y, backward
    scalar_t* __restrict__ row_j = rhs + j * p;
    const scalar_t inv_diag = scalar_t(1) / upper[j * m + j];
    for (int64_t c = 0; c < p; ++c) {
      row_j[c] *= inv_diag;
    }
    for (int64_t i = 0; i < j; ++i) {
      const scalar_t coeff = upper[i * m + j];
      scalar_t* __restrict__ row_i = rhs + i * p;
      for (int64_t c = 0; c < p; ++c) {
        row_i[c] -= coeff * row_j[c];
      }
    }
  }
}

// Grain of the batch loop: about 2^16 flops per task so small m do not drown in scheduling.
int64_t batch_grain(int64_t m, int64_t p) {
  const int64_t work = std::max<int64_t>(m * m * (m + p), 1);
  return std::max<int64_t>(1, (int64_t{1} << 16) / work);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> cholesky_solve_cpu(const at::Tensor& gram,
                                                                  const at::Tensor& summary, double ridge) {
  const SolveProblem problem = prepare_problem(gram, summary, "gram", "summary");
  const int64_t batch = problem.batch, m = problem.m, p = problem.p;
  at::Tensor solution = at::empty({batch, m, p}, problem.rhs.options());
  at::Tensor factor = at::empty({batch, m, m}, problem.gram.options());
  at::Tensor status = at::empty({batch}, problem.gram.options().dtype(at::kInt));
  AT_DISPATCH_FLOATING_TYPES(problem.gram.scalar_type(), "skyformer_cholesky_solve_cpu", [&] {
    const scalar_t* gram_data = problem.gram.const_data_ptr<scalar_t>();
    const scalar_t* rhs_data = problem.rhs.const_data_ptr<scalar_t>();
    scalar_t* solution_data = solution.data_ptr<scalar_t>();
    scalar_t* factor_data = factor.data_ptr<scalar_t>();
    int32_t* status_data = status.data_ptr<int32_t>();
    at::parallel_for(0, batch, batch_grain(m, p), [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> upper(static_cast<size_t>(m * m));
      const scalar_t nan = std::numeric_limits<scalar_t>::quiet_NaN();
      for (int64_t b = begin; b < end; ++b) {
        const int32_t code = factor_with_jitter(gram_data + b * m * m, m, ridge, upper.data());
        status_data[b] = code;
        scalar_t* x = solution_data + b * m * p;
        scalar_t* lower = factor_data + b * m * m;
        if (code == kNonFinite || code == kNotPositiveDefinite) {
          std::fill(x, x + m * p, nan);
          std::fill(lower, lower + m * m, nan);
          continue;
        }
        for (int64_t i = 0; i < m; ++i) {
          for (int64_t k = 0; k < m; ++k) {
            lower[i * m + k] = k <= i ? upper[k * m + i] : scalar_t(0);
          }
        }
        std::copy(rhs_data + b * m * p, rhs_data + (b + 1) * m * p, x);
        solve_with_upper(upper.data(), m, p, x);
      }
    });
  });
  return {solution.view(summary.sizes()), factor.view(gram.sizes()), status.view(gram.sizes().slice(0, gram.dim() - 2))};
}

at::Tensor cholesky_solve_factored_cpu(const at::Tensor& factor, const at::Tensor& rhs) {
  const SolveProblem problem = prepare_problem(factor, rhs, "factor", "rhs");
  const int64_t batch = problem.batch, m = problem.m, p = problem.p;
  at::Tensor solution = at::empty({batch, m, p}, problem.rhs.options());
  AT_DISPATCH_FLOATING_TYPES(problem.gram.scalar_type(), "skyformer_cholesky_solve_factored_cpu", [&] {
    const scalar_t* lower_data = problem.gram.const_data_ptr<scalar_t>();
    const scalar_t* rhs_data = problem.rhs.const_data_ptr<scalar_t>();
    scalar_t* solution_data = solution.data_ptr<scalar_t>();
    at::parallel_for(0, batch, batch_grain(m, p), [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> upper(static_cast<size_t>(m * m));
      for (int64_t b = begin; b < end; ++b) {
        const scalar_t* lower = lower_data + b * m * m;
        for (int64_t i = 0; i < m; ++i) {
          for (int64_t k = 0; k <= i; ++k) {
            upper[k * m + i] = lower[i * m + k];
          }
        }
        scalar_t* x = solution_data + b * m * p;
        std::copy(rhs_data + b * m * p, rhs_data + (b + 1) * m * p, x);
        solve_with_upper(upper.data(), m, p, x);
      }
    });
  });
  return solution.view(rhs.sizes());
}

}  // namespace skyformer
