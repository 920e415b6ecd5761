// Device-independent argument checks, shared by the CPU and CUDA kernels so that both raise the
// same messages: shapes, dtypes and limits. Device checks and checks of tensor contents stay with
// each kernel (they differ in how they can read memory).
#pragma once
#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <utility>
#include <vector>

#include "lsh_common.h"

namespace lsh_torch {

// mips_transform: rows [n, d] floating; max_norm only for data rows: one positive finite value.
// Returns max_norm's value (0 when not given); reading it syncs once with its device.
// A given max_norm bounds the rows' norms up to this relative tolerance: the kernels sum the squares
// in another order than torch.linalg.vector_norm, so a max_norm computed by it may be a rounding below.
constexpr double kMaxNormTolerance = 1e-5;

inline double check_mips_args(const at::Tensor& rows, bool query, const std::optional<at::Tensor>& max_norm) {
  TORCH_CHECK(rows.dim() == 2, "mips_transform: rows must be 2-D [n, d], got shape ", rows.sizes());
  TORCH_CHECK(at::isFloatingType(rows.scalar_type()), "mips_transform: rows must be a floating tensor, got ",
              rows.scalar_type());
  if (!max_norm.has_value() || !max_norm->defined()) return 0;
  TORCH_CHECK(!query, "mips_transform: max_norm applies to data rows (query=False) only");
  TORCH_CHECK(max_norm->numel() == 1 && at::isFloatingType(max_norm->scalar_type()),
              "mips_transform: max_norm must be a floating tensor of one element, got ", max_norm->scalar_type(),
              " of shape ", max_norm->sizes());
  const double m = max_norm->item<double>();
  TORCH_CHECK(std::isfinite(m) && m > 0, "mips_transform: max_norm must be positive and finite, got ", m);
  // The kernels scale in the rows' compute type (float32 below float64): a larger M would round to
  // inf there and turn every row into zeros.
  const double limit = rows.scalar_type() == at::kDouble ? std::numeric_limits<double>::max()
                                                         : std::numeric_limits<float>::max();
  TORCH_CHECK(m <= limit, "mips_transform: max_norm must be at most ", limit, " for ", rows.scalar_type(),
              " rows (their compute type's largest value), got ", m);
  return m;
}

// row_fingerprints: rows [n, d] floating, vector [d] float32.
inline void check_fingerprint_args(const at::Tensor& rows, const at::Tensor& vector) {
  TORCH_CHECK(rows.dim() == 2 && at::isFloatingType(rows.scalar_type()),
              "row_fingerprints: rows must be a floating [n, d] tensor, got ", rows.scalar_type(), " of shape ",
              rows.sizes());
  TORCH_CHECK(vector.dim() == 1 && vector.scalar_type() == at::kFloat && vector.size(0) == rows.size(1),
              "row_fingerprints: vector must be float32 [d] with d = ", rows.size(1), ", got ", vector.scalar_type(),
              " of shape ", vector.sizes());
  TORCH_CHECK(vector.device() == rows.device(), "row_fingerprints: rows and vector must be on one device, got ",
              rows.device(), " and ", vector.device());
}

// row_topk: scores [B, U] floating, k in [0, U].
inline void check_row_topk_args(const at::Tensor& scores, int64_t k) {
  TORCH_CHECK(scores.dim() == 2 && at::isFloatingType(scores.scalar_type()),
              "row_topk: scores must be a floating [B, U] tensor, got ", scores.scalar_type(), " of shape ",
              scores.sizes());
  TORCH_CHECK(k >= 0 && k <= scores.size(1), "row_topk: k must be in [0, U = ", scores.size(1), "], got ", k);
}

inline void check_bits_tables(const char* op, int64_t num_tables, int64_t bits) {
  TORCH_CHECK(bits >= 1 && bits <= kMaxBits, op, ": bits (K) must be in [1, ", kMaxBits, "], got ", bits);
  TORCH_CHECK(num_tables >= 1 && num_tables <= kMaxTables,
              op, ": num_tables (L) must be in [1, ", kMaxTables, "], got ", num_tables);
}

struct DwtaShape {
  int64_t n, d, num_bins, bin_size, bin_bits, hashes_per_table, bits;
};

// dwta_codes: rows [n, d] floating, bins [L*H, bin_size] int64 with bin_size a power of two >= 2 and
// K = H * log2(bin_size) <= kMaxBits. That bins hold indices in [0, d) is checked by each kernel.
inline DwtaShape check_dwta_args(const at::Tensor& rows, const at::Tensor& bins, int64_t num_tables) {
  TORCH_CHECK(rows.dim() == 2 && at::isFloatingType(rows.scalar_type()),
              "dwta_codes: rows must be a floating [n, d] tensor, got ", rows.scalar_type(), " of shape ",
              rows.sizes());
  TORCH_CHECK(bins.dim() == 2 && bins.scalar_type() == at::kLong,
              "dwta_codes: bins must be int64 [L*H, bin_size], got ", bins.scalar_type(), " of shape ", bins.sizes());
  TORCH_CHECK(bins.device() == rows.device(), "dwta_codes: rows and bins must be on one device, got ",
              rows.device(), " and ", bins.device());
  TORCH_CHECK(num_tables >= 1 && num_tables <= kMaxTables,
              "dwta_codes: num_tables (L) must be in [1, ", kMaxTables, "], got ", num_tables);
  const int64_t num_bins = bins.size(0), bin_size = bins.size(1);
  TORCH_CHECK(bin_size >= 2 && bin_size <= (int64_t(1) << kMaxBits) && (bin_size & (bin_size - 1)) == 0,
              "dwta_codes: bins must have a power-of-two bin_size in [2, 2^", kMaxBits, "] columns, got ", bin_size);
  TORCH_CHECK(num_bins >= num_tables && num_bins % num_tables == 0,
              "dwta_codes: bins must have L*H rows, a positive multiple of num_tables = ", num_tables, ", got ",
              num_bins);
  const int64_t bin_bits = __builtin_ctzll(static_cast<uint64_t>(bin_size)), hashes = num_bins / num_tables;
  TORCH_CHECK(hashes * bin_bits <= kMaxBits, "dwta_codes: bins give K = H * log2(bin_size) = ", hashes, " * ",
              bin_bits, " = ", hashes * bin_bits, " bits per table; at most ", kMaxBits, " fit a code");
  TORCH_CHECK(rows.size(1) >= 1, "dwta_codes: rows must have at least one column (d >= 1)");
  TORCH_CHECK(rows.size(0) < std::numeric_limits<int32_t>::max(), "dwta_codes: too many rows");
  return {rows.size(0), rows.size(1), num_bins, bin_size, bin_bits, hashes, hashes * bin_bits};
}

// build_tables: codes [N, L] int32 of every neuron.
inline void check_build_tables_args(const at::Tensor& codes, int64_t bits) {
  TORCH_CHECK(codes.dim() == 2, "build_tables: codes must be 2-D [N, L], got shape ", codes.sizes());
  TORCH_CHECK(codes.scalar_type() == at::kInt, "build_tables: codes must be int32, got ", codes.scalar_type());
  check_bits_tables("build_tables", codes.size(1), bits);
  TORCH_CHECK(codes.size(0) < std::numeric_limits<int32_t>::max(), "build_tables: too many rows");
}

struct UpdateTablesShape {
  int64_t num_tables, buckets, n, moved;
};

// update_tables: tables offsets [L, 2^K + 1] int32 and items [L, N] int32 (as build_tables gives
// them), rows [R] int64 and their codes before and after, old_codes / new_codes [R, L] int32.
// Contents (rows strictly increasing in [0, N), codes in [0, 2^K), offsets and items a valid CSR
// with ascending ids per bucket, each row in its old bucket) are checked by each kernel.
inline UpdateTablesShape check_update_tables_args(const at::Tensor& offsets, const at::Tensor& items,
                                                  const at::Tensor& rows, const at::Tensor& old_codes,
                                                  const at::Tensor& new_codes) {
  TORCH_CHECK(offsets.dim() == 2 && offsets.scalar_type() == at::kInt,
              "update_tables: offsets must be int32 [L, 2^K + 1], got ", offsets.scalar_type(), " of shape ",
              offsets.sizes());
  TORCH_CHECK(items.dim() == 2 && items.scalar_type() == at::kInt, "update_tables: items must be int32 [L, N], got ",
              items.scalar_type(), " of shape ", items.sizes());
  const int64_t num_tables = offsets.size(0), buckets = offsets.size(1) - 1, n = items.size(1);
  TORCH_CHECK(buckets >= 2 && (buckets & (buckets - 1)) == 0 && buckets <= (int64_t(1) << kMaxBits),
              "update_tables: offsets must have 2^K + 1 columns, 1 <= K <= ", kMaxBits, ", got ", buckets + 1);
  check_bits_tables("update_tables", num_tables, __builtin_ctzll(static_cast<uint64_t>(buckets)));
  TORCH_CHECK(items.size(0) == num_tables, "update_tables: items must have one row per table (L = ", num_tables,
              "), got ", items.size(0));
  TORCH_CHECK(n < std::numeric_limits<int32_t>::max(), "update_tables: too many items");
  TORCH_CHECK(rows.dim() == 1 && rows.scalar_type() == at::kLong, "update_tables: rows must be int64 [R], got ",
              rows.scalar_type(), " of shape ", rows.sizes());
  const int64_t moved = rows.size(0);
  for (const auto& [codes, name] : {std::pair{&old_codes, "old_codes"}, std::pair{&new_codes, "new_codes"}}) {
    TORCH_CHECK(codes->dim() == 2 && codes->scalar_type() == at::kInt && codes->size(0) == moved &&
                    codes->size(1) == num_tables,
                "update_tables: ", name, " must be int32 [R, L] = [", moved, ", ", num_tables, "], got ",
                codes->scalar_type(), " of shape ", codes->sizes());
  }
  TORCH_CHECK(moved <= n, "update_tables: more rows (", moved, ") than items per table (", n, ")");
  return {num_tables, buckets, n, moved};
}

struct QueryShape {
  int64_t batch, num_tables, n, buckets, bits, num_labels;
};

// query / query_shared: codes [B, L] int32, margins [B, L*K] float32, offsets [L, 2^K + 1] int32,
// items [L, N] int32, labels [B, M] int64 (optional), 0 <= tail <= budget <= N.
inline QueryShape check_query_args(const at::Tensor& codes, const at::Tensor& margins, const at::Tensor& offsets,
                                   const at::Tensor& items, int64_t probes, int64_t budget, int64_t tail,
                                   const std::optional<at::Tensor>& labels, const char* op) {
  TORCH_CHECK(codes.dim() == 2 && codes.scalar_type() == at::kInt, op, ": codes must be int32 [B, L], got ",
              codes.scalar_type(), " of shape ", codes.sizes());
  TORCH_CHECK(offsets.dim() == 2 && offsets.scalar_type() == at::kInt, op,
              ": offsets must be int32 [L, 2^K + 1], got ", offsets.scalar_type(), " of shape ", offsets.sizes());
  TORCH_CHECK(items.dim() == 2 && items.scalar_type() == at::kInt, op, ": items must be int32 [L, N], got ",
              items.scalar_type(), " of shape ", items.sizes());
  const int64_t batch = codes.size(0), num_tables = codes.size(1), n = items.size(1);
  const int64_t buckets = offsets.size(1) - 1;
  TORCH_CHECK(buckets >= 2 && (buckets & (buckets - 1)) == 0 && buckets <= (int64_t(1) << kMaxBits), op,
              ": offsets must have 2^K + 1 columns with 1 <= K <= ", kMaxBits, ", got ", offsets.size(1));
  const int64_t bits = __builtin_ctzll(static_cast<uint64_t>(buckets));
  TORCH_CHECK(offsets.size(0) == num_tables && items.size(0) == num_tables, op,
              ": codes, offsets and items must agree on the number of tables L, got ", num_tables, ", ",
              offsets.size(0), " and ", items.size(0));
  TORCH_CHECK(num_tables <= kMaxTables, op, ": num_tables (L) must be at most ", kMaxTables, ", got ", num_tables);
  TORCH_CHECK(margins.dim() == 2 && margins.scalar_type() == at::kFloat && margins.size(0) == batch &&
                  margins.size(1) == num_tables * bits,
              op, ": margins must be float32 [B, L*K] = [", batch, ", ", num_tables * bits, "], got ",
              margins.scalar_type(), " of shape ", margins.sizes());
  TORCH_CHECK(probes >= 1 && probes <= std::min<int64_t>(kMaxProbes, buckets), op, ": probes must be in [1, min(",
              kMaxProbes, ", 2^K = ", buckets, ")], got ", probes);
  TORCH_CHECK(budget >= 0 && budget <= n, op, ": budget must be in [0, N = ", n, "], got ", budget);
  TORCH_CHECK(tail >= 0 && tail <= budget, op, ": tail must be in [0, budget = ", budget, "], got ", tail);
  TORCH_CHECK(n < std::numeric_limits<int32_t>::max(), op, ": too many neurons (N = ", n, ")");
  int64_t num_labels = 0;
  if (labels.has_value() && labels->defined()) {
    TORCH_CHECK(labels->dim() == 2 && labels->scalar_type() == at::kLong && labels->size(0) == batch, op,
                ": labels must be int64 [B, M] with B = ", batch, ", got ", labels->scalar_type(), " of shape ",
                labels->sizes());
    TORCH_CHECK(labels->numel() < std::numeric_limits<int32_t>::max(), op, ": too many labels");
    num_labels = labels->size(1);
  }
  return {batch, num_tables, n, buckets, bits, num_labels};
}

// query's row_keys: int64 [B] on the codes' device, if given.
inline void check_row_keys(const std::optional<at::Tensor>& row_keys, const at::Tensor& codes) {
  if (!row_keys.has_value() || !row_keys->defined()) return;
  TORCH_CHECK(row_keys->dim() == 1 && row_keys->scalar_type() == at::kLong && row_keys->size(0) == codes.size(0),
              "query: row_keys must be int64 [B] with B = ", codes.size(0), ", got ", row_keys->scalar_type(),
              " of shape ", row_keys->sizes());
  TORCH_CHECK(row_keys->device() == codes.device(), "query: row_keys must be on ", codes.device(),
              " like the other inputs, got one on ", row_keys->device());
}

// lazy_adam_: param, exp_avg, exp_avg_sq of one shape and dtype, rows [U] int64, grad_rows
// [U, *param.shape[1:]]. Returns the number of elements per row.
inline int64_t check_lazy_adam_args(const at::Tensor& param, const at::Tensor& exp_avg, const at::Tensor& exp_avg_sq,
                                    const at::Tensor& rows, const at::Tensor& grad, double step_size, double beta1,
                                    double beta2, double eps, double decay, const char* op) {
  TORCH_CHECK(param.is_contiguous() && exp_avg.is_contiguous() && exp_avg_sq.is_contiguous(), op,
              ": param, exp_avg and exp_avg_sq must be contiguous");
  TORCH_CHECK(param.dim() >= 1, op, ": param must have at least one dimension (its rows), got a 0-dim tensor");
  TORCH_CHECK(exp_avg.sizes() == param.sizes() && exp_avg_sq.sizes() == param.sizes(), op,
              ": exp_avg and exp_avg_sq must have param's shape ", param.sizes());
  TORCH_CHECK(exp_avg.scalar_type() == param.scalar_type() && exp_avg_sq.scalar_type() == param.scalar_type() &&
                  grad.scalar_type() == param.scalar_type(),
              op, ": param, exp_avg, exp_avg_sq and grad_rows must share one dtype");
  TORCH_CHECK(at::isFloatingType(param.scalar_type()), op, ": param must be floating, got ", param.scalar_type());
  TORCH_CHECK(rows.dim() == 1 && rows.scalar_type() == at::kLong, op, ": rows must be int64 [U], got ",
              rows.scalar_type(), " of shape ", rows.sizes());
  const int64_t num_rows = param.size(0), width = param.numel() / std::max<int64_t>(num_rows, 1);
  std::vector<int64_t> grad_shape = param.sizes().vec();
  grad_shape[0] = rows.size(0);
  TORCH_CHECK(grad.sizes() == at::IntArrayRef(grad_shape), op, ": grad_rows must be [U, *param.shape[1:]] = ",
              at::IntArrayRef(grad_shape), ", got ", grad.sizes());
  TORCH_CHECK(beta1 >= 0 && beta1 < 1, op, ": beta1 must be in [0, 1), got ", beta1);
  TORCH_CHECK(beta2 >= 0 && beta2 < 1, op, ": beta2 must be in [0, 1), got ", beta2);
  TORCH_CHECK(eps >= 0, op, ": eps must be >= 0, got ", eps);
  TORCH_CHECK(std::isfinite(step_size), op, ": step_size must be finite, got ", step_size);
  TORCH_CHECK(decay >= 0 && decay <= 1, op, ": decay (lr * weight_decay) must be in [0, 1], got ", decay);
  // An update reads and writes param and the moments element by element: they must not overlap,
  // nor may what it reads (a row's gradient read after an earlier row's update wrote it). The read
  // ones may be strided or expanded (overlap "too hard to tell"): the kernels copy those first.
  for (const auto& [a, b] : {std::pair{&param, &exp_avg}, {&param, &exp_avg_sq}, {&exp_avg, &exp_avg_sq}})
    TORCH_CHECK(at::get_overlap_status(*a, *b) == at::MemOverlapStatus::No, op,
                ": param, exp_avg and exp_avg_sq must not share memory");
  for (const auto* written : {&param, &exp_avg, &exp_avg_sq})
    for (const auto& [read, name] : {std::pair{&grad, "grad_rows"}, {&rows, "rows"}}) {
      const auto overlap = at::get_overlap_status(*written, *read);
      TORCH_CHECK(overlap != at::MemOverlapStatus::Full && overlap != at::MemOverlapStatus::Partial, op, ": ", name,
                  " must not share memory with param, exp_avg or exp_avg_sq");
    }
  return width;
}

// proposal_draw (guide given) and proposal_log_weights: active [R, A] int64, head [R] int64, cdf [N] float64 with
// N >= 1, guide [G] int32 with G >= 1, tries in [1, kMaxTries]. (head's and active's values, and cdf's total, are
// checked by each kernel.)
inline void check_proposal_args(const char* op, const at::Tensor& active, const at::Tensor& head, const at::Tensor& cdf,
                                const at::Tensor* guide, int64_t tries) {
  TORCH_CHECK(active.dim() == 2 && active.scalar_type() == at::kLong, op, ": active must be an int64 [R, A] tensor, got ",
              active.scalar_type(), " of shape ", active.sizes());
  TORCH_CHECK(head.dim() == 1 && head.scalar_type() == at::kLong && head.size(0) == active.size(0), op,
              ": head must be an int64 [R] tensor with R = ", active.size(0), " (active's rows), got ", head.scalar_type(),
              " of shape ", head.sizes());
  TORCH_CHECK(cdf.dim() == 1 && cdf.scalar_type() == at::kDouble && cdf.size(0) >= 1, op,
              ": cdf must be a float64 [N] tensor with N >= 1, got ", cdf.scalar_type(), " of shape ", cdf.sizes());
  if (guide != nullptr)
    TORCH_CHECK(guide->dim() == 1 && guide->scalar_type() == at::kInt && guide->size(0) >= 1, op,
                ": guide must be an int32 [G] tensor with G >= 1, got ", guide->scalar_type(), " of shape ",
                guide->sizes());
  TORCH_CHECK(tries >= 1 && tries <= kMaxTries, op, ": tries must be in [1, ", kMaxTries, "], got ", tries);
}

// sparse_linear_grad_weight: the kernels sort 32-bit row keys (int32 on CUDA).
inline void check_grad_weight_rows(int64_t num_rows, const char* op) {
  TORCH_CHECK(num_rows >= 0 && num_rows <= std::numeric_limits<int32_t>::max(), op, ": num_rows must be in [0, 2^31 - 1]"
              " (row ids are sorted as 32-bit keys), got ", num_rows);
}

}  // namespace lsh_torch
