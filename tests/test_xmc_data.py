"""The XMC data module of the extreme-classification demo (examples/xmc_data.py): format and generator."""
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"))
import xmc_data  # noqa: E402
from xmc_data import XMCData, XMCFormatError, generate, read_xmc, write_xmc  # noqa: E402

FIELDS = ("feature_offsets", "feature_ids", "feature_values", "label_offsets", "label_ids")


def assert_same(a: XMCData, b: XMCData):
    assert (a.num_features, a.num_labels, len(a)) == (b.num_features, b.num_labels, len(b))
    for name in FIELDS:
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype and np.array_equal(x, y), name


def small(**kw):
    return generate(300, num_features=500, num_labels=1000, seed=3, **kw)


@pytest.mark.parametrize("structure", ["clusters", "tree"])
def test_generate_is_seeded_and_well_formed(structure):
    a, b = small(structure=structure), small(structure=structure)
    c = generate(300, num_features=500, num_labels=1000, seed=4, structure=structure)
    assert_same(a, b)
    assert not np.array_equal(a.label_ids, c.label_ids)
    assert a.feature_ids.dtype == np.int64 and a.feature_values.dtype == np.float32
    assert a.feature_ids.min() >= 0 and a.feature_ids.max() < 500
    assert a.label_ids.min() >= 0 and a.label_ids.max() < 1000
    for i in range(len(a)):
        ids, values = a.features_of(i)
        labels = a.labels_of(i)
        assert len(labels) >= 1 and np.all(np.diff(labels) > 0)  # sorted, no duplicates
        assert np.all(np.diff(ids) > 0) and np.all(values > 0)
        np.testing.assert_allclose(np.linalg.norm(values), 1.0, rtol=1e-5)


def test_round_trip_generate_write_read(tmp_path):
    data = small()
    path = tmp_path / "train.txt"
    write_xmc(str(path), data)
    assert path.read_text().splitlines()[0] == "300 500 1000"
    assert_same(read_xmc(str(path)), data)
    head = read_xmc(str(path), max_points=7)
    assert_same(head, data.subset(np.arange(7)))


def test_round_trip_points_without_labels_or_features(tmp_path):
    data = XMCData(10, 5, np.array([0, 2, 2, 3]), np.array([1, 7, 9]), np.array([0.5, 0.25, 1.5], np.float32),
                   np.array([0, 0, 2, 3]), np.array([0, 4, 2]))
    path = tmp_path / "d.txt"
    write_xmc(str(path), data)
    assert path.read_text().splitlines()[1:] == [" 1:0.5 7:0.25", "0,4 ", "2 9:1.5"]
    assert_same(read_xmc(str(path)), data)


def test_reads_the_repository_layout(tmp_path):
    path = tmp_path / "r.txt"
    path.write_text("3 6 4\n1,3 0:0.5 5:1e-2\n2:1\n0\n")  # no labels on line 3, no features on line 4
    data = read_xmc(str(path))
    assert [list(data.labels_of(i)) for i in range(3)] == [[1, 3], [], [0]]
    assert [list(data.features_of(i)[0]) for i in range(3)] == [[0, 5], [2], []]
    np.testing.assert_allclose(data.feature_values, [0.5, 0.01, 1.0])


@pytest.mark.parametrize("text,match", [
    ("3 6\n", r":1: header"),
    ("a b c\n", r":1: header"),
    ("2 6 4\n1 0:0.5\n2 1:x\n", r":3: bad feature '1:x'"),
    ("2 6 4\n1 0:0.5\n2 15\n", r":3: bad feature '15'"),
    ("2 6 4\n1 0:0.5\n1,a 1:1\n", r":3: bad label 'a'"),
    ("2 6 4\n1 0:0.5\n9 1:1\n", r":3: label 9 out of range"),
    ("2 6 4\n1 6:0.5\n0 1:1\n", r":2: feature id 6 out of range"),
    ("3 6 4\n1 0:0.5\n0 1:1\n", r":4: the file ends after 2 points but the header says 3"),
    ("1 6 4\n1 0:0.5\n0 1:1\n", r":3: more points than the header's 1"),
    ("2 6 4\n1 0:0.5\n0 1:nan\n", r":3: bad feature '1:nan' .*finite"),
    # Found by a review as a user with real files: each was read without an error, as the wrong data.
    ("1 20 20\n1 1:1 2::3\n", r":2: bad feature '2::3'"),  # was feature 2, value 3
    ("2 6 4\n1 1:\n2 2:3:4\n", r":2: bad feature '1:'"),  # the tokens re-paired: ids [1] [3], values [2] [4]
    ("1 20 20\n1 :1 2:3:4\n", r":2: bad feature ':1'"),
    ("1 6 4\n1 1:1e39\n", r":2: bad feature '1:1e39' .*finite float32"),  # inf once cast
    ("3 6 4\n1 0:1\n1 0:1\n\n", r":5: the file ends after 2 points"),  # a blank line was a third, empty point
    ("2 6 4\n1 0:1\n1 0:1\n1 0:1\n", r":4: more points than the header's 2"),  # with max_points=5 too
    ("3 6 100000000000\n1 0:0.5\n", r":1: the header's 6 features and 100,000,000,000 labels"),  # a 745 GiB array
])
@pytest.mark.parametrize("max_points", [None, 5])
def test_malformed_files_name_the_line(tmp_path, text, match, max_points):
    path = tmp_path / "bad.txt"
    path.write_text(text)
    with pytest.raises(XMCFormatError, match=match):
        read_xmc(str(path), max_points)
    assert issubclass(XMCFormatError, ValueError)


def test_bad_lines_are_named_across_chunks_and_other_encodings_are_refused(tmp_path, monkeypatch):
    import gzip
    monkeypatch.setattr(xmc_data, "CHUNK", 3)  # the file is parsed a few lines at a time
    lines = ["1 0:0.5"] * 7 + ["1 0:x"] + ["1 0:0.5"] * 2
    path = tmp_path / "chunks.txt"
    path.write_text("10 6 4\n" + "\n".join(lines) + "\n")
    with pytest.raises(XMCFormatError, match=r":9: bad feature '0:x'"):
        read_xmc(str(path))
    path.write_text("10 6 4\n" + "\n".join(lines).replace("0:x", "0:2") + "\n")
    data = read_xmc(str(path))
    assert len(data) == 10 and data.feature_values[7] == 2.0 and list(data.label_offsets) == list(range(11))
    packed = tmp_path / "chunks.txt.gz"
    packed.write_bytes(gzip.compress(path.read_bytes()))
    with pytest.raises(XMCFormatError, match="chunks.txt.gz: not UTF-8 text.*decompress it first"):
        read_xmc(str(packed))  # was a bare UnicodeDecodeError


def test_wide_lines_are_parsed_in_smaller_groups_and_a_byte_order_mark_is_no_header_digit(tmp_path, monkeypatch):
    """Groups of 16,384 lines held every token of wide points at once (3.3 GB for Wiki10-like points); a
    file saved with a UTF-8 byte-order mark (Windows editors) was refused at its header."""
    data = small()
    path = tmp_path / "train.txt"
    write_xmc(str(path), data)
    groups = []
    parse = xmc_data._parse_lines
    monkeypatch.setattr(xmc_data, "_parse_lines", lambda lines, *args: groups.append(len(lines)) or parse(lines, *args))
    monkeypatch.setattr(xmc_data, "CHUNK_CHARS", 2_000)  # a few points' text
    assert_same(read_xmc(str(path)), data)
    assert len(groups) > 5 and sum(groups) == len(data)
    marked = tmp_path / "bom.txt"
    marked.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    assert_same(read_xmc(str(marked)), data)


def test_label_counts_count_a_point_once():
    data = XMCData(6, 5, np.array([0, 0, 0, 0]), np.zeros(0, np.int64), np.zeros(0, np.float32),
                   np.array([0, 3, 4, 5]), np.array([1, 1, 1, 0, 0]))
    assert list(data.label_counts()) == [2, 1, 0, 0, 0]  # was [2, 3, ...]: the repeats of label 1 on point 0


def co_occurring_labels_similarity(**kwargs) -> float:
    """Mean cosine similarity of the feature centroids of two labels that share a point, each
    centroid over the label's other points (the shared ones left out, so that the pair's own point
    does not make them alike)."""
    d = generate(3000, num_features=3000, num_labels=2000, seed=0, **kwargs)
    x, y = np.zeros((len(d), d.num_features)), np.zeros((len(d), d.num_labels), dtype=bool)
    for i in range(len(d)):
        ids, values = d.features_of(i)
        x[i, ids], y[i, d.labels_of(i)] = values, True
    centroid = y.T.astype(float) @ x
    cos = []
    for i in range(len(d)):
        if len(d.labels_of(i)) >= 2:
            a, b = d.labels_of(i)[:2]
            shared = x[y[:, a] & y[:, b]].sum(0)
            ca, cb = centroid[a] - shared, centroid[b] - shared
            if ca.any() and cb.any():
                cos.append(ca @ cb / (np.linalg.norm(ca) * np.linalg.norm(cb)))
    assert len(cos) > 500
    return float(np.mean(cos))


def test_tree_labels_that_co_occur_are_confusable_siblings():
    # In the hierarchy a point's labels are mostly siblings or cousins, whose features come from the
    # same ancestors: alike even on points they do not share. Drawn independently (near_labels=0, or
    # the clusters) they are not. Depth 2: 10 grandparents of 200 labels (at depth 3 one root would
    # hold all 2,000 and make every pair alike).
    near = co_occurring_labels_similarity(structure="tree", depth=2)
    independent = co_occurring_labels_similarity(structure="tree", depth=2, near_labels=0.0)
    clusters = co_occurring_labels_similarity(structure="clusters")
    assert near > 0.2 and near > 2 * independent and clusters < 0.1, (near, independent, clusters)


@pytest.mark.parametrize("num_labels", [7, 19, 1013])  # fewer than a sibling group, and not a multiple of one
def test_tree_with_partial_groups_is_well_formed(num_labels):
    d = generate(400, num_features=300, num_labels=num_labels, cluster_size=20, fanout=3, structure="tree", seed=1)
    assert d.label_ids.min() >= 0 and d.label_ids.max() < num_labels
    assert d.feature_ids.min() >= 0 and d.feature_ids.max() < 300
    assert all(len(d.labels_of(i)) >= 1 and np.all(np.diff(d.labels_of(i)) > 0) for i in range(len(d)))


@pytest.mark.parametrize("kwargs, match", [({"structure": "forest"}, "structure must be"),
                                           ({"near_labels": 1.5}, "near_labels"),
                                           ({"depth": 0}, "sizes must be positive")])
def test_generate_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        small(**kwargs)


def test_label_frequencies_follow_a_power_law():
    data = generate(20_000, num_features=20_000, num_labels=20_000, alpha=1.0, seed=0)
    counts = np.sort(data.label_counts())[::-1].astype(float)
    ranks = np.arange(1, len(counts) + 1)
    mid = slice(20, 2000)  # past the flat head (rank_offset), before counts of 0-2 make it noisy
    slope = np.polyfit(np.log(ranks[mid]), np.log(counts[mid]), 1)[0]
    assert -1.3 < slope < -0.7
    assert counts[0] > 50 * np.median(counts)  # a few labels on many points, most on few


@pytest.mark.parametrize("structure", ["clusters", "tree"])
def test_features_are_informative_of_labels(structure):
    # A nearest-centroid rule (cosine: in the tree every label's centroid holds its ancestors'
    # features, and the raw sums of popular labels would win) beats predicting the most popular label by far.
    train, test = xmc_data.generate_split(4000, 1000, num_features=5000, num_labels=2000, seed=1, structure=structure)
    w = np.zeros((train.num_labels, train.num_features))
    for i in range(len(train)):
        ids, values = train.features_of(i)
        for label in train.labels_of(i):
            w[label, ids] += values
    w /= np.maximum(np.linalg.norm(w, axis=1, keepdims=True), 1e-12)
    hits = popular_hits = 0
    popular = np.argmax(train.label_counts())
    for i in range(len(test)):
        ids, values = test.features_of(i)
        hits += np.argmax(w[:, ids] @ values) in test.labels_of(i)
        popular_hits += popular in test.labels_of(i)
    assert hits / len(test) > 0.4 and hits > 5 * popular_hits


def test_batch_tensors_feed_embedding_bag():
    import torch

    data = small()
    ids, offsets, values, labels = data.batch([5, 0, 7])
    assert ids.dtype == offsets.dtype == labels.dtype == torch.int64 and values.dtype == torch.float32
    bag = torch.nn.EmbeddingBag(data.num_features, 4, mode="sum")
    out = bag(ids, offsets, per_sample_weights=values)
    f_ids, f_vals = data.features_of(0)
    torch.testing.assert_close(out[1], (bag.weight[torch.from_numpy(f_ids)] * torch.from_numpy(f_vals)[:, None]).sum(0))
    for row, i in zip(labels.tolist(), [5, 0, 7]):
        assert [l for l in row if l >= 0] == data.labels_of(i).tolist()
    assert sum(len(b[3]) for b in data.batches(64)) == len(data)


@pytest.fixture
def tiny_corpus(monkeypatch):
    """text_split's corpus replaced by three files: two for training, one held out."""
    import transformer_lm

    files = {"a.py": "x y x z w . x y v".split(), "b.py": "x . y y u w x".split(), "held.py": "x u w y z . v".split()}
    monkeypatch.setattr(transformer_lm, "stdlib_files", lambda: sorted(files))
    monkeypatch.setattr(transformer_lm, "read_words", lambda path: files[path])
    monkeypatch.setattr(transformer_lm, "is_held_out", lambda path, fraction: path == "held.py")


def test_text_split_windows_counts_and_labels(tiny_corpus):
    # Training counts: x 5, y 4, w 2, then . z v u (1 or 2 each; ties in first-seen order): x=0 y=1 w=2 .=3 z=4 v=5 u=6.
    train, test = xmc_data.text_split(10, 10, num_features=3, num_labels=3, context=2, following=1, common=1)
    # Windows of 3 words (2 of context, 1 following); the last partial window of a file is dropped.
    # a.py: [x y | x] [z w | .] [x y | v]; b.py: [x . | y] [y u | w]; held.py: [x u | w] [y z | .].
    # Features: x y w (ids 0-2); labels: ranks 1-3 (y w .) as 0-2; windows whose word is no label are left out.
    assert (train.num_features, train.num_labels) == (3, 3)
    expected = [({0: 1, 1: 1}, []), ({2: 1}, [2]), ({0: 1, 1: 1}, []), ({0: 1}, [0]), ({1: 1}, [1])]
    kept = [(f, labels) for f, labels in expected if labels]
    assert len(train) == len(kept)
    for i, (features, labels) in enumerate(kept):  # the chosen windows stay in corpus order
        ids, values = train.features_of(i)
        assert dict(zip(ids.tolist(), (values / values.max()).round(6).tolist())) == \
               {k: v / max(features.values()) for k, v in features.items()}
        assert train.labels_of(i).tolist() == labels
    assert [test.labels_of(i).tolist() for i in range(len(test))] == [[1], [2]]  # held.py's windows only
    assert test.features_of(0)[0].tolist() == [0] and test.features_of(1)[0].tolist() == [1]


def test_text_split_samples_seeded_and_counts_repeats(tiny_corpus):
    train, _ = xmc_data.text_split(2, 1, num_features=4, num_labels=4, context=2, following=1, common=0, seed=5)
    again, _ = xmc_data.text_split(2, 1, num_features=4, num_labels=4, context=2, following=1, common=0, seed=5)
    assert len(train) == 2
    assert_same(train, again)
    # With common=0 and 4 labels (x y w .), 4 of the 5 windows have one: each seed picks 2 of them, in corpus order.
    picks = {tuple(xmc_data.text_split(2, 1, num_features=4, num_labels=4, context=2, following=1, common=0,
                                       seed=s)[0].label_ids.tolist()) for s in range(12)}
    assert len(picks) > 1
    # A word twice in a context counts twice: [x y | x] with features x, y: values 1/sqrt(2) each; a repeat.
    data = xmc_data._csr(np.array([[0, 0, 1], [-1, -1, -1]]), np.array([[2, 2], [-1, 1]]), 2, 3)
    assert data.feature_offsets.tolist() == [0, 2, 2] and data.feature_ids.tolist() == [0, 1]
    np.testing.assert_allclose(data.feature_values, np.array([2, 1]) / np.sqrt(5), rtol=1e-6)
    assert data.label_offsets.tolist() == [0, 1, 2] and data.label_ids.tolist() == [2, 1]


def test_text_split_refuses_bad_sizes(tiny_corpus, monkeypatch):
    with pytest.raises(ValueError, match="sizes must be positive"):
        xmc_data.text_split(0, 10)
    # 7 distinct training words: rows no word could fill are refused (the layer would carry them for nothing).
    with pytest.raises(ValueError, match="num_features=8: the training text has 7 distinct words"):
        xmc_data.text_split(5, 5, num_features=8, num_labels=2, common=1)
    with pytest.raises(ValueError, match="num_labels=7: .* 6 beyond the 1 most common"):
        xmc_data.text_split(5, 5, num_features=7, num_labels=7, common=1)
    xmc_data.text_split(5, 5, num_features=7, num_labels=6, common=1)  # every word used
    import transformer_lm

    monkeypatch.setattr(transformer_lm, "stdlib_files", lambda: [])
    with pytest.raises(ValueError, match="no training words"):
        xmc_data.text_split(5, 5)
