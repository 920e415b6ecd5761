// CPU kernels of the sparse linear layer: out[b, a] = W[active[b, a]] . x[b] + bias[active[b, a]]
// and its gradients. Weight rows are contiguous, so each active neuron is one streaming read.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <utility>
#include <vector>

#include "op_checks.h"
#include "prefetch.h"

namespace lsh_torch {
namespace {

void check_active(const at::Tensor& active, int64_t batch, int64_t num_rows, const char* op) {
  TORCH_CHECK(active.dim() == 2 && active.scalar_type() == at::kLong, op, ": active must be int64 [B, A], got ",
              active.scalar_type(), " of shape ", active.sizes());
  TORCH_CHECK(active.size(0) == batch, op, ": active has ", active.size(0), " rows but the batch has ", batch);
  TORCH_CHECK(active.device().is_cpu(), op, ": active must be on the CPU like the other inputs");
  const auto* a = active.data_ptr<int64_t>();
  for (int64_t i = 0; i < active.numel(); ++i)
    TORCH_CHECK(a[i] >= 0 && a[i] < num_rows, op, ": active index ", a[i], " is outside [0, ", num_rows, ")");
}

void check_matrix(const at::Tensor& t, const char* name, const char* op) {
  TORCH_CHECK(t.dim() == 2, op, ": ", name, " must be 2-D, got shape ", t.sizes());
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), op, ": ", name, " must be floating, got ", t.scalar_type());
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got ", t.device());
}

void check_same_dtype(const at::Tensor& a, const at::Tensor& b, const char* na, const char* nb, const char* op) {
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), op, ": ", na, " and ", nb, " must have the same dtype, got ",
              a.scalar_type(), " and ", b.scalar_type());
}

template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
inline acc_t dot(const scalar_t* __restrict__ u, const scalar_t* __restrict__ v, int64_t d) {
  acc_t acc = 0;
#pragma omp simd reduction(+ : acc)
  for (int64_t k = 0; k < d; ++k) acc += static_cast<acc_t>(u[k]) * static_cast<acc_t>(v[k]);
  return acc;
}

// Rows of W gathered by `active` are random places in a weight far larger than the caches: each
// row is fetched kRowsAhead rows before its use (prefetch_row). 670K outputs, 1,024 rows x 768
// active: 190 -> 105 ms.
constexpr int64_t kRowsAhead = 8;

at::Tensor sparse_linear_cpu(const at::Tensor& x_in, const at::Tensor& w_in, const std::optional<at::Tensor>& bias_in,
                             const at::Tensor& active_in) {
  const char* op = "sparse_linear";
  check_matrix(x_in, "x", op);
  check_matrix(w_in, "weight", op);
  check_same_dtype(x_in, w_in, "x", "weight", op);
  TORCH_CHECK(x_in.size(1) == w_in.size(1), op, ": x has ", x_in.size(1), " features but weight expects ", w_in.size(1));
  const bool has_bias = bias_in.has_value() && bias_in->defined();
  if (has_bias) {
    TORCH_CHECK(bias_in->dim() == 1 && bias_in->size(0) == w_in.size(0), op, ": bias must be [", w_in.size(0),
                "], got shape ", bias_in->sizes());
    check_same_dtype(x_in, *bias_in, "x", "bias", op);
  }
  const auto active = active_in.contiguous();
  check_active(active, x_in.size(0), w_in.size(0), op);
  const auto x = x_in.contiguous();
  const auto w = w_in.contiguous();
  const at::Tensor bias = has_bias ? bias_in->contiguous() : at::Tensor();
  const int64_t batch = x.size(0), d = x.size(1), budget = active.size(1);
  auto out = at::empty({batch, budget}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "sparse_linear", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* wp = w.data_ptr<scalar_t>();
    const scalar_t* bp = has_bias ? bias.data_ptr<scalar_t>() : nullptr;
    const int64_t* ap = active.data_ptr<int64_t>();
    scalar_t* op_ = out.data_ptr<scalar_t>();
    at::parallel_for(0, batch * budget, 64, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        if (i + kRowsAhead < end) prefetch_row(wp + ap[i + kRowsAhead] * d, d);
        const int64_t row = ap[i];
        auto acc = dot(wp + row * d, xp + (i / budget) * d, d);
        if (bp) acc += static_cast<decltype(acc)>(bp[row]);
        op_[i] = static_cast<scalar_t>(acc);
      }
    });
  });
  return out;
}

at::Tensor sparse_linear_grad_input_cpu(const at::Tensor& g_in, const at::Tensor& w_in, const at::Tensor& active_in) {
  const char* op = "sparse_linear_grad_input";
  check_matrix(g_in, "grad_out", op);
  check_matrix(w_in, "weight", op);
  check_same_dtype(g_in, w_in, "grad_out", "weight", op);
  const auto active = active_in.contiguous();
  check_active(active, g_in.size(0), w_in.size(0), op);
  TORCH_CHECK(g_in.size(1) == active.size(1), op, ": grad_out must be [B, A] like active, got ", g_in.sizes());
  const auto g = g_in.contiguous();
  const auto w = w_in.contiguous();
  const int64_t batch = g.size(0), budget = g.size(1), d = w.size(1);
  auto grad_x = at::empty({batch, d}, g.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "sparse_linear_grad_input", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* gp = g.data_ptr<scalar_t>();
    const scalar_t* wp = w.data_ptr<scalar_t>();
    const int64_t* ap = active.data_ptr<int64_t>();
    scalar_t* out = grad_x.data_ptr<scalar_t>();
    at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> acc(d);
      for (int64_t b = begin; b < end; ++b) {
        std::fill(acc.begin(), acc.end(), acc_t(0));
        for (int64_t a = 0; a < budget; ++a) {
          if (a + kRowsAhead < budget) prefetch_row(wp + ap[b * budget + a + kRowsAhead] * d, d);
          const acc_t ga = static_cast<acc_t>(gp[b * budget + a]);
          const scalar_t* wr = wp + ap[b * budget + a] * d;
          _Pragma("omp simd")
          for (int64_t k = 0; k < d; ++k) acc[k] += ga * static_cast<acc_t>(wr[k]);
        }
        for (int64_t k = 0; k < d; ++k) out[b * d + k] = static_cast<scalar_t>(acc[k]);
      }
    });
  });
  return grad_x;
}

// Sorts (row << 32 | pair) keys whose pairs ascend: a stable radix sort on the rows' bits in use, 11
// bits a pass, leaves each row's pairs ascending, as a sort of the whole keys would. (std::sort took
// half of an LM step's backward here: 1,024 tokens x 128 outputs of 50K, 5.5 of 10.8 ms.)
void sort_by_row(std::vector<uint64_t>& keys, uint32_t max_row) {
  constexpr int kDigitBits = 11;
  constexpr uint64_t kDigits = uint64_t(1) << kDigitBits;
  std::vector<uint64_t> sorted(keys.size());
  std::vector<int64_t> start(kDigits);
  for (int shift = 32; shift < 64 && (max_row >> (shift - 32)) != 0; shift += kDigitBits) {
    std::fill(start.begin(), start.end(), 0);
    for (uint64_t key : keys) ++start[(key >> shift) & (kDigits - 1)];
    int64_t total = 0;
    for (int64_t& s : start) total += std::exchange(s, total);
    for (uint64_t key : keys) sorted[start[(key >> shift) & (kDigits - 1)]++] = key;
    keys.swap(sorted);
  }
}

// Weight and bias gradient of the touched rows, without races: the (row, pair) keys are sorted
// so that each row's pairs are contiguous, then rows are summed in parallel. The pairs of a row
// are summed in a fixed order, so the result is deterministic. With `dense`, row u lands at
// rows[u] of [num_rows, d] outputs; otherwise at u of compact [U, d] outputs.
std::tuple<at::Tensor, at::Tensor, at::Tensor> weight_grad_impl(const at::Tensor& g_in, const at::Tensor& x_in,
                                                                const at::Tensor& active_in, int64_t num_rows,
                                                                bool dense, const char* op) {
  check_matrix(g_in, "grad_out", op);
  check_matrix(x_in, "x", op);
  check_same_dtype(g_in, x_in, "grad_out", "x", op);
  TORCH_CHECK(g_in.size(0) == x_in.size(0), op, ": grad_out and x must have the same batch size, got ",
              g_in.size(0), " and ", x_in.size(0));
  const auto active = active_in.contiguous();
  check_active(active, g_in.size(0), num_rows, op);
  TORCH_CHECK(g_in.size(1) == active.size(1), op, ": grad_out must be [B, A] like active, got ", g_in.sizes());
  const auto g = g_in.contiguous();
  const auto x = x_in.contiguous();
  const int64_t budget = g.size(1), d = x.size(1), pairs = g.numel();
  TORCH_CHECK(pairs < std::numeric_limits<uint32_t>::max(), op, ": B*A must be below 2^32");

  const int64_t* ap = active.data_ptr<int64_t>();
  std::vector<uint64_t> keys(pairs);
  at::parallel_for(0, pairs, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) keys[p] = static_cast<uint64_t>(ap[p]) << 32 | static_cast<uint64_t>(p);
  });
  sort_by_row(keys, static_cast<uint32_t>(pairs ? *std::max_element(ap, ap + pairs) : 0));
  std::vector<int64_t> starts;  // first key of each touched row, then `pairs`
  for (int64_t p = 0; p < pairs; ++p)
    if (p == 0 || (keys[p] >> 32) != (keys[p - 1] >> 32)) starts.push_back(p);
  const int64_t touched = static_cast<int64_t>(starts.size());
  starts.push_back(pairs);

  auto rows = at::empty({touched}, active.options());
  auto grad_w = dense ? at::zeros({num_rows, d}, x.options()) : at::empty({touched, d}, x.options());
  auto grad_b = dense ? at::zeros({num_rows}, x.options()) : at::empty({touched}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "sparse_linear_grad_weight", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* gp = g.data_ptr<scalar_t>();
    const scalar_t* xp = x.data_ptr<scalar_t>();
    int64_t* rp = rows.data_ptr<int64_t>();
    scalar_t* gw = grad_w.data_ptr<scalar_t>();
    scalar_t* gb = grad_b.data_ptr<scalar_t>();
    at::parallel_for(0, touched, 16, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> acc(d);
      for (int64_t u = begin; u < end; ++u) {
        std::fill(acc.begin(), acc.end(), acc_t(0));
        acc_t bias_acc = 0;
        for (int64_t p = starts[u]; p < starts[u + 1]; ++p) {
          const int64_t pair = static_cast<int64_t>(keys[p] & 0xffffffffULL);
          const acc_t gv = static_cast<acc_t>(gp[pair]);
          const scalar_t* xr = xp + (pair / budget) * d;
          bias_acc += gv;
          _Pragma("omp simd")
          for (int64_t k = 0; k < d; ++k) acc[k] += gv * static_cast<acc_t>(xr[k]);
        }
        const int64_t row = static_cast<int64_t>(keys[starts[u]] >> 32);
        rp[u] = row;
        const int64_t dst = dense ? row : u;
        for (int64_t k = 0; k < d; ++k) gw[dst * d + k] = static_cast<scalar_t>(acc[k]);
        gb[dst] = static_cast<scalar_t>(bias_acc);
      }
    });
  });
  return {rows, grad_w, grad_b};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sparse_linear_grad_weight_rows_cpu(const at::Tensor& g,
                                                                                  const at::Tensor& x,
                                                                                  const at::Tensor& active) {
  // The compact form needs no row count; rows only have to fit the 32-bit half of a sort key.
  return weight_grad_impl(g, x, active, std::numeric_limits<int32_t>::max(), false, "sparse_linear_grad_weight_rows");
}

std::tuple<at::Tensor, at::Tensor> sparse_linear_grad_weight_cpu(const at::Tensor& g, const at::Tensor& x,
                                                                 const at::Tensor& active, int64_t num_rows) {
  check_grad_weight_rows(num_rows, "sparse_linear_grad_weight");
  auto [rows, grad_w, grad_b] = weight_grad_impl(g, x, active, num_rows, true, "sparse_linear_grad_weight");
  return {grad_w, grad_b};
}

}  // namespace

TORCH_LIBRARY_IMPL(lsh_torch, CPU, m) {
  m.impl("sparse_linear", &sparse_linear_cpu);
  m.impl("sparse_linear_grad_input", &sparse_linear_grad_input_cpu);
  m.impl("sparse_linear_grad_weight_rows", &sparse_linear_grad_weight_rows_cpu);
  m.impl("sparse_linear_grad_weight", &sparse_linear_grad_weight_cpu);
}

}  // namespace lsh_torch
