"""Memory bank of reference features: k-NN dimension-wise importance weights for self-supervised DAAM.

docs/method.md, "Dimension-wise importance weights (self-supervised)", as code. The bank holds L2-normalised features
``z_i`` (optionally labels ``y_i``); :meth:`MemoryBank.query` returns, per image feature ``f``, the weights ``w``
in [0, 1] that DAAM holds constant in ``Y = <f, w>``.

The bank may be larger than device memory: it is scanned in chunks of rows, each moved to the query's device,
with a running top-k. Results do not depend on the chunk size, bit for bit:

- Neighbours are ranked by an order-independent similarity: the float32 products ``f_hat[d] * z_i[d]`` are exact
  in float64 and are summed as 2^-60 fixed-point integers, so no reduction order (GEMM tiling, chunk shape,
  device kernel) changes a single bit. Ties rank the lower bank index first.
- A float32 GEMM only preselects candidates per chunk; the largest similarity it leaves out is tracked, and a
  rigorous bound on the GEMM's rounding error proves the candidates hold the true top-k. Queries where the proof
  fails (near-exact ties, e.g. duplicate rows) are rescanned with the exact similarity for every row.
- Votes are summed as fixed-point integers too, so equal scores are equal bit for bit, and the smallest class id
  wins a tie.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from pipeline.errors import BankError

__all__ = ["BankQuery", "MemoryBank"]

logger = logging.getLogger(__name__)

_STORAGE_DTYPES = (torch.float32, torch.float16)
_SIMILARITY_SCALE = 2.0**60  # |f_hat . z| <= ~1, so sums of 2^-60 fixed-point products fit in int64
_EXACT_TILE_ELEMENTS = 1 << 23  # elements of one (queries, rows, D) product tile in the exact scan


@dataclass(frozen=True, slots=True)
class BankQuery:
    """Result of :meth:`MemoryBank.query` for a batch of B features, all on the query's device.

    Attributes:
        weights: (B, D) float32 dimension-wise importance weights in [0, 1].
        predicted: (B,) int64 voted classes, None for a label-free bank.
        vote_share: (B,) float32 winning class score / total score, None for a label-free bank.
        neighbours: (B, k) int64 bank row indices, most similar first (ties: lower index first).
        similarities: (B, k) float32 cosine similarities of the neighbours.
    """

    weights: Tensor
    predicted: Tensor | None
    vote_share: Tensor | None
    neighbours: Tensor
    similarities: Tensor


class MemoryBank:
    """L2-normalised reference features (and labels) queried for k-NN dimension-wise weights.

    Args:
        features: (M, D) reference features, normalised here unless ``normalised``.
        labels: (M,) int64 class ids in [0, num_classes), or None for a label-free bank (no vote).
        k: Number of neighbours.
        temperature: Vote temperature T.
        chunk_size: Bank rows moved to the query's device and scored at a time.
        device: Where the bank is stored (default: the device of ``features``). Queries run on their own device.
        num_classes: Number of classes (default: max label + 1).
        dtype: Storage dtype, float32 or float16 (half the memory for ImageNet-scale banks).
        normalised: The features are already unit rows in ``dtype`` (as a bank file holds them).
        pin_memory: Pin a host-stored bank for asynchronous copies (default: when CUDA is available).

    Raises:
        BankError: Bad shapes, labels, k, temperature, chunk size or dtype, or rows of zero or non-finite norm.
    """

    def __init__(
        self,
        features: Tensor,
        labels: Tensor | None,
        *,
        k: int = 20,
        temperature: float = 0.07,
        chunk_size: int = 65536,
        device: torch.device | str | None = None,
        num_classes: int | None = None,
        dtype: torch.dtype = torch.float32,
        normalised: bool = False,
        pin_memory: bool | None = None,
    ) -> None:
        if features.ndim != 2 or not features.is_floating_point():
            raise BankError(
                f"bank features must be a floating (M, D) tensor, got {features.dtype} {tuple(features.shape)}"
            )
        size = features.shape[0]
        if k < 1:
            raise BankError(f"k must be >= 1, got {k}")
        if size < k:
            raise BankError(f"bank of {size} rows is smaller than k={k}")
        if not temperature > 0:
            raise BankError(f"temperature must be > 0, got {temperature}")
        if chunk_size < 1:
            raise BankError(f"chunk_size must be >= 1, got {chunk_size}")
        if dtype not in _STORAGE_DTYPES:
            raise BankError(f"storage dtype must be one of {sorted(map(str, _STORAGE_DTYPES))}, got {dtype}")
        device = torch.device(device) if device is not None else features.device
        if pin_memory is None:
            pin_memory = device.type == "cpu" and torch.cuda.is_available()
        self.k = k
        self.temperature = float(temperature)
        self.chunk_size = chunk_size
        self._features = self._store(features, device, dtype, normalised, pin_memory)
        self._labels, self.num_classes = _check_labels(labels, size, num_classes, device)
        self._label_cache: dict[torch.device, Tensor] = {}

    @staticmethod
    def _store(features: Tensor, device: torch.device, dtype: torch.dtype, normalised: bool, pin: bool) -> Tensor:
        """The features as unit rows in ``dtype`` on ``device``, normalised chunk by chunk to bound memory."""
        size, dim = features.shape
        out = torch.empty((size, dim), dtype=dtype, device=device, pin_memory=pin and device.type == "cpu")
        step = max(1, _EXACT_TILE_ELEMENTS // max(dim, 1))
        for start in range(0, size, step):
            block = features[start : start + step].to(device=device, dtype=torch.float32)
            norm = torch.linalg.vector_norm(block, dim=1)
            bad = ~torch.isfinite(norm) | (norm == 0)
            if bool(bad.any()):
                row = start + int(bad.nonzero()[0, 0])
                raise BankError(
                    f"bank feature row {row} has norm {float(norm[row - start])}; rows must be finite, non-zero"
                )
            out[start : start + step] = block if normalised else block / norm[:, None]
        return out

    @property
    def size(self) -> int:
        """Number of rows M."""
        return self._features.shape[0]

    @property
    def dim(self) -> int:
        """Feature size D."""
        return self._features.shape[1]

    @property
    def features(self) -> Tensor:
        """(M, D) stored unit rows (do not modify)."""
        return self._features

    @property
    def labels(self) -> Tensor | None:
        """(M,) int64 labels, or None for a label-free bank."""
        return self._labels

    def __len__(self) -> int:
        return self.size

    def __repr__(self) -> str:
        return (
            f"MemoryBank(size={self.size}, dim={self.dim}, num_classes={self.num_classes}, k={self.k}, "
            f"temperature={self.temperature}, dtype={self._features.dtype}, device={self._features.device})"
        )

    def query(self, features: Tensor, *, exclude: Tensor | None = None) -> BankQuery:
        """Dimension-wise importance weights of a batch of features (docs/method.md steps 1-4).

        Args:
            features: (B, D) pooled features f (not normalised), on the device the work runs on.
            exclude: (B,) int64 bank row of each query's own sample, never its neighbour; -1 excludes nothing.

        Returns:
            The weights, votes and neighbours, on the device of ``features``.

        Raises:
            BankError: A feature size other than the bank's, or a bad ``exclude``.
        """
        if features.ndim != 2 or features.shape[1] != self.dim:
            raise BankError(
                f"query features of shape {tuple(features.shape)} do not fit a bank of feature size {self.dim}"
            )
        dev = features.device
        f = features.to(torch.float32)
        norm = torch.linalg.vector_norm(f, dim=1, keepdim=True)
        f_hat = torch.where(norm > 0, f / norm, torch.zeros_like(f))
        if exclude is not None:
            exclude = self._check_exclude(exclude, features.shape[0]).to(dev)

        sims, idx, unproven = self._scan(f_hat, exclude, exact=False)
        if bool(unproven.any()):  # the one host sync of a query: rescan the few ambiguous ones exactly
            rows = unproven.nonzero().squeeze(1)
            logger.debug("exact rescan of %d of %d bank queries (near-tied similarities)", rows.numel(), len(f_hat))
            sub_exclude = exclude[rows] if exclude is not None else None
            sims[rows], idx[rows], _ = self._scan(f_hat[rows], sub_exclude, exact=True)

        z = self._features[idx.to(self._features.device)].to(dev, torch.float64)  # (B, k, D)
        if self._labels is None:
            keep = torch.ones_like(idx, dtype=torch.bool)
            predicted = vote_share = None
        else:
            neighbour_labels = self._labels_on(dev)[idx]
            predicted, vote_share = self._vote(sims, neighbour_labels)
            keep = neighbour_labels == predicted[:, None]
        weights = _dimension_weights(f_hat, z, keep)
        return BankQuery(weights, predicted, vote_share, idx, sims.to(torch.float32))

    def _check_exclude(self, exclude: Tensor, batch: int) -> Tensor:
        if exclude.shape != (batch,) or exclude.is_floating_point() or exclude.is_complex():
            raise BankError(f"exclude must be an integer ({batch},) tensor, got {exclude.dtype} {tuple(exclude.shape)}")
        if self.size < self.k + 1:
            raise BankError(f"bank of {self.size} rows is too small for k={self.k} with its own samples excluded")
        bad = (exclude < -1) | (exclude >= self.size)
        if bool(bad.any()):
            raise BankError(f"exclude holds {int(exclude[bad][0])}, outside [-1, {self.size}) for this bank")
        return exclude.to(torch.int64)

    def _scan(self, f_hat: Tensor, exclude: Tensor | None, *, exact: bool) -> tuple[Tensor, Tensor, Tensor]:
        """Top-k exact similarities and bank indices over all chunks, and which queries lack a proof.

        Without ``exact``, a GEMM preselects ``2k`` candidates per chunk; the result is proven when the largest
        similarity it left out, plus the GEMM's error bound, is below the k-th exact similarity.
        """
        dev, batch, k = f_hat.device, f_hat.shape[0], self.k
        sel_dtype = torch.float32 if _ieee_float32_matmul(dev) else torch.float64
        bound = _gemm_error_bound(self.dim, sel_dtype)
        count = 2 * k
        q64 = f_hat.to(torch.float64)
        q_sel = f_hat.to(sel_dtype)
        best = torch.full((batch, k), -math.inf, dtype=torch.float64, device=dev)
        best_idx = torch.full((batch, k), -1, dtype=torch.int64, device=dev)
        left_out = torch.full((batch,), -math.inf, dtype=sel_dtype, device=dev)
        for start in range(0, self.size, self.chunk_size):
            chunk = self._features[start : start + self.chunk_size].to(dev, non_blocking=True)
            n = chunk.shape[0]
            if exact or n <= count:
                step = max(1, _EXACT_TILE_ELEMENTS // max(batch * self.dim, 1))
                for t in range(0, n, step):
                    rows = chunk[t : t + step].to(torch.float64)
                    cand = torch.arange(start + t, start + t + rows.shape[0], device=dev).expand(batch, -1)
                    sims = _exact_similarity(q64, rows.expand(batch, -1, -1))
                    best, best_idx = _merge(best, best_idx, _mask(sims, cand, exclude), cand, k)
                continue
            approx = q_sel @ chunk.to(sel_dtype).T  # (B, n)
            if exclude is not None:
                cols = torch.arange(start, start + n, device=dev)
                approx.masked_fill_(cols[None, :] == exclude[:, None], -math.inf)
            top, local = approx.topk(count + 1, dim=1)
            left_out = torch.maximum(left_out, top[:, count])
            local = local[:, :count].sort(dim=1).values  # index order, so the stable merge ranks ties by index
            sims = _exact_similarity(q64, chunk[local].to(torch.float64))
            cand = local + start
            best, best_idx = _merge(best, best_idx, _mask(sims, cand, exclude), cand, k)
        unproven = left_out.to(torch.float64) + bound >= best[:, -1]
        return best, best_idx, unproven

    def _vote(self, sims: Tensor, neighbour_labels: Tensor) -> tuple[Tensor, Tensor]:
        """Weighted vote: the class with the largest sum of exp(s_i / T); the smallest class id wins ties.

        Scores are shifted by the top similarity (exp((s_i - s_1) / T) <= 1: same argmax and shares, no overflow
        for small T) and summed as fixed-point integers, so equal scores are equal bit for bit in any order.
        """
        scale = 2.0 ** (62 - self.k.bit_length())  # k terms <= 1 each stay below 2^62
        terms = torch.exp((sims - sims[:, :1]) / self.temperature)
        fixed = torch.round(terms * scale).to(torch.int64)
        scores = torch.zeros((sims.shape[0], self.num_classes), dtype=torch.int64, device=sims.device)
        scores.scatter_add_(1, neighbour_labels, fixed)
        best = scores.max(dim=1, keepdim=True).values
        classes = torch.arange(self.num_classes, device=sims.device).expand_as(scores)
        predicted = torch.where(scores == best, classes, self.num_classes).min(dim=1).values
        share = best.squeeze(1).to(torch.float64) / scores.sum(dim=1).to(torch.float64)
        return predicted, share.to(torch.float32)

    def _labels_on(self, device: torch.device) -> Tensor:
        assert self._labels is not None
        if device not in self._label_cache:
            self._label_cache[device] = self._labels.to(device)
        return self._label_cache[device]


def _check_labels(
    labels: Tensor | None, size: int, num_classes: int | None, device: torch.device
) -> tuple[Tensor | None, int | None]:
    if labels is None:
        return None, None
    if labels.shape != (size,) or labels.is_floating_point() or labels.is_complex():
        raise BankError(
            f"labels must be an integer ({size},) tensor for {size} feature rows, got {tuple(labels.shape)}"
        )
    labels = labels.to(device=device, dtype=torch.int64)
    low, high = int(labels.min()), int(labels.max())
    if num_classes is None:
        num_classes = high + 1
    if low < 0 or high >= num_classes:
        raise BankError(f"labels span [{low}, {high}], outside [0, {num_classes}) classes")
    return labels, num_classes


def _exact_similarity(q64: Tensor, rows: Tensor) -> Tensor:
    """(B, c) dot products of (B, D) queries and their (B, c, D) rows, independent of any reduction order.

    Float32 * float32 products are exact in float64; rounded to 2^-60 fixed point they add as int64 exactly.
    """
    fixed = torch.round_(q64[:, None, :] * _SIMILARITY_SCALE * rows).to(torch.int64)
    return fixed.sum(dim=-1).to(torch.float64) / _SIMILARITY_SCALE


def _mask(sims: Tensor, cand: Tensor, exclude: Tensor | None) -> Tensor:
    return sims if exclude is None else sims.masked_fill(cand == exclude[:, None], -math.inf)


def _merge(best: Tensor, best_idx: Tensor, sims: Tensor, idx: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Top-k of the current best and new candidates; ties keep the lower index first.

    ``best`` holds lower indices than the candidates, and candidates come in index order, so a stable sort of
    the concatenation by similarity ranks equal similarities by bank index.
    """
    values = torch.cat([best, sims], dim=1)
    order = values.argsort(dim=1, descending=True, stable=True)[:, :k]
    return values.gather(1, order), torch.cat([best_idx, idx], dim=1).gather(1, order)


def _dimension_weights(f_hat: Tensor, z: Tensor, keep: Tensor) -> Tensor:
    """docs/method.md steps 3-4: m = mean of f_hat * z_i over kept neighbours, w = m / |sum m|, min-max to [0, 1].

    The elementwise mean is computed as f_hat * (mean of the kept z_i), one batched matmul. Dividing by |sum m| is
    a positive rescaling, so it does not change the min-max result; it is skipped only when sum m == 0, where it
    is undefined.
    """
    kept = keep.to(torch.float64)
    mean_z = torch.bmm((kept / kept.sum(dim=1, keepdim=True))[:, None, :], z).squeeze(1)
    m = f_hat.to(torch.float64) * mean_z
    total = m.sum(dim=1, keepdim=True).abs()
    w = torch.where(total > 0, m / total, m)
    low, high = w.min(dim=1, keepdim=True).values, w.max(dim=1, keepdim=True).values
    spread = high - low
    weights = torch.where(spread > 0, (w - low) / torch.where(spread > 0, spread, 1.0), 1.0)
    return weights.to(torch.float32)


def _gemm_error_bound(dim: int, dtype: torch.dtype) -> float:
    """Bound on |GEMM dot product - exact dot product| for unit vectors of size ``dim`` in any summation order.

    gamma_D = D u / (1 - D u) bounds the relative error of a D-term dot product (Higham, Thm 3.5); doubled to
    cover rows whose norm exceeds 1 after float16 rounding and the 2^-60 fixed-point rounding of the exact one.
    """
    unit = 2.0**-24 if dtype == torch.float32 else 2.0**-53
    return 2.0 * dim * unit / (1.0 - dim * unit)


def _ieee_float32_matmul(device: torch.device) -> bool:
    """Whether float32 matmuls on ``device`` round as IEEE float32 (not TF32/bf16 under a global precision flag)."""
    backend = {"cuda": torch.backends.cuda, "cpu": torch.backends.mkldnn}.get(device.type)
    if backend is None:
        return False
    chain = (
        getattr(getattr(backend, "matmul", None), "fp32_precision", "none"),
        getattr(backend, "fp32_precision", "none"),
        getattr(torch.backends, "fp32_precision", "none"),
    )
    return next((p for p in chain if p != "none"), "ieee") == "ieee"
