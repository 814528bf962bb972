"""MemoryBank against a loop-by-loop float64 reference of METHOD.md, chunk invariance, ties, errors, Zarr."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from builders import assert_same_query as assert_same
from builders import random_bank

from pipeline.engine import bank as bank_module
from pipeline.engine.bank import MemoryBank
from pipeline.errors import BankError


def reference(features, labels, f, k, temperature, exclude=-1):
    """One image, straight from docs/method.md "Dimension-wise importance weights", in float64 loops."""
    z = [row / row.norm() for row in features.double()]
    f_hat = f.double() / f.double().norm()
    sims = {i: float(f_hat @ z[i]) for i in range(len(z)) if i != exclude}
    top = sorted(sims, key=lambda i: (-sims[i], i))[:k]
    if labels is None:
        kept, predicted, share = top, None, None
    else:
        score: dict[int, float] = {}
        for i in top:
            score[int(labels[i])] = score.get(int(labels[i]), 0.0) + math.exp(sims[i] / temperature)
        best = max(score.values())
        predicted = min(c for c, v in score.items() if v == best)
        share = best / sum(score.values())
        kept = [i for i in top if int(labels[i]) == predicted]
    m = sum(f_hat * z[i] for i in kept) / len(kept)
    w = m / abs(float(m.sum()))
    low, high = float(w.min()), float(w.max())
    w = (w - low) / (high - low) if high > low else torch.ones_like(w)
    return w, predicted, share, top, [sims[i] for i in top]


@pytest.mark.parametrize(
    ("k", "temperature", "labelled"), [(1, 0.07, True), (5, 0.07, True), (20, 0.5, True), (7, 0.07, False)]
)
def test_matches_reference(k, temperature, labelled):
    features, labels, queries = random_bank(k)
    labels = labels if labelled else None
    result = MemoryBank(features, labels, k=k, temperature=temperature, chunk_size=64).query(queries)
    assert result.weights.dtype == torch.float32 and result.weights.shape == queries.shape
    assert result.neighbours.shape == result.similarities.shape == (len(queries), k)
    assert (result.neighbours.dtype, result.similarities.dtype) == (torch.int64, torch.float32)
    if labelled:
        assert (result.predicted.dtype, result.vote_share.dtype) == (torch.int64, torch.float32)
    for b, f in enumerate(queries):
        w, predicted, share, top, sims = reference(features, labels, f, k, temperature)
        assert result.neighbours[b].tolist() == top
        torch.testing.assert_close(
            result.similarities[b].double(), torch.tensor(sims, dtype=torch.float64), atol=1e-6, rtol=0
        )
        torch.testing.assert_close(result.weights[b].double(), w, atol=2e-5, rtol=0)
        assert float(result.weights[b].min()) == 0.0 and float(result.weights[b].max()) == 1.0
        if labelled:
            assert int(result.predicted[b]) == predicted
            assert float(result.vote_share[b]) == pytest.approx(share, rel=1e-5)
    if not labelled:
        assert result.predicted is None and result.vote_share is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("labelled", [True, False])
def test_chunked_equals_unchunked(dtype, labelled):
    features, labels, queries = random_bank(1)
    labels = labels if labelled else None
    exclude = torch.tensor([3, -1, 299, 0, 150, -1, 64, 7])
    whole = MemoryBank(features, labels, k=10, dtype=dtype, chunk_size=len(features))
    expected, expected_ex = whole.query(queries), whole.query(queries, exclude=exclude)
    for chunk_size in (1, 7, 64):
        bank = MemoryBank(features, labels, k=10, dtype=dtype, chunk_size=chunk_size)
        assert_same(bank.query(queries), expected)
        assert_same(bank.query(queries, exclude=exclude), expected_ex)


def test_float64_selection_when_matmul_precision_is_reduced(monkeypatch):
    features, labels, queries = random_bank(2)
    expected = MemoryBank(features, labels, k=10).query(queries)
    assert bank_module._ieee_float32_matmul(torch.device("cpu"))
    monkeypatch.setattr(bank_module, "_ieee_float32_matmul", lambda device: False)
    assert_same(MemoryBank(features, labels, k=10).query(queries), expected)


@pytest.mark.parametrize("chunk_size", [1, 7, 50, 400])
@pytest.mark.parametrize("many", [False, True])
def test_similarity_ties_rank_lower_index_first(chunk_size, many, caplog):
    features, labels, _ = random_bank(3, size=400)
    copies = [390, 12, 250, 0, 48, 49, 300, 7, 120, 121, 399, *range(200, 240)] if many else [390, 250, 0, 121]
    features[copies] = features[0] * 3.0
    query = features[:1] + 0.01
    with caplog.at_level(logging.DEBUG, logger="pipeline.engine.bank"):
        result = MemoryBank(features, labels, k=20, chunk_size=chunk_size).query(query)
    tied = min(len(copies), 20)
    assert result.neighbours[0, :tied].tolist() == sorted(copies)[:tied]
    assert torch.unique(result.similarities[0, :tied]).numel() == 1
    assert (result.similarities[0, tied:] < result.similarities[0, 0]).all()
    if chunk_size == 400:  # the GEMM preselection cannot separate 51 equal rows: only then the exact rescan runs
        assert ("exact rescan of 1 of 1" in caplog.text) == many


@pytest.mark.parametrize("first_label", [3, 1])
def test_vote_tie_smallest_class_wins(first_label):
    other = 4 - first_label
    x, y, far = [1.0, 0.0, 0.0, 0.0], [0.8, 0.6, 0.0, 0.0], [-1.0, 0.0, 0.0, 0.0]
    features = torch.tensor([x, x, y, y, far, far, far])
    labels = torch.tensor([first_label, other, other, first_label, 0, 0, 0])
    query = torch.tensor([[1.0, 0.1, 0.0, 0.0]])
    result = MemoryBank(features, labels, k=4).query(query)
    assert result.neighbours[0].tolist() == [0, 1, 2, 3]
    assert result.predicted.tolist() == [1]
    assert result.vote_share.tolist() == [0.5]
    w, *_ = reference(features, labels, query[0], 4, 0.07)
    torch.testing.assert_close(result.weights[0].double(), w, atol=1e-6, rtol=0)


def test_exclude_own_sample():
    features, labels, _ = random_bank(4, size=120)
    rows = torch.tensor([0, 5, 119, 60])
    bank = MemoryBank(features, labels, k=6, chunk_size=32)
    plain = bank.query(features[rows])
    assert plain.neighbours[:, 0].tolist() == rows.tolist()
    torch.testing.assert_close(plain.similarities[:, 0], torch.ones(4), atol=1e-6, rtol=0)
    result = bank.query(features[rows], exclude=rows)
    assert not (result.neighbours == rows[:, None]).any()
    for b, row in enumerate(rows.tolist()):
        w, predicted, _, top, _ = reference(features, labels, features[row], 6, 0.07, exclude=row)
        assert result.neighbours[b].tolist() == top
        assert int(result.predicted[b]) == predicted
        torch.testing.assert_close(result.weights[b].double(), w, atol=2e-5, rtol=0)
    assert_same(bank.query(features[rows], exclude=torch.full((4,), -1)), plain)


def test_empty_batch():
    features, labels, _ = random_bank(7)
    result = MemoryBank(features, labels, k=5).query(torch.empty(0, 24))
    assert result.weights.shape == (0, 24) and result.neighbours.shape == (0, 5) and result.predicted.shape == (0,)


def test_constant_mean_gives_all_ones():
    features = torch.cat([torch.ones(1, 16), -torch.ones(3, 16)])
    result = MemoryBank(features, None, k=1).query(torch.full((2, 16), 2.5))
    assert torch.equal(result.weights, torch.ones(2, 16))
    assert result.neighbours.tolist() == [[0], [0]]


def test_float16_storage_is_unit_norm():
    features, labels, queries = random_bank(5)
    bank = MemoryBank(features, labels, k=5, dtype=torch.float16)
    assert bank.features.dtype == torch.float16 and bank.labels.dtype == torch.int64
    torch.testing.assert_close(
        torch.linalg.vector_norm(bank.features.float(), dim=1), torch.ones(300), atol=2e-3, rtol=0
    )
    assert bank.query(queries).neighbours.shape == (8, 5)


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: MemoryBank(torch.randn(5, 4), None, k=6), r"5 rows is smaller than k=6"),
        (lambda: MemoryBank(torch.randn(10, 4), None, k=3).query(torch.randn(2, 5)), r"\(2, 5\).*feature size 4"),
        (lambda: MemoryBank(torch.randn(10, 4), torch.zeros(9, dtype=torch.int64), k=3), r"\(10,\).*10 feature rows"),
        (lambda: MemoryBank(torch.randn(10, 4), None, k=0), r"k must be >= 1, got 0"),
        (lambda: MemoryBank(torch.randn(10, 4), None, k=3, temperature=0.0), r"temperature must be > 0, got 0.0"),
        (lambda: MemoryBank(torch.randn(10, 4), None, k=3, chunk_size=0), r"chunk_size must be >= 1, got 0"),
        (lambda: MemoryBank(torch.randn(10, 4), torch.arange(10) - 1, k=3), r"labels span \[-1, 8\]"),
        (lambda: MemoryBank(torch.randn(10, 4), torch.arange(10), k=3, num_classes=5), r"outside \[0, 5\)"),
        (lambda: MemoryBank(torch.randn(10, 4).index_fill(0, torch.tensor([6]), 0.0), None, k=3), r"row 6 has norm 0"),
        (lambda: MemoryBank(torch.randn(10, 4), None, k=3, dtype=torch.bfloat16), r"storage dtype"),
        (
            lambda: MemoryBank(torch.randn(3, 4), None, k=3).query(torch.randn(1, 4), exclude=torch.tensor([0])),
            r"3 rows",
        ),
        (
            lambda: MemoryBank(torch.randn(9, 4), None, k=3).query(torch.randn(1, 4), exclude=torch.tensor([9])),
            r"holds 9",
        ),
    ],
)
def test_errors(make, match):
    with pytest.raises(BankError, match=match):
        make()
