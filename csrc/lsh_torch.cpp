// Operator schemas of the lsh_torch namespace, written once. Kernels live in cpu/ and cuda/.
#include <Python.h>
#include <torch/csrc/autograd/VariableTypeUtils.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

TORCH_LIBRARY(lsh_torch, m) {
  // Asymmetric MIPS transform (Neyshabur & Srebro's "simple LSH"). Data rows (query=false) are
  // scaled by the largest row norm M and get sqrt(1 - |r/M|^2) appended; queries (query=true)
  // are normalised to unit length and get 0 appended. [n, d] -> [n, d+1]. A given max_norm (a
  // one-element tensor, so that a traced table build can compute it) replaces M for data rows
  // (every row's norm must be at most max_norm): rows hashed at different times with one M share
  // one transform, so a table can re-hash only the rows that changed.
  m.def("mips_transform(Tensor rows, bool query, Tensor? max_norm=None) -> Tensor");
  // Signed random projection fingerprints: projections [n, L*K] -> codes [n, L] int32 (bit k of
  // table l is projections[:, l*K + k] > 0) and margins [n, L*K] float32 = |projection|
  // (NaN -> inf), which order the bit flips of multi-probe. margins=false (weight rows, which are
  // never probed from) returns an empty [n, 0] margins tensor and skips writing n*L*K floats.
  m.def("hash_codes(Tensor projections, int num_tables, int bits, bool margins=True) -> (Tensor codes, Tensor margins)");
  // Densified winner-take-all codes (Yagnik et al. 2011; Chen & Shrivastava, "Densified Winner Take
  // All (WTA) Hashing for Sparse Datasets", UAI 2018), the hash family SLIDE uses for Amazon-670K.
  // bins [L*H, bin_size] int64 (dimension indices, bin_size a power of two) -> codes [n, L] int32
  // and margins [n, L*K] float32, K = H * log2(bin_size). Hash g of a row is the position of the
  // largest of rows[:, bins[g]] (lowest position among ties; NaN never wins, an all-NaN bin gives
  // 0); table l's code is hashes l*H .. l*H+H-1 concatenated, hash h in bits h*b .. h*b+b-1. A bin
  // whose entries are all 0 is empty and takes the hash (and margins) of another bin of the row
  // (densification, lsh_common.h: dwta_source); a row with every bin empty gets code 0 and margins
  // 0. Margin of bit k of hash g with argmax a: rows[bins[g][a]] - rows[bins[g][a ^ 2^k]] >= 0,
  // computed in the rows' opmath type (NaN -> inf): the cost of flipping that bit, for multi-probe.
  // Integer outputs: no gradient.
  m.def("dwta_codes(Tensor rows, Tensor bins, int num_tables) -> (Tensor codes, Tensor margins)");
  // One float32 per row, rows [n, d] . vector [d] (float32), accumulated in the rows' opmath type:
  // a cheap fingerprint that tells which rows changed since the last table build.
  m.def("row_fingerprints(Tensor rows, Tensor vector) -> Tensor");
  // Counting sort of codes [N, L] into one CSR table per hash table:
  // offsets [L, 2^K + 1] int32 and items [L, N] int32 (ascending neuron id inside a bucket).
  m.def("build_tables(Tensor codes, int bits) -> (Tensor offsets, Tensor items)");
  // The tables with some rows re-hashed, without re-sorting the others: rows [R] int64 (strictly
  // increasing) leave the buckets of old_codes [R, L] and join those of new_codes [R, L], keeping
  // ascending ids per bucket. Equal to build_tables of the codes with those rows replaced when
  // (offsets, items) are build_tables of codes whose rows hold old_codes; a row missing from the
  // old bucket it leaves is an error (the CPU kernel leaves a row whose code in a table is unchanged
  // in place there, unchecked; the CUDA kernel checks every row).
  m.def(
      "update_tables(Tensor offsets, Tensor items, Tensor rows, Tensor old_codes, Tensor new_codes) "
      "-> (Tensor offsets, Tensor items)");
  // Multi-probe lookup -> active [B, budget] int64, no duplicates per row: forced labels
  // (-1 = padding) first, then LSH candidates ranked by how many probed buckets held them
  // (ties broken by a seeded hash), at most budget - labels - tail of them, then seeded uniform
  // draws from the neurons not yet chosen up to the budget (the tail: at least
  // min(tail, budget - labels) entries, all of them where there are fewer candidates).
  // head [B] int64: entries before the tail (labels + candidates). The tail is a uniform sample
  // without replacement of the other N - head neurons, which is what the sampled softmax's
  // correction needs (docs/estimator.md).
  // row_keys [B] int64 (optional) key row b's tie-break and draws in place of its index b: rows with
  // equal keys and inputs get equal sets wherever they sit in the batch (eval lookups key rows by
  // their codes, so an input's set does not depend on its batch).
  m.def(
      "query(Tensor codes, Tensor margins, Tensor offsets, Tensor items, int probes, int budget, "
      "Tensor? labels, int seed, int tail=0, Tensor? row_keys=None) -> (Tensor active, Tensor head)");
  // One active set for the whole batch: the union of the rows' labels first, then candidates
  // ranked by their bucket hits summed over the rows, then the uniform tail -> indices [budget],
  // head [] int64. (The CUDA kernel refuses B x L x probes >= 2^31, which the CPU's takes.)
  m.def(
      "query_shared(Tensor codes, Tensor margins, Tensor offsets, Tensor items, int probes, int budget, "
      "Tensor? labels, int seed, int tail=0) -> (Tensor indices, Tensor head)");
  // out[b, a] = weight[active[b, a]] . x[b] + bias[active[b, a]]
  m.def("sparse_linear(Tensor x, Tensor weight, Tensor? bias, Tensor active) -> Tensor");
  // grad_x[b] = sum_a grad_out[b, a] * weight[active[b, a]]
  m.def("sparse_linear_grad_input(Tensor grad_out, Tensor weight, Tensor active) -> Tensor");
  // Row-sparse weight/bias gradient: the touched rows (sorted, unique) and their gradients.
  m.def(
      "sparse_linear_grad_weight_rows(Tensor grad_out, Tensor x, Tensor active) "
      "-> (Tensor rows, Tensor grad_weight_rows, Tensor grad_bias_rows)");
  // The same gradient scattered into dense [num_rows, d] and [num_rows] tensors.
  m.def(
      "sparse_linear_grad_weight(Tensor grad_out, Tensor x, Tensor active, SymInt num_rows) "
      "-> (Tensor grad_weight, Tensor grad_bias)");
  // Batch-shared active set as one gathered GEMM: out[b, a] = weight[indices[a]] . x[b] + bias[indices[a]]
  m.def("shared_linear(Tensor x, Tensor weight, Tensor? bias, Tensor indices) -> Tensor");
  // Each row's k highest scores: indices [B, k] int64 into scores [B, U] (floating), ordered as a stable
  // descending torch.sort orders the row (every NaN first, ties by lower column, -0.0 equal to 0.0).
  // A per-row top set's choice among the exact scores of a pool (LSHLinear's per-row training
  // lookup): torch.topk took a quarter of the LM example's step there. Integer output: no gradient.
  m.def("row_topk(Tensor scores, int k) -> Tensor");
  // A tail drawn from a proposal (LSHLinear(tail_proposal=...), lsh_torch/proposal.py). active [R, A] int64 whose
  // first head[r] entries of row r (head [R] int64) are its head -> active with every later entry (the tail)
  // replaced by a draw from the proposal with cumulative weights cdf [N] float64 (j drawn with probability
  // (cdf[j] - cdf[j-1]) / cdf[N-1]), drawn again while it lands in its row's head, at most `tries` times (the last
  // draw stays). guide [G] int32: the neuron drawn at each of G evenly spaced points of [0, cdf[N-1]], a hint
  // that each draw checks against cdf. Try i of entry (r, a) is seeded_hash(seed, kProposalDraw, r,
  // a * kMaxTries + i) (lsh_common.h): the same draws on every device. Integer output: no gradient.
  m.def("proposal_draw(Tensor active, Tensor head, Tensor cdf, Tensor guide, int tries, int seed) -> Tensor");
  // Log-weights of such a set, [R, A] float32: 0 in the head; for a tail entry of neuron j outside its row's head
  // -log(t q_j (1 - Q^tries) / (1 - Q)), one over its expected count (t = A - head[r], q_j = (cdf[j] - cdf[j-1]) /
  // cdf[N-1], Q the proposal's mass on the row's distinct head entries); -inf for one on the head. No gradient.
  m.def("proposal_log_weights(Tensor active, Tensor head, Tensor cdf, int tries) -> Tensor");
  // Lazy Adam on the given (unique) rows only, in place, with SparseAdam's arithmetic in its order:
  // m += (g - m)(1-b1);  v += (g^2 - v)(1-b2);  param = param (1 - decay) - m / (sqrt(v) + eps) * step_size
  // (decay: AdamW's decoupled weight decay, lr * weight_decay; 0 is SparseAdam's step exactly).
  m.def(
      "lazy_adam_(Tensor(a!) param, Tensor(b!) exp_avg, Tensor(c!) exp_avg_sq, Tensor rows, Tensor grad_rows, "
      "float step_size, float beta1, float beta2, float eps, float decay=0.) -> ()");
}

namespace {

// lazy_adam_ writes its (a!) (b!) (c!) arguments: refuse a tensor that requires grad in grad mode
// (the op has no derivative), and bump their version counters (autograd then refuses a backward
// through values the step changed, and caches keyed on a parameter's version see the step). torch's
// in-place fallbacks bump aliased outputs only, and this op returns none.
void lazy_adam_inplace(const c10::OperatorHandle& op, c10::DispatchKeySet keys, torch::jit::Stack* stack) {
  const auto param = (*stack)[0].toTensor(), exp_avg = (*stack)[1].toTensor(), exp_avg_sq = (*stack)[2].toTensor();
  for (const auto& t : {param, exp_avg, exp_avg_sq})  // no derivative: a leaf, a view of one, or a graph's tensor
    TORCH_CHECK(!(at::GradMode::is_enabled() && t.requires_grad()),
                "lazy_adam_ updates in place a tensor that requires grad, and has no derivative: "
                "run the optimizer step under torch.no_grad()");
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    op.redispatchBoxed(keys & c10::after_ADInplaceOrView_keyset, stack);
  }
  for (const auto& t : {param, exp_avg, exp_avg_sq})
    if (!t.is_inference()) torch::autograd::increment_version(t);  // an inference tensor has no version
}

}  // namespace

TORCH_LIBRARY_IMPL(lsh_torch, ADInplaceOrView, m) {
  m.impl("lazy_adam_", torch::CppFunction::makeFromBoxedFunction<&lazy_adam_inplace>());
}

// Ops with floating outputs and no derivative: a backward through them raises, naming the op (without
// a kernel here, their outputs required grad and the backward gave the input no gradient, silently).
// Callers hash detached tensors.
TORCH_LIBRARY_IMPL(lsh_torch, Autograd, m) {
  for (const char* op : {"mips_transform", "hash_codes", "dwta_codes", "row_fingerprints", "proposal_log_weights"})
    m.impl(op, torch::autograd::autogradNotImplementedFallback());
}

// Importing lsh_torch._C loads this library, which runs the registrations above.
static PyModuleDef lsh_torch_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&lsh_torch_module); }
