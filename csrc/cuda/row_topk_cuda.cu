// CUDA kernel of row_topk: a stable descending sort of each row (torch.sort's segmented sort), cut to
// its first k columns (every NaN first, ties by lower column, -0.0 equal to 0.0). A full sort, so no
// faster than torch.topk there; it keeps the CPU kernel's order.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <limits>

#include "op_checks.h"
#include "cuda_common.cuh"

namespace lsh_torch {
namespace {

at::Tensor row_topk_cuda(const at::Tensor& scores, int64_t k) {
  check_row_topk_args(scores, k);
  cuda::check_cuda(scores, "scores", "row_topk");
  const c10::cuda::CUDAGuard guard(scores.device());
  if (scores.size(0) == 0 || k == 0) return at::empty({scores.size(0), k}, scores.options().dtype(at::kLong));
  // Rows wider than 128 go to a radix sort, which orders bits: a NaN with its sign bit set would sort below
  // -inf (pytorch/pytorch#190781) and -0.0 below 0.0. One positive NaN, and x + 0 (-0.0 + 0 is 0.0), first.
  const auto canonical = scores.masked_fill(scores.isnan(), std::numeric_limits<double>::quiet_NaN()).add(0);
  const auto order = std::get<1>(at::sort(canonical, /*stable=*/true, /*dim=*/1, /*descending=*/true));
  return order.narrow(1, 0, k).contiguous();
}

}  // namespace

TORCH_LIBRARY_IMPL(lsh_torch, CUDA, m) { m.impl("row_topk", &row_topk_cuda); }

}  // namespace lsh_torch
