"""The memory bank's file: a Zarr group that round-trips a bank exactly, and refuses what is not one."""

from __future__ import annotations

import pytest
import torch
import zarr
from builders import assert_same_query as assert_same
from builders import random_bank

from pipeline.engine.bank import MemoryBank
from pipeline.errors import BankError
from pipeline.store.bank import read_bank, write_bank
from pipeline.store.output import as_output


@pytest.mark.parametrize(("dtype", "labelled"), [(torch.float32, True), (torch.float16, False)])
def test_round_trip(tmp_path, dtype, labelled):
    features, labels, queries = random_bank(6)
    labels = labels if labelled else None
    bank = MemoryBank(features, labels, k=7, temperature=0.2, dtype=dtype, num_classes=9 if labelled else None)
    write_bank(bank, as_output(tmp_path / "bank.zarr"))
    group = zarr.open_group(str(tmp_path / "bank.zarr"), mode="r")
    assert group["features"].shape == (300, 24) and ("labels" in group) == labelled
    assert group.attrs["normalised"] is True and group.attrs["k"] == 7

    loaded = read_bank(as_output(tmp_path / "bank.zarr"))
    assert torch.equal(loaded.features, bank.features) and loaded.features.dtype == dtype
    assert (loaded.k, loaded.temperature, loaded.num_classes) == (7, 0.2, bank.num_classes)
    if labelled:
        assert torch.equal(loaded.labels, labels)
    assert_same(loaded.query(queries), bank.query(queries))
    assert read_bank(as_output(tmp_path / "bank.zarr"), k=3, chunk_size=5).query(queries).neighbours.shape == (8, 3)

    with pytest.raises(BankError, match="cannot write memory bank"):
        write_bank(bank, as_output(tmp_path / "bank.zarr"))
    write_bank(bank, as_output(tmp_path / "bank.zarr"), overwrite=True)


def test_missing_or_foreign(tmp_path):
    with pytest.raises(BankError, match=r"nowhere\.zarr"):
        read_bank(as_output(tmp_path / "nowhere.zarr"))
    zarr.open_group(str(tmp_path / "other.zarr"), mode="w")
    with pytest.raises(BankError, match="not a memory bank"):
        read_bank(as_output(tmp_path / "other.zarr"))
