// CPU kernel of the lazy (row-sparse) Adam step: one fused pass over the touched rows, where
// torch.optim.SparseAdam makes a dozen passes (masks, updates, sparse adds).
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <initializer_list>
#include <limits>

#include "op_checks.h"
#include "prefetch.h"

namespace lsh_torch {
namespace {

// One row's update, branch-free so that gcc vectorizes it (with setup.py's -fno-math-errno and
// -fno-trapping-math; the scalar loop took 9 ns an element). Restricted pointers: check_lazy_adam_args
// refuses overlapping param, moments and gradient.
template <typename scalar_t, typename acc_t>
inline void adam_row(scalar_t* __restrict__ p, scalar_t* __restrict__ m, scalar_t* __restrict__ v,
                     const scalar_t* __restrict__ g, int64_t width, acc_t c1, acc_t c2, acc_t e, acc_t lr, acc_t keep) {
  constexpr acc_t big = std::numeric_limits<acc_t>::max();
  for (int64_t k = 0; k < width; ++k) {
    const acc_t gk = static_cast<acc_t>(g[k]);
    const acc_t mo = static_cast<acc_t>(m[k]), vo = static_cast<acc_t>(v[k]);
    const acc_t mk = mo + (gk - mo) * c1;
    // Where g^2 overflows (|g| > 1.8e19 in float) or v did, Adam's order (its addcmul: v * beta2 + (1 - beta2)
    // * g * g, the product scaled first) keeps v finite, or inf as Adam's: SparseAdam's gave NaN (inf - inf).
    const acc_t gg = gk * gk;
    const acc_t sparse_adams = vo + (gg - vo) * c2, adams = vo * (acc_t(1) - c2) + (c2 * gk) * gk;
    const bool finite = gg <= big & std::abs(vo) <= big;  // std::isfinite's branches kept the loop scalar
    const acc_t vk = finite ? sparse_adams : adams;
    m[k] = static_cast<scalar_t>(mk);
    v[k] = static_cast<scalar_t>(vk);
    p[k] = static_cast<scalar_t>(static_cast<acc_t>(p[k]) * keep - mk / (std::sqrt(vk) + e) * lr);
  }
}

void lazy_adam_cpu(at::Tensor& param, at::Tensor& exp_avg, at::Tensor& exp_avg_sq, const at::Tensor& rows_in,
                   const at::Tensor& grad_in, double step_size, double beta1, double beta2, double eps, double decay) {
  const char* op = "lazy_adam_";
  const int64_t width =
      check_lazy_adam_args(param, exp_avg, exp_avg_sq, rows_in, grad_in, step_size, beta1, beta2, eps, decay, op);
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&param, &exp_avg, &exp_avg_sq, &rows_in, &grad_in})
    TORCH_CHECK(t->device().is_cpu(), op, ": all tensors must be on the CPU, got one on ", t->device());
  const int64_t num_rows = param.size(0);
  const auto rows = rows_in.contiguous();
  const auto grad = grad_in.contiguous();
  const int64_t* rp = rows.data_ptr<int64_t>();
  for (int64_t i = 0; i < rows.numel(); ++i) {
    TORCH_CHECK(rp[i] >= 0 && rp[i] < num_rows, op, ": rows must be in [0, ", num_rows, "), got ", rp[i]);
    // Strictly increasing (as in a coalesced sparse gradient) means unique: no two updates race.
    TORCH_CHECK(i == 0 || rp[i] > rp[i - 1], op, ": rows must be strictly increasing (coalesce the gradient)");
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, param.scalar_type(), "lazy_adam_", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    scalar_t* p = param.data_ptr<scalar_t>();
    scalar_t* m = exp_avg.data_ptr<scalar_t>();
    scalar_t* v = exp_avg_sq.data_ptr<scalar_t>();
    const scalar_t* g = grad.data_ptr<scalar_t>();
    // SparseAdam's operations in its order (but for an overflowing g^2, below), 1 - beta computed in double as Python does; AdamW's
    // decay first, param * (1 - decay) in acc_t (float32 AdamW rounds the same; for half and
    // bfloat16 it would round the product to the parameter's dtype, this keeps it in float).
    const acc_t c1 = static_cast<acc_t>(1.0 - beta1), c2 = static_cast<acc_t>(1.0 - beta2);
    const acc_t e = eps, lr = step_size, keep = static_cast<acc_t>(1.0 - decay);
    // The rows a few updates ahead, fetched: random rows of a wide layer miss every cache (670K x 128,
    // 2,048 rows, 2 threads: 0.96-1.24 -> 0.54-0.60 ms; 16,384 rows 7.4-7.8 -> 3.3-4.5 ms).
    constexpr int64_t kRowsAhead = 4;
    at::parallel_for(0, rows.numel(), 64, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        if (i + kRowsAhead < end) {
          const int64_t ahead = rp[i + kRowsAhead] * width;
          for (const scalar_t* row : {p + ahead, m + ahead, v + ahead}) prefetch_row(row, width);
        }
        const int64_t base = rp[i] * width;
        adam_row(p + base, m + base, v + base, g + i * width, width, c1, c2, e, lr, keep);
      }
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(lsh_torch, CPU, m) { m.impl("lazy_adam_", &lazy_adam_cpu); }

}  // namespace lsh_torch
