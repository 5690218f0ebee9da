// CUDA Cholesky solve: one thread block per matrix. The block keeps the lower triangle of sym(M) + shift I
// packed in shared memory, factors it right-looking one column at a time (two barriers per column), then
// runs both triangular solves on chunks of right-hand-side columns, also in shared memory. Arithmetic is in
// the input dtype (float32 accumulates in float32, float64 in float64).
//
// Barrier discipline: every branch that skips a __syncthreads() depends only on values all threads read
// from shared memory after the same barrier (the pivot, the non-finite flag), so the block never diverges
// around a barrier. m > kMaxKernelLandmarks, or matrices whose packed triangle does not fit the device's
// shared memory, go to the ATen (cuSOLVER) path with the same failure policy.
#include "landmark_solve.h"

#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cuda_runtime.h>

#include <algorithm>
#include <limits>

#define SKYFORMER_STRINGIFY_IMPL(...) #__VA_ARGS__
#define SKYFORMER_STRINGIFY(...) SKYFORMER_STRINGIFY_IMPL(__VA_ARGS__)

namespace skyformer {
namespace {

constexpr int kWarp = 32;
// Right-hand-side columns solved per pass; bounded so a block's shared memory leaves room for others.
constexpr int64_t kMaxChunk = 128;

__host__ __device__ constexpr int64_t packed_count(int64_t m) { return m * (m + 1) / 2; }
__device__ __forceinline__ int packed_index(int row, int col) { return row * (row + 1) / 2 + col; }  // col <= row

__device__ __forceinline__ float device_sqrt(float x) { return sqrtf(x); }
__device__ __forceinline__ double device_sqrt(double x) { return sqrt(x); }
__device__ __forceinline__ float device_abs(float x) { return fabsf(x); }
__device__ __forceinline__ double device_abs(double x) { return fabs(x); }
__device__ __forceinline__ bool device_isfinite(float x) { return isfinite(x); }
__device__ __forceinline__ bool device_isfinite(double x) { return isfinite(x); }

// Loads sym(gram) + shift I into packed and factors it in place into L. Returns false (uniformly across the
// block) unless every pivot is finite and above min_pivot.
template <typename scalar_t>
__device__ bool factor_in_shared(const scalar_t* __restrict__ gram, int m, scalar_t shift, scalar_t min_pivot,
                                 scalar_t* packed, scalar_t* column) {
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp, warps = blockDim.x / kWarp;
  __syncthreads();  // a previous attempt may still be reading its last pivot
  for (int i = warp; i < m; i += warps) {
    for (int k = lane; k <= i; k += kWarp) {
      packed[packed_index(i, k)] =
          scalar_t(0.5) * (gram[i * m + k] + gram[k * m + i]) + (i == k ? shift : scalar_t(0));
    }
  }
  __syncthreads();
  for (int j = 0; j < m; ++j) {
    const scalar_t pivot = packed[packed_index(j, j)];
    if (!(pivot > min_pivot) || !device_isfinite(pivot)) {
      return false;
    }
    const scalar_t diag = device_sqrt(pivot);
    for (int i = j + 1 + threadIdx.x; i < m; i += blockDim.x) {
      const scalar_t value = packed[packed_index(i, j)] / diag;
      packed[packed_index(i, j)] = value;
      column[i] = value;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      packed[packed_index(j, j)] = diag;  // nobody reads (j, j) during the trailing update
    }
    for (int i = j + 1 + warp; i < m; i += warps) {
      const scalar_t coeff = column[i];
      scalar_t* row = packed + packed_index(i, 0);
      for (int k = j + 1 + lane; k <= i; k += kWarp) {
        row[k] -= coeff * column[k];
      }
    }
    __syncthreads();
  }
  return true;
}

// Solves (L L^T) x = rhs for rhs (m x width, row-major) in shared memory; inv_diag[i] = 1 / L_ii.
template <typename scalar_t>
__device__ void solve_chunk(const scalar_t* packed, const scalar_t* inv_diag, int m, int width, scalar_t* rhs) {
  for (int j = 0; j < m; ++j) {  // L y = z
    for (int c = threadIdx.x; c < width; c += blockDim.x) {
      rhs[j * width + c] *= inv_diag[j];
    }
    __syncthreads();
    const int below = (m - j - 1) * width;
    for (int e = threadIdx.x; e < below; e += blockDim.x) {
      const int i = j + 1 + e / width, c = e % width;
      rhs[i * width + c] -= packed[packed_index(i, j)] * rhs[j * width + c];
    }
    __syncthreads();
  }
  for (int j = m - 1; j >= 0; --j) {  // L^T x = y
    for (int c = threadIdx.x; c < width; c += blockDim.x) {
      rhs[j * width + c] *= inv_diag[j];
    }
    __syncthreads();
    const int above = j * width;
    for (int e = threadIdx.x; e < above; e += blockDim.x) {
      const int i = e / width, c = e % width;
      rhs[i * width + c] -= packed[packed_index(j, i)] * rhs[j * width + c];
    }
    __syncthreads();
  }
}

// x = (L L^T)^-1 z for one matrix, z and x (m x p) in global memory, chunk columns at a time.
template <typename scalar_t>
__device__ void solve_all_columns(const scalar_t* packed, const scalar_t* inv_diag, int m, int p, int chunk,
                                  const scalar_t* __restrict__ z, scalar_t* __restrict__ x, scalar_t* rhs) {
  for (int c0 = 0; c0 < p; c0 += chunk) {
    const int width = min(chunk, p - c0);
    __syncthreads();  // the previous chunk has been written out
    for (int e = threadIdx.x; e < m * width; e += blockDim.x) {
      rhs[e] = z[(e / width) * p + c0 + e % width];
    }
    __syncthreads();
    solve_chunk(packed, inv_diag, m, width, rhs);
    for (int e = threadIdx.x; e < m * width; e += blockDim.x) {
      x[(e / width) * p + c0 + e % width] = rhs[e];
    }
  }
}

template <typename scalar_t>
__device__ void fill_nan(scalar_t* data, int64_t count) {
  for (int64_t e = threadIdx.x; e < count; e += blockDim.x) {
    data[e] = std::numeric_limits<scalar_t>::quiet_NaN();
  }
}

template <typename scalar_t>
__global__ void cholesky_solve_kernel(const scalar_t* __restrict__ gram, const scalar_t* __restrict__ summary,
                                      scalar_t* __restrict__ solution, scalar_t* __restrict__ factor,
                                      int32_t* __restrict__ status, int m, int p, int chunk, double ridge) {
  extern __shared__ __align__(sizeof(double)) unsigned char shared_bytes[];
  scalar_t* packed = reinterpret_cast<scalar_t*>(shared_bytes);
  scalar_t* column = packed + packed_count(m);
  scalar_t* rhs = column + m;
  const int64_t b = blockIdx.x;
  const scalar_t* g = gram + b * m * m;
  scalar_t* f = factor + b * m * m;
  scalar_t* x = solution + b * m * p;

  int any_non_finite = 0;
  for (int e = threadIdx.x; e < m * m; e += blockDim.x) {
    any_non_finite |= !device_isfinite(g[e]);
  }
  int32_t code = kNonFinite;
  if (!__syncthreads_or(any_non_finite)) {
    if (threadIdx.x == 0) {
      scalar_t scale = 0;
      for (int i = 0; i < m; ++i) {
        scale = max(scale, device_abs(g[i * m + i]));
      }
      column[0] = scale == scalar_t(0) ? scalar_t(1) : scale;
    }
    __syncthreads();
    const double tau = double(m) * double(std::numeric_limits<scalar_t>::epsilon()) * double(column[0]);
    double jitter = tau;
    code = kNotPositiveDefinite;
    for (int32_t step = 0; step <= kMaxJitterSteps; ++step) {
      const double shift = step == 0 ? ridge : ridge + (jitter *= kJitterGrowth);
      if (factor_in_shared(g, m, static_cast<scalar_t>(shift), static_cast<scalar_t>(tau), packed, column)) {
        code = step;
        break;
      }
    }
  }
  if (threadIdx.x == 0) {
    status[b] = code;
  }
  if (code == kNonFinite || code == kNotPositiveDefinite) {
    fill_nan(f, int64_t(m) * m);
    fill_nan(x, int64_t(m) * p);
    return;
  }
  for (int e = threadIdx.x; e < m * m; e += blockDim.x) {
    const int i = e / m, k = e % m;
    f[e] = k <= i ? packed[packed_index(i, k)] : scalar_t(0);
  }
  scalar_t* inv_diag = column;  // the factorisation is done with it
  for (int i = threadIdx.x; i < m; i += blockDim.x) {
    inv_diag[i] = scalar_t(1) / packed[packed_index(i, i)];
  }
  solve_all_columns(packed, inv_diag, m, p, chunk, summary + b * m * p, x, rhs);
}

template <typename scalar_t>
__global__ void factored_solve_kernel(const scalar_t* __restrict__ factor, const scalar_t* __restrict__ rhs_in,
                                      scalar_t* __restrict__ solution, int m, int p, int chunk) {
  extern __shared__ __align__(sizeof(double)) unsigned char shared_bytes[];
  scalar_t* packed = reinterpret_cast<scalar_t*>(shared_bytes);
  scalar_t* inv_diag = packed + packed_count(m);
  scalar_t* rhs = inv_diag + m;
  const int64_t b = blockIdx.x;
  const scalar_t* f = factor + b * m * m;
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp, warps = blockDim.x / kWarp;
  for (int i = warp; i < m; i += warps) {
    for (int k = lane; k <= i; k += kWarp) {
      packed[packed_index(i, k)] = f[i * m + k];
    }
  }
  for (int i = threadIdx.x; i < m; i += blockDim.x) {
    inv_diag[i] = scalar_t(1) / f[i * m + i];
  }
  solve_all_columns(packed, inv_diag, m, p, chunk, rhs_in + b * m * p, solution + b * m * p, rhs);
}

struct LaunchPlan {
  bool use_kernel = false;
  int threads = 0;
  int chunk = 0;
  size_t shared_bytes = 0;
};

// The shared-memory kernel handles m <= kMaxKernelLandmarks when the packed triangle, one column buffer and
// at least one right-hand-side column fit the device's opt-in shared memory per block.
LaunchPlan plan_launch(int64_t m, int64_t p, size_t element_size, int device) {
  LaunchPlan plan;
  if (m > kMaxKernelLandmarks) {
    return plan;
  }
  int limit = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  const size_t fixed = static_cast<size_t>(packed_count(m) + m) * element_size;
  const size_t per_column = static_cast<size_t>(m) * element_size;
  if (fixed + per_column > static_cast<size_t>(limit)) {
    return plan;
  }
  const int64_t fitting = static_cast<int64_t>((static_cast<size_t>(limit) - fixed) / per_column);
  plan.use_kernel = true;
  plan.chunk = static_cast<int>(std::max<int64_t>(1, std::min({p, kMaxChunk, fitting})));
  plan.shared_bytes = fixed + per_column * plan.chunk;
  plan.threads = m <= 64 ? 256 : 512;
  return plan;
}

template <typename Kernel>
void allow_shared_bytes(Kernel kernel, size_t bytes) {
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> cholesky_solve_cuda(const at::Tensor& gram,
                                                                   const at::Tensor& summary, double ridge) {
  const c10::cuda::CUDAGuard guard(gram.device());
  const SolveProblem problem = prepare_problem(gram, summary, "gram", "summary");
  const int64_t batch = problem.batch, m = problem.m, p = problem.p;
  const LaunchPlan plan = plan_launch(m, p, problem.gram.element_size(), gram.get_device());
  if (!plan.use_kernel) {
    return cholesky_solve_generic(gram, summary, ridge);
  }
  TORCH_CHECK(batch <= std::numeric_limits<int32_t>::max(), "cholesky_solve: at most 2^31 - 1 matrices per call, got ",
              batch);
  at::Tensor solution = at::empty({batch, m, p}, problem.rhs.options());
  at::Tensor factor = at::empty({batch, m, m}, problem.gram.options());
  at::Tensor status = at::empty({batch}, problem.gram.options().dtype(at::kInt));
  if (batch > 0) {
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES(problem.gram.scalar_type(), "skyformer_cholesky_solve_cuda", [&] {
      allow_shared_bytes(cholesky_solve_kernel<scalar_t>, plan.shared_bytes);
      cholesky_solve_kernel<scalar_t><<<batch, plan.threads, plan.shared_bytes, stream>>>(
          problem.gram.const_data_ptr<scalar_t>(), problem.rhs.const_data_ptr<scalar_t>(),
          solution.data_ptr<scalar_t>(), factor.data_ptr<scalar_t>(), status.data_ptr<int32_t>(),
          static_cast<int>(m), static_cast<int>(p), plan.chunk, ridge);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return {solution.view(summary.sizes()), factor.view(gram.sizes()),
          status.view(gram.sizes().slice(0, gram.dim() - 2))};
}

at::Tensor cholesky_solve_factored_cuda(const at::Tensor& factor, const at::Tensor& rhs) {
  const c10::cuda::CUDAGuard guard(factor.device());
  const SolveProblem problem = prepare_problem(factor, rhs, "factor", "rhs");
  const int64_t batch = problem.batch, m = problem.m, p = problem.p;
  const LaunchPlan plan = plan_launch(m, p, problem.gram.element_size(), factor.get_device());
  if (!plan.use_kernel) {
    return cholesky_solve_factored_generic(factor, rhs);
  }
  TORCH_CHECK(batch <= std::numeric_limits<int32_t>::max(),
              "cholesky_solve_factored: at most 2^31 - 1 matrices per call, got ", batch);
  at::Tensor solution = at::empty({batch, m, p}, problem.rhs.options());
  if (batch > 0 && p > 0) {
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES(problem.gram.scalar_type(), "skyformer_cholesky_solve_factored_cuda", [&] {
      allow_shared_bytes(factored_solve_kernel<scalar_t>, plan.shared_bytes);
      factored_solve_kernel<scalar_t><<<batch, plan.threads, plan.shared_bytes, stream>>>(
          problem.gram.const_data_ptr<scalar_t>(), problem.rhs.const_data_ptr<scalar_t>(),
          solution.data_ptr<scalar_t>(), static_cast<int>(m), static_cast<int>(p), plan.chunk);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return solution.view(rhs.sizes());
}

const char* compiled_cuda_archs() {
#ifdef __CUDA_ARCH_LIST__
  return SKYFORMER_STRINGIFY(__CUDA_ARCH_LIST__);
#else
  return "unknown";
#endif
}

int compiled_cuda_version() { return CUDART_VERSION; }

}  // namespace skyformer
