// CUDA kernels of proposal_draw and proposal_log_weights (a tail drawn from a proposal, lsh_torch/proposal.py):
// each row's head sorted by torch.sort (head entries first, the rest pushed past them), one block per row checks
// it (and sums its proposal mass, for the weights), then one thread per entry draws or weighs it. The draws are
// counter-based (lsh_common.h: proposal_uniform): the CPU kernel's, entry for entry.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <limits>

#include "op_checks.h"
#include "cuda_common.cuh"

namespace lsh_torch {
namespace {

enum ProposalError : int64_t { kHeadRange = 1, kHeadId = 2, kTailId = 3, kCdf = 4, kTotal = 5, kNoMass = 6 };
constexpr int kThreads = 256;

// cdf must hold cumulative weights: finite, from >= 0, non-decreasing, to a positive total.
__global__ void check_cdf_kernel(const double* __restrict__ cdf, int64_t n, int64_t* flag) {
  const int64_t j = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (j >= n) return;
  const double v = cdf[j];
  if (!(isfinite(v) && v >= (j > 0 ? cdf[j - 1] : 0.0))) cuda::report(flag, kCdf, j);
  else if (j == n - 1 && !(v > 0)) cuda::report(flag, kTotal, 0);
}

// Block r: checks head[r] and the row's sorted head entries; where `scale` is given, writes the row's
// proposal_row_log_scale (from the mass of its distinct head entries).
__global__ void check_heads_kernel(const int64_t* __restrict__ head, const int64_t* __restrict__ sorted,
                                   const double* __restrict__ cdf, int64_t width, int64_t n, int64_t tries,
                                   double* __restrict__ scale, int64_t* flag) {
  __shared__ double partial[kThreads / 32];
  const int64_t r = blockIdx.x;
  const double total = cdf[n - 1];
  const int64_t given = head[r];
  if (threadIdx.x == 0 && (given < 0 || given > width)) cuda::report(flag, kHeadRange, given, r);
  const int64_t h = given < 0 ? 0 : given > width ? width : given;
  const int64_t* s = sorted + r * width;
  double mass = 0;
  for (int64_t c = threadIdx.x; c < h; c += blockDim.x) {
    const int64_t j = s[c];
    if (j < 0 || j >= n) {
      cuda::report(flag, kHeadId, j, r);
    } else if (c == 0 || s[c - 1] != j) {
      mass += cdf[j] - (j > 0 ? cdf[j - 1] : 0.0);
    }
  }
  if (scale == nullptr) return;
  mass = cuda::warp_sum(mass);
  if ((threadIdx.x & 31) == 0) partial[threadIdx.x >> 5] = mass;
  __syncthreads();
  if (threadIdx.x == 0) {
    double sum = 0;
    for (int w = 0; w < kThreads / 32; ++w) sum += partial[w];
    const double rest = (total - sum) / total;
    scale[r] = proposal_row_log_scale(rest > 0 ? rest : 0.0, total, width - h, tries);
  }
}

__global__ void draw_kernel(const int64_t* __restrict__ head, const int64_t* __restrict__ sorted,
                            const double* __restrict__ cdf, const int32_t* __restrict__ guide, int64_t rows,
                            int64_t width, int64_t n, int64_t g, int64_t tries, int64_t seed, int64_t* __restrict__ out) {
  const int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (e >= rows * width) return;
  const int64_t r = e / width, column = e % width;
  const int64_t h = head[r] < 0 ? 0 : head[r] > width ? width : head[r];
  if (column < h) return;
  const double total = cdf[n - 1], scale = static_cast<double>(g - 1) / total;
  const uint64_t key = stream_key(seed, kProposalDraw, r);
  int64_t j = 0;
  for (int64_t attempt = 0; attempt < tries; ++attempt) {
    j = proposal_inverse(cdf, n, guide, g, scale, proposal_uniform(key, column, attempt) * total);
    if (!in_sorted(sorted + r * width, h, j)) break;
  }
  out[e] = j;
}

__global__ void weights_kernel(const int64_t* __restrict__ active, const int64_t* __restrict__ head,
                               const int64_t* __restrict__ sorted, const double* __restrict__ cdf,
                               const double* __restrict__ scale, int64_t rows, int64_t width, int64_t n,
                               float* __restrict__ out, int64_t* flag) {
  const int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (e >= rows * width) return;
  const int64_t r = e / width, column = e % width, j = active[e];
  const int64_t h = head[r] < 0 ? 0 : head[r] > width ? width : head[r];
  float w = 0;
  if (column >= h) {
    if (j < 0 || j >= n) {
      cuda::report(flag, kTailId, j, r, column);
    } else if (in_sorted(sorted + r * width, h, j)) {
      w = -std::numeric_limits<float>::infinity();  // left on the head after every try: counts for nothing
    } else {
      const double mass = cdf[j] - (j > 0 ? cdf[j - 1] : 0.0);
      if (!(mass > 0)) cuda::report(flag, kNoMass, j, r, column);  // a neuron the proposal never draws
      w = static_cast<float>(-(scale[r] + log(mass)));
    }
  }
  out[e] = w;
}

void check_devices(const char* op, const at::Tensor& active, const at::Tensor& head, const at::Tensor& cdf,
                   const at::Tensor* guide) {
  cuda::check_cuda(active, "active", op);
  cuda::check_same_device(head, active.device(), "head", op);
  cuda::check_same_device(cdf, active.device(), "cdf", op);
  if (guide != nullptr) cuda::check_same_device(*guide, active.device(), "guide", op);
}


// Each row's first head[r] entries sorted, the others (int64's largest) after them.
at::Tensor sorted_heads(const at::Tensor& active, const at::Tensor& head) {
  const auto columns = at::arange(active.size(1), active.options()).unsqueeze(0);
  const auto masked = at::where(columns < head.unsqueeze(1), active,
                                at::scalar_tensor(std::numeric_limits<int64_t>::max(), active.options()));
  return std::get<0>(at::sort(masked, /*dim=*/1));
}

void raise_problem(const char* op, const std::array<int64_t, 4>& p, int64_t width, int64_t n) {
  switch (p[0]) {
    case 0: return;
    case kHeadRange:
      TORCH_CHECK(false, op, ": head must be in [0, A = ", width, "], got ", p[1], " at row ", p[2]);
    case kHeadId:
      TORCH_CHECK(false, op, ": active's head entries must be neuron ids in [0, N = ", n, "), got ", p[1], " in row ",
                  p[2]);
    case kTailId:
      TORCH_CHECK(false, op, ": active must hold neuron ids in [0, N = ", n, "), got ", p[1], " at [", p[2], ", ", p[3],
                  "]");
    case kCdf:
      TORCH_CHECK(false, op, ": cdf must hold cumulative weights (finite, cdf[0] >= 0, non-decreasing), got a bad "
                  "cdf[", p[1], "]");
    case kNoMass:
      TORCH_CHECK(false, op, ": active's tail entry ", p[1], " at [", p[2], ", ", p[3],
                  "] has no proposal mass (cdf[j] - cdf[j-1] <= 0): the proposal never draws it");
    default:
      TORCH_CHECK(false, op, ": cdf must end in a positive finite total");
  }
}

// Checks cdf (on every call, with rows or none) and the row count (a block each). False where there are no rows:
// then any problem found is raised now.
bool rows_to_do(const char* op, const at::Tensor& cdf, int64_t rows, int64_t width, cudaStream_t stream,
                cuda::ErrorFlag& flag) {
  TORCH_CHECK(rows <= std::numeric_limits<int32_t>::max(), op, ": at most 2^31 - 1 rows (a block each), got ", rows);
  const int64_t n = cdf.size(0);
  check_cdf_kernel<<<cuda::ceil_div(n, kThreads), kThreads, 0, stream>>>(cdf.data_ptr<double>(), n, flag.ptr());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (rows > 0) return true;
  raise_problem(op, flag.read(), width, n);
  return false;
}

at::Tensor proposal_draw_cuda(const at::Tensor& active_in, const at::Tensor& head_in, const at::Tensor& cdf_in,
                              const at::Tensor& guide_in, int64_t tries, int64_t seed) {
  const char* op = "proposal_draw";
  check_proposal_args(op, active_in, head_in, cdf_in, &guide_in, tries);
  check_devices(op, active_in, head_in, cdf_in, &guide_in);
  const c10::cuda::CUDAGuard device_guard(active_in.device());
  const auto active = active_in.contiguous(), head = head_in.contiguous(), cdf = cdf_in.contiguous(),
             guide = guide_in.contiguous();
  const int64_t rows = active.size(0), width = active.size(1), n = cdf.size(0), g = guide.size(0);
  auto out = active.clone();
  const auto stream = c10::cuda::getCurrentCUDAStream();
  cuda::ErrorFlag flag(active.device(), stream);
  if (!rows_to_do(op, cdf, rows, width, stream, flag)) return out;
  const auto sorted = sorted_heads(active, head);
  check_heads_kernel<<<rows, kThreads, 0, stream>>>(head.data_ptr<int64_t>(), sorted.data_ptr<int64_t>(),
                                                     cdf.data_ptr<double>(), width, n, tries, nullptr, flag.ptr());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (width > 0) {
    draw_kernel<<<cuda::ceil_div(rows * width, kThreads), kThreads, 0, stream>>>(
        head.data_ptr<int64_t>(), sorted.data_ptr<int64_t>(), cdf.data_ptr<double>(), guide.data_ptr<int32_t>(), rows,
        width, n, g, tries, seed, out.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  raise_problem(op, flag.read(), width, n);
  return out;
}

at::Tensor proposal_log_weights_cuda(const at::Tensor& active_in, const at::Tensor& head_in, const at::Tensor& cdf_in,
                                     int64_t tries) {
  const char* op = "proposal_log_weights";
  check_proposal_args(op, active_in, head_in, cdf_in, nullptr, tries);
  check_devices(op, active_in, head_in, cdf_in, nullptr);
  const c10::cuda::CUDAGuard device_guard(active_in.device());
  const auto active = active_in.contiguous(), head = head_in.contiguous(), cdf = cdf_in.contiguous();
  const int64_t rows = active.size(0), width = active.size(1), n = cdf.size(0);
  auto out = at::empty({rows, width}, active.options().dtype(at::kFloat));
  const auto stream = c10::cuda::getCurrentCUDAStream();
  cuda::ErrorFlag flag(active.device(), stream);
  if (!rows_to_do(op, cdf, rows, width, stream, flag)) return out;
  const auto sorted = sorted_heads(active, head);
  auto scale = at::empty({rows}, cdf.options());
  check_heads_kernel<<<rows, kThreads, 0, stream>>>(head.data_ptr<int64_t>(), sorted.data_ptr<int64_t>(),
                                                     cdf.data_ptr<double>(), width, n, tries, scale.data_ptr<double>(),
                                                     flag.ptr());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (width > 0) {
    weights_kernel<<<cuda::ceil_div(rows * width, kThreads), kThreads, 0, stream>>>(
        active.data_ptr<int64_t>(), head.data_ptr<int64_t>(), sorted.data_ptr<int64_t>(), cdf.data_ptr<double>(),
        scale.data_ptr<double>(), rows, width, n, out.data_ptr<float>(), flag.ptr());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  raise_problem(op, flag.read(), width, n);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(lsh_torch, CUDA, m) {
  m.impl("proposal_draw", &proposal_draw_cuda);
  m.impl("proposal_log_weights", &proposal_log_weights_cuda);
}

}  // namespace lsh_torch
