"""Slow, obviously-correct pure-PyTorch/Python versions of every lsh_torch op.

The kernels must agree with these exactly (integer outputs) or to rounding (floating outputs).
"""
import bisect
import itertools
import math

import torch

MASK64 = (1 << 64) - 1
TIE_BREAK, FILL_DRAW, FILL_WALK, PROPOSAL_DRAW = 1, 2, 3, 5
MAX_TRIES = 64  # csrc/lsh_common.h: kMaxTries


def mix64(z):
    z = (z + 0x9E3779B97F4A7C15) & MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return z ^ (z >> 31)


def stream_key(seed, stream, row):
    return mix64((mix64(mix64(seed & MASK64) ^ stream) + row) & MASK64)


def seeded_hash(seed, stream, row, counter):
    return mix64(stream_key(seed, stream, row) ^ mix64(counter & MASK64))


def mips_transform(rows, query, max_norm=None):
    rows64 = rows.double()
    norms = rows64.norm(dim=1, keepdim=True)
    if max_norm is not None:
        assert not query and (norms <= max_norm * (1 + 1e-5)).all()  # the ops' relative tolerance
    if query:
        scaled = torch.where(norms > 0, rows64 / norms.clamp_min(1e-300), torch.zeros_like(rows64))
        extra = torch.zeros_like(norms)
    else:
        m = norms.max() if rows.shape[0] else torch.tensor(0.0, dtype=torch.float64)
        m = m if max_norm is None else max_norm.double().reshape(())
        scaled = rows64 / m if m > 0 else torch.zeros_like(rows64)
        extra = (1 - scaled.pow(2).sum(1, keepdim=True)).clamp_min(0).sqrt()
    return torch.cat([scaled, extra], 1).to(rows.dtype)


def row_fingerprints(rows, vector):
    return (rows.double() @ vector.double()).float()


def row_topk(scores, k):
    """Each row's columns sorted by score, highest first (every NaN above everything, -0.0 equal to 0.0), ties by
    the lower column; the first k."""
    def rank(row):
        values = row.double().tolist()
        return sorted(range(len(values)), key=lambda j: (not math.isnan(values[j]),
                                                        0.0 if math.isnan(values[j]) else -values[j], j))[:k]
    return torch.tensor([rank(row) for row in scores], dtype=torch.int64).reshape(scores.shape[0], k)


def hash_codes(projections, num_tables, bits, margins=True):
    p = projections.float().reshape(-1, num_tables, bits)
    weights = 2 ** torch.arange(bits)
    codes = ((p > 0).long() * weights).sum(-1).int()
    if not margins:
        return codes, torch.empty(projections.shape[0], 0)
    distances = torch.where(p.isnan(), torch.full_like(p, math.inf), p.abs())
    return codes, distances.reshape(projections.shape[0], num_tables * bits)


DENSIFY, DENSIFY_ATTEMPTS = 4, 32


def dwta_codes(rows, bins, num_tables):
    """Densified WTA, one row and bin at a time (csrc/lsh_torch.cpp's contract)."""
    n, num_bins, bin_size = rows.shape[0], bins.shape[0], bins.shape[1]
    b = bin_size.bit_length() - 1
    hashes_per_table = num_bins // num_tables
    acc = torch.float64 if rows.dtype == torch.float64 else torch.float32  # the kernels' opmath type
    codes = torch.zeros(n, num_tables, dtype=torch.int32)
    margins = torch.zeros(n, num_bins * b, dtype=torch.float32)
    for i in range(n):
        row = rows[i].to(acc)
        hashes = []
        for g in range(num_bins):
            values = [row[j] for j in bins[g].tolist()]
            finite_order = [j for j in range(bin_size) if not math.isnan(float(values[j]))]
            best = max(finite_order, key=lambda j: (float(values[j]), -j)) if finite_order else 0
            for k in range(b):
                gap = float((values[best] - values[best ^ (1 << k)]).float())  # rounded once, in acc
                margins[i, g * b + k] = math.inf if math.isnan(gap) else gap
            hashes.append(best if any(float(v) != 0 for v in values) else -1)
        sources = [g if hashes[g] >= 0 else _densify_source(hashes, g) for g in range(num_bins)]
        for g, source in enumerate(sources):  # an empty bin takes its source's hash and margins
            if source is not None and source != g:
                margins[i, g * b:(g + 1) * b] = margins[i, source * b:(source + 1) * b]
        for l in range(num_tables):
            code = 0
            for h in range(hashes_per_table):
                g = l * hashes_per_table + h
                code |= (0 if sources[g] is None else hashes[sources[g]]) << (h * b)  # an all-empty row: 0
            codes[i, l] = code
    return codes, margins


def _densify_source(hashes, g):
    """The bin whose hash empty bin g takes: the first non-empty one of a fixed pseudo-random
    sequence of bins, then of the bins after g in circular order; None if all are empty."""
    num_bins = len(hashes)
    tries = [(stream_key(0, DENSIFY, g) ^ mix64(t)) % num_bins for t in range(1, DENSIFY_ATTEMPTS + 1)]
    tries += [(g + s) % num_bins for s in range(1, num_bins)]
    return next((j for j in tries if hashes[j] >= 0), None)


def build_tables(codes, bits):
    n, num_tables = codes.shape
    offsets = torch.zeros(num_tables, 2 ** bits + 1, dtype=torch.int32)
    items = torch.empty(num_tables, n, dtype=torch.int32)
    for l in range(num_tables):
        col = codes[:, l].long()
        offsets[l, 1:] = torch.bincount(col, minlength=2 ** bits).cumsum(0).int()
        items[l] = torch.sort(col, stable=True).indices.int()
    return offsets, items


def update_tables(offsets, items, rows, old_codes, new_codes):
    """Bucket by bucket: the old ids minus the rows leaving, plus the rows joining, ascending (a row whose
    code in a table is unchanged stays, as the CPU kernel leaves it)."""
    num_tables, width = offsets.shape
    new_offsets, new_items = torch.zeros_like(offsets), torch.empty_like(items)
    for l in range(num_tables):
        out = []
        for k in range(width - 1):
            bucket = items[l, offsets[l, k]:offsets[l, k + 1]].tolist()
            moves = old_codes[:, l] != new_codes[:, l]
            leaving = {int(r) for r, c, m in zip(rows, old_codes[:, l], moves) if c == k and m}
            assert leaving <= set(bucket), "a row is not in its old bucket"
            joining = [int(r) for r, c, m in zip(rows, new_codes[:, l], moves) if c == k and m]
            out += sorted([i for i in bucket if i not in leaving] + joining)
            new_offsets[l, k + 1] = len(out)
        new_items[l] = torch.tensor(out, dtype=torch.int32)
    return new_offsets, new_items


def probe_flips(margin, bits, probes):
    """Enumerate every subset of bits, order by (sum of margins, mask over margin-sorted positions)."""
    order = torch.sort(margin.float(), stable=True).indices.tolist()
    sorted_m = [float(margin[i]) for i in order]
    keyed = []
    for mask in range(2 ** bits):
        score = 0.0
        for i in range(bits):
            if mask >> i & 1:
                score += sorted_m[i]
        keyed.append((score, mask))
    keyed.sort()
    flips = []
    for _, mask in keyed[:probes]:
        flips.append(sum(1 << order[i] for i in range(bits) if mask >> i & 1))
    return flips


def _active_set(label_rows, probe_rows, codes, margins, offsets, items, probes, budget, seed, set_id, tail):
    """Labels of ``label_rows`` first, then candidates of ``probe_rows`` by hits (leaving ``tail``
    entries), then the fill. Returns the set and its head (labels + candidates)."""
    num_tables, n = items.shape
    bits = (offsets.shape[1] - 1).bit_length() - 1
    chosen = []
    for labs in label_rows:
        for lab in labs:
            if lab >= 0 and lab not in chosen:
                chosen.append(lab)
    assert len(chosen) <= budget
    hits = {}
    for b in probe_rows:
        for l in range(num_tables):
            for flip in probe_flips(margins[b, l * bits:(l + 1) * bits], bits, probes):
                bucket = int(codes[b, l]) ^ flip
                for i in range(int(offsets[l, bucket]), int(offsets[l, bucket + 1])):
                    nid = int(items[l, i])
                    if nid not in chosen:
                        hits[nid] = hits.get(nid, 0) + 1
    ranked = sorted(hits, key=lambda nid: (-hits[nid], seeded_hash(seed, TIE_BREAK, set_id, nid)))
    chosen += ranked[: max(0, budget - len(chosen) - tail)]
    head = len(chosen)
    draws = 0
    while len(chosen) < budget and draws < 4 * budget + 64:
        nid = seeded_hash(seed, FILL_DRAW, set_id, draws) % n
        draws += 1
        if nid not in chosen:
            chosen.append(nid)
    if len(chosen) < budget:
        pos = seeded_hash(seed, FILL_WALK, set_id, 0) % n
        stride = 1 + seeded_hash(seed, FILL_WALK, set_id, 1) % (n - 1) if n > 1 else 1
        while math.gcd(stride, n) != 1:
            stride += 1
        for _ in range(n):
            if len(chosen) == budget:
                break
            if pos not in chosen:
                chosen.append(pos)
            pos = (pos + stride) % n
    return torch.tensor(chosen, dtype=torch.int64), head


def query(codes, margins, offsets, items, probes, budget, labels=None, seed=0, tail=0, row_keys=None):
    rows, heads = [], []
    for b in range(codes.shape[0]):
        label_rows = [labels[b].tolist()] if labels is not None else []
        set_id = int(row_keys[b]) if row_keys is not None else b  # what names the row's random streams
        row, head = _active_set(label_rows, [b], codes, margins, offsets, items, probes, budget, seed, set_id, tail)
        rows.append(row)
        heads.append(head)
    active = torch.stack(rows) if rows else torch.empty(0, budget, dtype=torch.int64)
    return active, torch.tensor(heads, dtype=torch.int64)


def query_shared(codes, margins, offsets, items, probes, budget, labels=None, seed=0, tail=0):
    label_rows = labels.tolist() if labels is not None else []
    indices, head = _active_set(label_rows, range(codes.shape[0]), codes, margins, offsets, items, probes, budget,
                                seed, -1, tail)
    return indices, torch.tensor(head, dtype=torch.int64)


def tail_log_weights(head, budget, n):
    """Per entry: 0 in the head, log((n - head) / (budget - head)) in the tail (entry by entry)."""
    out = torch.zeros(*head.shape, budget)
    for idx in itertools.product(*map(range, head.shape)):
        h = int(head[idx])
        for a in range(h, budget):
            out[idx + (a,)] = math.log((n - h) / (budget - h))
    return out


def proposal_draw(active, head, cdf, guide, tries, seed):
    """Tail entry (r, c), try i: u = the top 53 bits of seeded_hash(seed, PROPOSAL_DRAW, r, c * MAX_TRIES + i) / 2^53,
    the first j with cdf[j] > u * total (the last where none is); drawn again while j is in the row's head. (The
    guide is a hint: unused.)"""
    c, out = cdf.tolist(), active.clone()
    for r in range(active.shape[0]):
        h = int(head[r])
        in_head = set(active[r, :h].tolist())
        for col in range(h, active.shape[1]):
            for attempt in range(tries):
                u = (seeded_hash(seed, PROPOSAL_DRAW, r, col * MAX_TRIES + attempt) >> 11) / 2.0 ** 53
                j = min(bisect.bisect_right(c, u * c[-1]), len(c) - 1)
                if j not in in_head:
                    break
            out[r, col] = j
    return out


def proposal_log_weights(active, head, cdf, tries):
    """0 in the head; -inf for a tail entry on the head; else -log(t q_j (1 + Q + ... + Q^(tries-1))), Q the mass of
    the row's distinct head neurons, each neuron's mass cdf[j] - cdf[j-1] over the total."""
    c = cdf.tolist()
    q = lambda j: (c[j] - (c[j - 1] if j > 0 else 0.0)) / c[-1]
    out = torch.zeros(active.shape)
    for r in range(active.shape[0]):
        h, width = int(head[r]), active.shape[1]
        in_head = set(active[r, :h].tolist())
        Q = sum(q(j) for j in in_head)
        reach = sum(Q ** i for i in range(tries))
        for col in range(h, width):
            j = int(active[r, col])
            out[r, col] = -math.inf if j in in_head else -math.log((width - h) * reach * q(j))
    return out


def shared_linear(x, weight, bias, indices):
    return sparse_linear(x, weight, bias, indices.expand(x.shape[0], -1))


def sparse_linear(x, weight, bias, active):
    out = torch.einsum("bd,bad->ba", x.double(), weight.double()[active])
    if bias is not None:
        out = out + bias.double()[active]
    return out.to(x.dtype)


def sparse_linear_grad_input(grad_out, weight, active):
    return torch.einsum("ba,bad->bd", grad_out.double(), weight.double()[active]).to(grad_out.dtype)


def sparse_linear_grad_weight(grad_out, x, active, num_rows):
    gw = torch.zeros(num_rows, x.shape[1], dtype=torch.float64)
    gb = torch.zeros(num_rows, dtype=torch.float64)
    for b in range(x.shape[0]):
        for a in range(active.shape[1]):
            gw[active[b, a]] += grad_out[b, a].double() * x[b].double()
            gb[active[b, a]] += grad_out[b, a].double()
    return gw.to(x.dtype), gb.to(x.dtype)


def sparse_linear_grad_weight_rows(grad_out, x, active):
    rows = torch.unique(active)
    gw, gb = sparse_linear_grad_weight(grad_out, x, active, int(rows.max()) + 1 if rows.numel() else 0)
    return rows, gw[rows], gb[rows]


def lazy_adam_(param, exp_avg, exp_avg_sq, rows, grad_rows, step_size, beta1, beta2, eps, decay=0.0):
    """SparseAdam's operations in its order (the op's contract; Adam's for an overflowing g^2), in the compute type: float32
    below float64, after AdamW's decay of the rows (``param * (1 - decay)``). In float32 they
    cancel when a beta is near 0, so the contract, not the exact Adam formula, is what the kernel
    must reproduce."""
    acc = torch.float64 if param.dtype == torch.float64 else torch.float32
    scalar = lambda value: torch.tensor(value, dtype=acc)  # rounded once, as the kernels do
    m, v, g = exp_avg[rows].to(acc), exp_avg_sq[rows].to(acc), grad_rows.to(acc)
    m = m + (g - m) * scalar(1 - beta1)
    gg, c2 = g * g, scalar(1 - beta2)  # where g^2 or v overflowed, Adam's order: the product scaled first
    v = torch.where(gg.isfinite() & v.isfinite(), v + (gg - v) * c2, v * (1 - c2) + (c2 * g) * g)
    exp_avg[rows] = m.to(exp_avg.dtype)
    exp_avg_sq[rows] = v.to(exp_avg_sq.dtype)
    param[rows] = (param[rows].to(acc) * scalar(1 - decay) - m / (v.sqrt() + scalar(eps)) * scalar(step_size)).to(
        param.dtype)
