"""Extreme multi-label classification (XMC) data: the repository's text format, and a synthetic generator.

The Extreme Classification Repository (Amazon-670K, Delicious-200K, ...) ships each split as a
text file::

    num_points num_features num_labels
    l1,l2,... f:v f:v ...
    ...

one line per point after the header: comma-separated label ids, then space-separated
``feature_id:value`` pairs (ids are 0-based). A point may have no labels (the line then starts
with a space, or directly with a ``f:v`` pair) and no features. :func:`read_xmc` reads such a file
unchanged, :func:`write_xmc` writes one, and :func:`generate` makes synthetic data with the
statistics that make extreme classification hard (see its docstring), so the demo runs offline.

    python examples/xmc_data.py --out-dir data/        # write synthetic train.txt / test.txt
"""
from __future__ import annotations

import argparse
import math
import os
from dataclasses import dataclass
from typing import Iterator, Optional

import numpy as np
import torch
from torch import Tensor

import cli  # examples/cli.py, beside this file

__all__ = ["XMCData", "read_xmc", "write_xmc", "generate", "generate_split", "text_split"]


@dataclass
class XMCData:
    """Points in CSR form: point ``i`` has features ``feature_ids[feature_offsets[i]:feature_offsets[i+1]]``
    (with ``feature_values`` alongside) and labels ``label_ids[label_offsets[i]:label_offsets[i+1]]``."""

    num_features: int
    num_labels: int
    feature_offsets: np.ndarray  # int64 [n + 1]
    feature_ids: np.ndarray  # int64 [nnz]
    feature_values: np.ndarray  # float32 [nnz]
    label_offsets: np.ndarray  # int64 [n + 1]
    label_ids: np.ndarray  # int64 [total labels]

    def __len__(self) -> int:
        return len(self.feature_offsets) - 1

    def labels_of(self, i: int) -> np.ndarray:
        return self.label_ids[self.label_offsets[i]:self.label_offsets[i + 1]]

    def features_of(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        lo, hi = self.feature_offsets[i], self.feature_offsets[i + 1]
        return self.feature_ids[lo:hi], self.feature_values[lo:hi]

    def label_counts(self) -> np.ndarray:
        """How many points carry each label (a label repeated on a point counted once): int64 ``[num_labels]``."""
        points = np.repeat(np.arange(len(self), dtype=np.int64), np.diff(self.label_offsets))
        distinct = np.unique(points * self.num_labels + self.label_ids) % max(1, self.num_labels)
        return np.bincount(distinct, minlength=self.num_labels)

    def subset(self, index) -> "XMCData":
        """The points ``index`` (an int array), in that order."""
        index = np.asarray(index, dtype=np.int64)
        f_off, f_sel = _gather_csr(self.feature_offsets, index)
        l_off, l_sel = _gather_csr(self.label_offsets, index)
        return XMCData(self.num_features, self.num_labels, f_off, self.feature_ids[f_sel],
                       self.feature_values[f_sel], l_off, self.label_ids[l_sel])

    def split(self, test_fraction: float, seed: int = 0) -> tuple["XMCData", "XMCData"]:
        """A seeded random (train, test) split."""
        perm = np.random.default_rng(seed).permutation(len(self))
        n_test = int(round(test_fraction * len(self)))
        return self.subset(np.sort(perm[n_test:])), self.subset(np.sort(perm[:n_test]))

    def batch(self, index) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Tensors for the points ``index``: ``ids, offsets, values`` for
        ``nn.EmbeddingBag(ids, offsets, per_sample_weights=values)``, and ``labels`` int64
        ``[b, M]`` padded with -1 (``M`` = the most labels of a point in the batch, at least 1)."""
        index = np.asarray(index, dtype=np.int64)
        f_off, f_sel = _gather_csr(self.feature_offsets, index)
        l_off, l_sel = _gather_csr(self.label_offsets, index)
        counts = np.diff(l_off)
        labels = np.full((len(index), max(1, int(counts.max(initial=0)))), -1, dtype=np.int64)
        rows = np.repeat(np.arange(len(index)), counts)
        labels[rows, np.arange(len(rows)) - np.repeat(l_off[:-1], counts)] = self.label_ids[l_sel]
        return (torch.from_numpy(self.feature_ids[f_sel]), torch.from_numpy(f_off[:-1].copy()),
                torch.from_numpy(self.feature_values[f_sel]), torch.from_numpy(labels))

    def batches(self, batch_size: int, shuffle: bool = True, seed: int = 0, drop_last: bool = False,
                part: tuple[int, int] = (0, 1)) -> Iterator[tuple[Tensor, Tensor, Tensor, Tensor]]:
        """Mini-batches of :meth:`batch`, in a seeded random order if ``shuffle``. With
        ``part=(rank, world)``, rank's contiguous share of each batch (``np.array_split``): the
        world's shares, in rank order, make up the single-process batch (data parallelism)."""
        rank, world = part
        if not 0 <= rank < world:
            raise ValueError(f"part must be (rank, world) with 0 <= rank < world, got {part!r}")
        order = np.random.default_rng(seed).permutation(len(self)) if shuffle else np.arange(len(self))
        stop = len(self) - (len(self) % batch_size if drop_last else 0)
        for start in range(0, stop, batch_size):
            yield self.batch(np.array_split(order[start:start + batch_size], world)[rank])

    def summary(self) -> str:
        counts = np.diff(self.label_offsets)
        per_label = self.label_counts()
        return (f"{len(self):,} points, {self.num_features:,} features, {self.num_labels:,} labels; "
                f"{np.diff(self.feature_offsets).mean():.1f} features and {counts.mean():.2f} labels per point; "
                f"{(per_label > 0).sum():,} labels seen, the most frequent on {per_label.max(initial=0):,} points")


def _gather_csr(offsets: np.ndarray, index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """New offsets and the element positions of rows ``index`` of a CSR array."""
    starts, counts = offsets[index], offsets[index + 1] - offsets[index]
    new_off = np.zeros(len(index) + 1, dtype=np.int64)
    np.cumsum(counts, out=new_off[1:])
    sel = np.repeat(starts - new_off[:-1], counts) + np.arange(new_off[-1], dtype=np.int64)
    return new_off, sel


# ---------------------------------------------------------------------------------------------
# The repository's text format.

class XMCFormatError(ValueError):
    """A malformed XMC text file; the message names the file and the 1-based line."""


def _parse_line(text: str, where: str, num_features: int, num_labels: int):
    """One point line -> (label ids, feature ids, values); raises XMCFormatError naming ``where``."""
    tokens = text.split()
    labels: list[int] = []
    if text[:1] not in (" ", "\t", "") and tokens and ":" not in tokens[0]:
        for tok in tokens[0].split(","):
            try:
                labels.append(int(tok))
            except ValueError:
                raise XMCFormatError(f"{where}: bad label {tok!r} in {tokens[0]!r} (labels are comma-separated "
                                     f"integers)") from None
            if not 0 <= labels[-1] < num_labels:
                raise XMCFormatError(f"{where}: label {labels[-1]} out of range [0, num_labels={num_labels})")
        tokens = tokens[1:]
    ids, values = [], []
    for tok in tokens:
        fid, sep, val = tok.partition(":")
        try:
            if not sep:
                raise ValueError
            ids.append(int(fid))
            values.append(float(val))
            if not abs(values[-1]) <= FLOAT32_MAX:  # nan, inf, or inf once cast to float32
                raise ValueError
        except ValueError:
            raise XMCFormatError(f"{where}: bad feature {tok!r} (expected feature_id:value, a finite float32 "
                                 "value)") from None
        if not 0 <= ids[-1] < num_features:
            raise XMCFormatError(f"{where}: feature id {ids[-1]} out of range [0, num_features={num_features})")
    return labels, ids, values


FLOAT32_MAX = float(np.finfo(np.float32).max)
CHUNK = 16_384  # lines parsed at once: their tokens, not the whole file's, are held as Python strings
MAX_IDS = 2 ** 31 - 1  # features and labels: an LSHLinear's widest (and an embedding's) layer
CHUNK_CHARS = 8 << 20  # ... or fewer, once their text reaches this: wide points (Wiki10's 673 features) held 3 GB


def read_xmc(path: str, max_points: Optional[int] = None) -> XMCData:
    """Reads an Extreme Classification Repository text file (header line, then one point per line).

    Raises :class:`XMCFormatError` (a ValueError) naming the line of a malformed header or point, a
    label or feature id out of the header's range, a value that is not a finite float32, a point
    count that disagrees with the header, or a file that is not UTF-8 text (a gzip'd one). Blank
    lines are no points (an empty point is written ``" "``).
    ``max_points`` reads only the first points (for a quick run on a large file).
    """
    try:
        with open(path, "r", encoding="utf-8-sig") as f:  # a BOM (Windows editors) is no header digit
            header = f.readline()
            parts = header.split()
            try:
                if len(parts) != 3:
                    raise ValueError
                num_points, num_features, num_labels = (int(p) for p in parts)
                if min(num_points, num_features, num_labels) < 0:
                    raise ValueError
            except ValueError:
                raise XMCFormatError(f"{path}:1: header must be 'num_points num_features num_labels' (three "
                                     f"non-negative integers), got {header.strip()!r}") from None
            if max(num_features, num_labels) > MAX_IDS:  # a typo: arrays of that size were allocated (745 GiB)
                raise XMCFormatError(f"{path}:1: the header's {num_features:,} features and {num_labels:,} labels must "
                                     f"each be at most {MAX_IDS:,} (the widest layer), got {header.strip()!r}")
            want = num_points if max_points is None else min(num_points, max_points)
            chunks, lines, n, number, size = [], [], 0, 1, 0  # parsed chunks; the (line number, text) of the one being read
            for number, line in enumerate(f, start=2):
                line = line.rstrip("\r\n")
                if not line:
                    continue
                if n == want:
                    if want < num_points:  # max_points reached
                        break
                    raise XMCFormatError(f"{path}:{number}: more points than the header's {num_points}")
                lines.append((number, line))
                n += 1
                size += len(line)
                if len(lines) == CHUNK or size >= CHUNK_CHARS:
                    chunks.append(_parse_lines(lines, path, num_features, num_labels))
                    lines, size = [], 0
            chunks.append(_parse_lines(lines, path, num_features, num_labels))
    except UnicodeDecodeError as error:
        raise XMCFormatError(f"{path}: not UTF-8 text ({error.reason}, byte {error.object[error.start:error.start + 1]!r}"
                             "); a compressed file? decompress it first") from None
    if n < want:
        raise XMCFormatError(f"{path}:{number + 1}: the file ends after {n} points but the header says {num_points}")
    feature_counts, label_counts, label_ids, feature_ids, values = (np.concatenate(part) for part in zip(*chunks))
    feature_offsets = np.zeros(want + 1, dtype=np.int64)
    np.cumsum(feature_counts, out=feature_offsets[1:])
    label_offsets = np.zeros(want + 1, dtype=np.int64)
    np.cumsum(label_counts, out=label_offsets[1:])
    return XMCData(num_features, num_labels, feature_offsets, feature_ids, values, label_offsets, label_ids)


def _parse_lines(lines: list[tuple[int, str]], path: str, num_features: int, num_labels: int) -> tuple:
    """Point lines -> (feature counts, label counts, label ids, feature ids, float32 values): every
    number at once; on any failure, the lines one by one, to name the bad one."""
    label_text, feature_tokens = [], []
    feature_counts = np.zeros(len(lines), dtype=np.int64)
    for i, (_, line) in enumerate(lines):
        tokens = line.split()
        if line[:1] not in (" ", "\t") and tokens and ":" not in tokens[0]:
            label_text.append(tokens[0])
            tokens = tokens[1:]
        else:
            label_text.append("")
        feature_counts[i] = len(tokens)
        feature_tokens.extend(tokens)
    try:
        label_counts = np.array([0 if not t else t.count(",") + 1 for t in label_text], dtype=np.int64)
        joined = ",".join(t for t in label_text if t)
        label_ids = np.array(joined.split(",") if joined else [], dtype=np.int64)
        joined = " ".join(feature_tokens)
        # Exactly one colon per token, a number on each side: "2::3" or "1:" beside "2:3:4" must not re-pair.
        if joined.count(":") != len(feature_tokens) or any(":" not in t for t in feature_tokens):
            raise ValueError
        pairs = joined.replace(":", " ").split()
        if len(pairs) != 2 * len(feature_tokens):
            raise ValueError
        numbers = np.array(pairs, dtype=np.float64).reshape(-1, 2) if pairs else np.zeros((0, 2))
        feature_ids = numbers[:, 0].astype(np.int64)
        if (feature_ids != numbers[:, 0]).any():
            raise ValueError
        if label_ids.size and (label_ids.min() < 0 or label_ids.max() >= num_labels):
            raise ValueError
        if feature_ids.size and (feature_ids.min() < 0 or feature_ids.max() >= num_features):
            raise ValueError
        if not (np.abs(numbers[:, 1]) <= FLOAT32_MAX).all():  # nan, inf, or beyond float32 (inf once cast)
            raise ValueError
    except (ValueError, OverflowError):
        for number, line in lines:
            _parse_line(line, f"{path}:{number}", num_features, num_labels)
        raise XMCFormatError(f"{path}: could not parse lines {lines[0][0]}-{lines[-1][0]} (no single bad line found)")
    return feature_counts, label_counts, label_ids, feature_ids, numbers[:, 1].astype(np.float32)


def write_xmc(path: str, data: XMCData) -> None:
    """Writes ``data`` in the repository's text format; :func:`read_xmc` reads it back exactly
    (values are written as the shortest decimal that round-trips their float32)."""
    ids, values = data.feature_ids.astype(str), data.feature_values.astype(np.float32).astype(str)
    pairs = np.char.add(np.char.add(ids, ":"), values) if len(ids) else np.zeros(0, dtype=str)
    labels = data.label_ids.astype(str)
    with open(cli.with_folder(path), "w", encoding="utf-8") as f:
        f.write(f"{len(data)} {data.num_features} {data.num_labels}\n")
        fo, lo = data.feature_offsets, data.label_offsets
        for i in range(len(data)):
            f.write(",".join(labels[lo[i]:lo[i + 1]]) + " " + " ".join(pairs[fo[i]:fo[i + 1]]) + "\n")


# ---------------------------------------------------------------------------------------------
# Synthetic data.

def generate(num_points: int = 25_000, num_features: int = 100_000, num_labels: int = 100_000, *,
             alpha: float = 1.0, rank_offset: float = 10.0, mean_labels: float = 2.5, max_labels: int = 10,
             label_features: int = 4, keep: float = 0.75, cluster_size: int = 20, cluster_features: int = 6,
             cluster_draws: int = 3, noise_features: float = 8.0, structure: str = "clusters", depth: int = 3,
             fanout: int = 10, near_labels: float = 0.5, seed: int = 0) -> XMCData:
    """Synthetic extreme multi-label data with power-law labels and label-informative sparse features.

    The model, all draws from ``numpy.random.default_rng(seed)``:

    * **Labels.** Label popularity follows a power law: the label of rank ``r`` (0 = most popular)
      is drawn with probability proportional to ``(r + rank_offset) ** -alpha``; ranks map to label
      ids through a random permutation. A point has ``1 + Poisson(mean_labels - 1)`` labels (at most
      ``max_labels``), drawn by popularity (duplicates merged), so a few labels are on many points
      and most labels on few or none, as in Amazon-670K.
    * **Label structure** (``structure="clusters"``). Labels fall into random clusters of about
      ``cluster_size`` ("topics"); each cluster owns ``cluster_features`` feature ids and each label
      ``label_features`` of its own. Labels of one cluster share the cluster's features, so they are
      each other's hard negatives: a model must use the label's own features to tell them apart.
      A point's labels are drawn independently.
    * **A label hierarchy** (``structure="tree"``). Labels are the leaves of a tree: siblings come
      in groups of ``cluster_size`` under a parent, ``fanout`` parents under a grandparent, and so
      on for ``depth`` levels of ancestors (Amazon's category tree, in miniature). Every ancestor
      owns ``cluster_features`` feature ids, and a label brings ``cluster_draws`` of them from each
      of its ancestors beside its own ``label_features``: siblings share everything but their own
      features, so they are the confusable, hard negatives, and a label's cousins are the next
      hardest. A point's first label is drawn by popularity; each further label is, with
      probability ``near_labels``, a uniformly drawn sibling of the first, else with probability
      ``near_labels`` of the rest a cousin (the same grandparent), else drawn by popularity: labels
      that co-occur are near in the tree, unlike with ``"clusters"``.
    * **Features.** For each of its labels a point gets each of the label's own features with
      probability ``keep`` (value ``U(1, 2)``) and ``cluster_draws`` of its cluster's (each
      ancestor's) features (value ``U(0.5, 1.5)``), plus ``Poisson(noise_features)`` noise features drawn from a
      power law over all feature ids (common words; value ``U(0, 1)``). Repeated ids are summed;
      values are L2-normalized per point, like tf-idf vectors.

    Predicting the most popular labels gives a low P@1; a model that reads the features can do far
    better. With the defaults about 100,000 labels, 25,000 points; a few seconds to generate.
    """
    rng = np.random.default_rng(seed)
    L, F = num_labels, num_features
    if min(num_points, F, L, label_features, cluster_size, depth, fanout) < 1 or mean_labels < 1 or not 0 < keep <= 1:
        raise ValueError("generate: sizes must be positive, mean_labels >= 1 and 0 < keep <= 1")
    if structure not in ("clusters", "tree"):
        raise ValueError(f"generate: structure must be 'clusters' or 'tree', got {structure!r}")
    if not 0 <= near_labels <= 1:
        raise ValueError(f"generate: near_labels must be in [0, 1], got {near_labels}")
    # Labels: power-law popularity over a random ranking.
    popularity = (np.arange(L) + rank_offset) ** -alpha
    popularity /= popularity.sum()
    label_of_rank = rng.permutation(L)
    counts = np.minimum(1 + rng.poisson(mean_labels - 1, size=num_points), min(max_labels, L))
    rank = np.minimum(np.searchsorted(np.cumsum(popularity), rng.random(counts.sum()), side="right"), L - 1)
    point = np.repeat(np.arange(num_points), counts)
    drawn = label_of_rank[rank]
    if structure == "tree":  # leaves in tree order: the labels at positions [k * size, (k + 1) * size) share a node
        position = rng.permutation(L)
        label_at = np.argsort(position)
        first = np.repeat(np.cumsum(counts) - counts, counts)  # each label's point's first draw
        further = np.arange(len(drawn)) != first
        u = rng.random(len(drawn))
        for size, chosen in ((cluster_size, u < near_labels),
                             (cluster_size * fanout, (u >= near_labels) & (u < near_labels * (2 - near_labels)))):
            chosen &= further
            start = position[drawn[first[chosen]]] // size * size
            offset = (rng.random(chosen.sum()) * np.minimum(size, L - start)).astype(np.int64)
            drawn[chosen] = label_at[start + offset]
    key = np.unique(point * L + drawn)  # merge duplicates, sort labels within a point
    point, labels = key // L, key % L
    label_offsets = np.zeros(num_points + 1, dtype=np.int64)
    np.cumsum(np.bincount(point, minlength=num_points), out=label_offsets[1:])

    # Label structure: groups of labels with shared features (one level of clusters, or a tree's
    # ancestors: (each label's node, each node's feature ids) per level), labels with their own.
    if structure == "clusters":  # draws in the order they always had: the same data for a seed as before the tree
        num_clusters = max(1, L // cluster_size)
        cluster = rng.integers(num_clusters, size=L)
        own = rng.integers(F, size=(L, label_features))
        levels = [(cluster, rng.integers(F, size=(num_clusters, cluster_features)))]
    else:
        own = rng.integers(F, size=(L, label_features))
        sizes = [cluster_size * fanout ** d for d in range(depth)]
        levels = [(position // size, rng.integers(F, size=(-(-L // size), cluster_features))) for size in sizes]

    # Features of each (point, label) pair, then noise per point.
    parts_point, parts_id, parts_val = [], [], []
    keep_mask = rng.random((len(labels), label_features)) < keep
    parts_point.append(np.repeat(point, label_features)[keep_mask.ravel()])
    parts_id.append(own[labels].ravel()[keep_mask.ravel()])
    parts_val.append(rng.uniform(1.0, 2.0, size=parts_id[-1].shape))
    for node, node_features in levels:
        pick = rng.integers(cluster_features, size=(len(labels), cluster_draws))
        parts_point.append(np.repeat(point, cluster_draws))
        parts_id.append(node_features[node[labels][:, None], pick].ravel())
        parts_val.append(rng.uniform(0.5, 1.5, size=parts_id[-1].shape))
    noise = rng.poisson(noise_features, size=num_points)
    word_popularity = (np.arange(F) + 10.0) ** -1.0
    word_of_rank = rng.permutation(F)
    parts_point.append(np.repeat(np.arange(num_points), noise))
    parts_id.append(word_of_rank[np.minimum(np.searchsorted(np.cumsum(word_popularity / word_popularity.sum()),
                                                             rng.random(noise.sum()), side="right"), F - 1)])
    parts_val.append(rng.uniform(0.0, 1.0, size=parts_id[-1].shape))
    fp, fid, fval = (np.concatenate(p) for p in (parts_point, parts_id, parts_val))
    key, inverse = np.unique(fp * F + fid, return_inverse=True)
    values = np.bincount(inverse, weights=fval, minlength=len(key))
    fp, fid = key // F, key % F
    norms = np.sqrt(np.bincount(fp, weights=values ** 2, minlength=num_points))
    values = (values / np.maximum(norms[fp], 1e-12)).astype(np.float32)
    feature_offsets = np.zeros(num_points + 1, dtype=np.int64)
    np.cumsum(np.bincount(fp, minlength=num_points), out=feature_offsets[1:])
    return XMCData(F, L, feature_offsets, fid.astype(np.int64), values, label_offsets, labels.astype(np.int64))


def generate_split(num_train: int = 20_000, num_test: int = 5_000, seed: int = 0, **kwargs) -> tuple[XMCData, XMCData]:
    """Train and test sets drawn from one synthetic distribution (:func:`generate`), disjoint points."""
    data = generate(num_train + num_test, seed=seed, **kwargs)
    return data.subset(np.arange(num_train)), data.subset(np.arange(num_train, num_train + num_test))


# ---------------------------------------------------------------------------------------------
# Real text.

def text_split(num_train: int = 20_000, num_test: int = 5_000, seed: int = 0, num_features: int = 100_000,
               num_labels: int = 100_000, context: int = 24, following: int = 8, common: int = 100,
               held_out: float = 0.1) -> tuple[XMCData, XMCData]:
    """An XMC task made of real text, offline: the Python standard library's source files (the LM
    example's corpus, ``transformer_lm.load_corpus``'s words), cut into windows of ``context`` words
    followed by ``following`` more. A point's features are its ``context`` words (counts, L2-normalized,
    over the ``num_features`` most frequent words of the training files); its labels are the distinct
    words among the ``following`` ones, leaving out the ``common`` most frequent (punctuation, ``self``,
    ``the``), over the next ``num_labels`` words by frequency. The labels are Zipfian, several per point,
    and their confusable neighbours are real ones (identifiers and words used in like contexts), which
    the synthetic generators only imitate. Training points come from the training files, test points
    from the held-out ones (``transformer_lm.is_held_out``, by path), each a seeded random choice among
    the windows with at least one label (all of them when fewer). About 6 s on 2 cores (reading the corpus)."""
    import transformer_lm  # beside this file: the corpus's reader

    if min(num_train, num_test, num_features, num_labels, context, following) < 1 or common < 0:
        raise ValueError("text_split: sizes must be positive and common >= 0")
    train_words, test_words, counts = transformer_lm.read_corpus(held_out, progress=False)
    if not counts:
        raise ValueError("text_split: the standard library gave no training words (no .py source files found by "
                         "transformer_lm.stdlib_files(): a zipped or stripped standard library?)")
    for name, size, reserved in (("num_features", num_features, 0), ("num_labels", num_labels, common)):
        if reserved + size > len(counts):  # rows that no word could ever fill
            raise ValueError(f"text_split: {name}={size:,}: the training text has {len(counts):,} distinct words"
                             + (f", {len(counts) - common:,} beyond the {common} most common" if reserved else ""))
    ranked = [w for w, _ in counts.most_common(max(num_features, common + num_labels))]
    rank = {w: r for r, w in enumerate(ranked)}
    rng = np.random.default_rng(seed)

    def points(files: list[list[str]], n: int) -> XMCData:
        width = context + following
        windows = [np.array([rank.get(w, -1) for w in words[:len(words) // width * width]], dtype=np.int64)
                   .reshape(-1, width) for words in files if len(words) >= width]
        windows = np.concatenate(windows) if windows else np.zeros((0, width), dtype=np.int64)
        features, labels = windows[:, :context], windows[:, context:] - common
        features = np.where(features < num_features, features, -1)
        labels = np.where((labels >= 0) & (labels < num_labels), labels, -1)
        keep = np.flatnonzero((labels >= 0).any(1))
        chosen = np.sort(rng.permutation(keep)[:n])  # in corpus order
        return _csr(features[chosen], labels[chosen], num_features, num_labels)

    return points(train_words, num_train), points(test_words, num_test)


def _csr(features: np.ndarray, labels: np.ndarray, num_features: int, num_labels: int) -> XMCData:
    """XMCData from dense id matrices (-1 = none): feature values are counts, L2-normalized per point;
    repeated labels are merged."""
    def rows_of(ids: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        point = np.repeat(np.arange(len(ids)), ids.shape[1]).reshape(ids.shape)
        present = ids >= 0
        key, count = np.unique(point[present] * width + ids[present], return_counts=True)
        offsets = np.zeros(len(ids) + 1, dtype=np.int64)
        np.cumsum(np.bincount(key // width, minlength=len(ids)), out=offsets[1:])
        return offsets, key % width, count

    f_off, f_ids, f_counts = rows_of(features, num_features)
    point = np.repeat(np.arange(len(features)), np.diff(f_off))
    values = f_counts / np.sqrt(np.bincount(point, weights=f_counts.astype(np.float64) ** 2, minlength=len(features)))[point]
    l_off, l_ids, _ = rows_of(labels, num_labels)
    return XMCData(num_features, num_labels, f_off, f_ids.astype(np.int64), values.astype(np.float32), l_off,
                   l_ids.astype(np.int64))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Write synthetic XMC train/test files in the Extreme "
                                                 "Classification Repository text format.")
    parser.add_argument("--out-dir", type=cli.output_dir, default="data/xmc_synthetic",
                        help="folder for train.txt and test.txt")
    parser.add_argument("--train-points", type=cli.integer(), default=20_000)
    parser.add_argument("--test-points", type=cli.integer(), default=5_000)
    parser.add_argument("--features", type=cli.integer(), default=100_000)
    parser.add_argument("--labels", type=cli.integer(), default=100_000)
    parser.add_argument("--seed", type=cli.integer(0), default=0)
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    train, test = generate_split(args.train_points, args.test_points, seed=args.seed, num_features=args.features,
                                 num_labels=args.labels)
    for name, data in (("train", train), ("test", test)):
        path = os.path.join(args.out_dir, f"{name}.txt")
        write_xmc(path, data)
        print(f"wrote {path}: {data.summary()}")


if __name__ == "__main__":
    cli.run(main)
