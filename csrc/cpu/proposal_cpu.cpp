// CPU kernels of proposal_draw and proposal_log_weights (a tail drawn from a proposal, lsh_torch/proposal.py):
// each row's head is sorted once, then every tail entry is drawn, or weighed, on its own, in parallel over the
// entries (a batch-shared set is one row). The draws are counter-based (lsh_common.h: proposal_uniform), so the
// result depends neither on the threads nor on the device.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "lsh_common.h"
#include "op_checks.h"

namespace lsh_torch {
namespace {

void check_cpu(const at::Tensor& t, const char* name, const char* op) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got one on ", t.device());
}

// The first entry (row * width + column) that fails a check, across threads.
class FirstBad {
 public:
  void note(int64_t entry) {
    int64_t seen = first_.load(std::memory_order_relaxed);
    while (entry < seen && !first_.compare_exchange_weak(seen, entry, std::memory_order_relaxed)) {
    }
  }
  bool any() const { return first_.load() != kNone; }
  int64_t entry() const { return first_.load(); }

 private:
  static constexpr int64_t kNone = std::numeric_limits<int64_t>::max();
  std::atomic<int64_t> first_{kNone};
};

// Checks the heads (each in [0, width]) and cdf: cumulative weights, finite, from >= 0, non-decreasing, to a
// positive total. Returns the total.
double check_heads_and_cdf(const char* op, const int64_t* head, int64_t rows, int64_t width, const double* cdf,
                           int64_t n) {
  for (int64_t r = 0; r < rows; ++r)
    TORCH_CHECK(head[r] >= 0 && head[r] <= width, op, ": head must be in [0, A = ", width, "], got ", head[r],
                " at row ", r);
  FirstBad bad;
  at::parallel_for(0, n, 65536, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j)
      if (!(std::isfinite(cdf[j]) && cdf[j] >= (j > 0 ? cdf[j - 1] : 0.0))) {
        bad.note(j);
        break;
      }
  });
  if (bad.any()) {
    const int64_t j = bad.entry();
    TORCH_CHECK(false, op, ": cdf must hold cumulative weights (finite, cdf[0] >= 0, non-decreasing), got cdf[", j,
                "] = ", cdf[j], j > 0 ? " after " : "", j > 0 ? std::to_string(cdf[j - 1]) : std::string());
  }
  const double total = cdf[n - 1];
  TORCH_CHECK(total > 0, op, ": cdf must end in a positive finite total, got ", total);
  return total;
}

// Row r's head entries, sorted, at sorted[r * width ...], each checked to be a neuron id in [0, n). Where `scale` is
// given, scale[r] = proposal_row_log_scale of the row (its tail's length, the proposal's share outside its distinct
// head entries).
std::vector<int64_t> sorted_heads(const char* op, const int64_t* active, const int64_t* head, int64_t rows,
                                  int64_t width, const double* cdf, int64_t n, int64_t tries, double* scale) {
  std::vector<int64_t> sorted(rows * width);
  FirstBad bad;
  at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / std::max<int64_t>(1, width)), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t* a = active + r * width;
      int64_t* s = sorted.data() + r * width;
      const int64_t h = head[r];
      bool ok = true;
      for (int64_t c = 0; c < h; ++c) {
        if (a[c] < 0 || a[c] >= n) {
          bad.note(r * width + c);
          ok = false;
          break;
        }
        s[c] = a[c];
      }
      if (!ok) continue;
      std::sort(s, s + h);
      if (scale == nullptr) continue;
      double mass = 0;
      for (int64_t c = 0; c < h; ++c)
        if (c == 0 || s[c] != s[c - 1]) mass += cdf[s[c]] - (s[c] > 0 ? cdf[s[c] - 1] : 0.0);
      const double total = cdf[n - 1];
      scale[r] = proposal_row_log_scale(std::max(0.0, (total - mass) / total), total, width - h, tries);
    }
  });
  if (bad.any()) {
    const int64_t e = bad.entry();
    TORCH_CHECK(false, op, ": active's head entries must be neuron ids in [0, N = ", n, "), got ", active[e],
                " at [", e / width, ", ", e % width, "]");
  }
  return sorted;
}

constexpr int64_t kEntriesPerTask = 4096;

at::Tensor proposal_draw_cpu(const at::Tensor& active_in, const at::Tensor& head_in, const at::Tensor& cdf_in,
                             const at::Tensor& guide_in, int64_t tries, int64_t seed) {
  const char* op = "proposal_draw";
  check_proposal_args(op, active_in, head_in, cdf_in, &guide_in, tries);
  for (const auto& [t, name] : {std::pair{&active_in, "active"}, {&head_in, "head"}, {&cdf_in, "cdf"}, {&guide_in, "guide"}})
    check_cpu(*t, name, op);
  const auto active = active_in.contiguous(), head = head_in.contiguous(), cdf = cdf_in.contiguous(),
             guide = guide_in.contiguous();
  const int64_t rows = active.size(0), width = active.size(1), n = cdf.size(0), g = guide.size(0);
  const int64_t* a = active.data_ptr<int64_t>();
  const int64_t* h = head.data_ptr<int64_t>();
  const double* c = cdf.data_ptr<double>();
  const int32_t* gd = guide.data_ptr<int32_t>();
  const double total = check_heads_and_cdf(op, h, rows, width, c, n);
  const auto sorted = sorted_heads(op, a, h, rows, width, c, n, tries, nullptr);
  auto out = active.clone();
  int64_t* o = out.data_ptr<int64_t>();
  const double scale = static_cast<double>(g - 1) / total;
  at::parallel_for(0, rows * width, kEntriesPerTask, [&](int64_t begin, int64_t end) {
    uint64_t key = 0;
    for (int64_t e = begin, r = -1; e < end; ++e) {
      const int64_t column = e % width;
      if (column == 0 || r < 0) {
        r = e / width;
        key = stream_key(seed, kProposalDraw, r);
      }
      if (column < h[r]) continue;
      int64_t j = 0;
      for (int64_t attempt = 0; attempt < tries; ++attempt) {
        j = proposal_inverse(c, n, gd, g, scale, proposal_uniform(key, column, attempt) * total);
        if (!in_sorted(sorted.data() + r * width, h[r], j)) break;
      }
      o[e] = j;
    }
  });
  return out;
}

at::Tensor proposal_log_weights_cpu(const at::Tensor& active_in, const at::Tensor& head_in, const at::Tensor& cdf_in,
                                    int64_t tries) {
  const char* op = "proposal_log_weights";
  check_proposal_args(op, active_in, head_in, cdf_in, nullptr, tries);
  for (const auto& [t, name] : {std::pair{&active_in, "active"}, {&head_in, "head"}, {&cdf_in, "cdf"}})
    check_cpu(*t, name, op);
  const auto active = active_in.contiguous(), head = head_in.contiguous(), cdf = cdf_in.contiguous();
  const int64_t rows = active.size(0), width = active.size(1), n = cdf.size(0);
  const int64_t* a = active.data_ptr<int64_t>();
  const int64_t* h = head.data_ptr<int64_t>();
  const double* c = cdf.data_ptr<double>();
  check_heads_and_cdf(op, h, rows, width, c, n);
  std::vector<double> scale(rows);
  const auto sorted = sorted_heads(op, a, h, rows, width, c, n, tries, scale.data());
  auto out = at::empty({rows, width}, active.options().dtype(at::kFloat));
  float* o = out.data_ptr<float>();
  FirstBad bad;
  at::parallel_for(0, rows * width, kEntriesPerTask, [&](int64_t begin, int64_t end) {
    for (int64_t e = begin; e < end; ++e) {
      const int64_t r = e / width, column = e % width, j = a[e];
      if (column < h[r]) {
        o[e] = 0;
      } else if (j < 0 || j >= n) {
        bad.note(e);
        o[e] = 0;
      } else if (in_sorted(sorted.data() + r * width, h[r], j)) {
        o[e] = -std::numeric_limits<float>::infinity();  // left on the head after every try: counts for nothing
      } else {
        const double mass = c[j] - (j > 0 ? c[j - 1] : 0.0);
        if (!(mass > 0)) bad.note(e);  // a neuron the proposal never draws: not a draw of it
        o[e] = static_cast<float>(-(scale[r] + std::log(mass)));
      }
    }
  });
  if (bad.any()) {
    const int64_t e = bad.entry();
    TORCH_CHECK(a[e] < 0 || a[e] >= n, op, ": active's tail entry ", a[e], " at [", e / width, ", ", e % width,
                "] has no proposal mass (cdf[j] - cdf[j-1] = ", c[a[e]] - (a[e] > 0 ? c[a[e] - 1] : 0.0),
                "): the proposal never draws it");
    TORCH_CHECK(false, op, ": active must hold neuron ids in [0, N = ", n, "), got ", a[e], " at [", e / width, ", ",
                e % width, "]");
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(lsh_torch, CPU, m) {
  m.impl("proposal_draw", &proposal_draw_cpu);
  m.impl("proposal_log_weights", &proposal_log_weights_cpu);
}

}  // namespace lsh_torch
