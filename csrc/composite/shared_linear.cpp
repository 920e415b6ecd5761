// Batch-shared sparse linear: one gathered GEMM, out = x @ weight[indices]^T + bias[indices].
// Written with ATen ops, so one kernel serves every device (CompositeExplicitAutograd); its
// backward (lsh_torch/ops.py) is three more ATen calls.
#include <ATen/ATen.h>
#include <torch/library.h>

namespace lsh_torch {
namespace {

at::Tensor shared_linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                         const at::Tensor& indices) {
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2, "shared_linear: x and weight must be 2-D, got shapes ", x.sizes(),
              " and ", weight.sizes());
  TORCH_CHECK(x.size(1) == weight.size(1), "shared_linear: x has ", x.size(1), " features but weight expects ",
              weight.size(1));
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "shared_linear: x must be floating, got ", x.scalar_type());
  TORCH_CHECK(x.scalar_type() == weight.scalar_type(), "shared_linear: x and weight must have the same dtype, got ",
              x.scalar_type(), " and ", weight.scalar_type());
  TORCH_CHECK(x.device() == weight.device() && indices.device() == weight.device(),
              "shared_linear: x, weight and indices must be on one device");
  TORCH_CHECK(indices.dim() == 1 && indices.scalar_type() == at::kLong, "shared_linear: indices must be int64 [A], got ",
              indices.scalar_type(), " of shape ", indices.sizes());
  if (indices.numel() > 0) {
    auto [lo, hi] = at::aminmax(indices);
    const auto bounds = at::stack({lo, hi}).cpu();  // one synchronisation on a GPU, not two
    const int64_t* b = bounds.data_ptr<int64_t>();
    TORCH_CHECK(b[0] >= 0 && b[1] < weight.size(0), "shared_linear: indices must be in [0, ", weight.size(0), ")");
  }
  const auto rows = weight.index_select(0, indices);
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0), "shared_linear: bias must be [", weight.size(0),
                "], got shape ", bias->sizes());
    TORCH_CHECK(bias->scalar_type() == x.scalar_type(), "shared_linear: x and bias must have the same dtype");
    TORCH_CHECK(bias->device() == weight.device(), "shared_linear: bias must be on ", weight.device(),
                " like weight, got one on ", bias->device());
    return at::addmm(bias->index_select(0, indices), x, rows.t());
  }
  return at::mm(x, rows.t());
}

}  // namespace

TORCH_LIBRARY_IMPL(lsh_torch, CompositeExplicitAutograd, m) { m.impl("shared_linear", &shared_linear); }

}  // namespace lsh_torch
