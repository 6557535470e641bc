"""Partitions cover every record once; Dirichlet with small α concentrates labels per client."""

import json

import numpy as np
import pytest

from lowres.data import read_records
from lowres.config import DataConfig
from lowres.federated.partition import dirichlet, holdout, iid, label_of, labels_of, write_partitions

RECORDS = read_records(DataConfig(sample="instructions"))


def _covers(parts, n):
    allidx = np.concatenate(parts)
    return len(allidx) == n and len(set(allidx.tolist())) == n


def test_iid_covers_everything_evenly():
    parts = iid(len(RECORDS), 7, seed=0)
    assert _covers(parts, len(RECORDS))
    assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_dirichlet_small_alpha_is_skewed_large_alpha_is_not():
    labels = labels_of(RECORDS)
    assert {"convert", "what", "how"} <= set(labels)

    def skew(parts):  # mean share of a client's most common label
        return np.mean([max(np.unique(np.asarray(labels)[p], return_counts=True)[1]) / len(p) for p in parts])

    low = dirichlet(labels, 5, alpha=0.1, seed=0)
    high = dirichlet(labels, 5, alpha=100.0, seed=0)
    assert _covers(low, len(RECORDS)) and _covers(high, len(RECORDS))
    assert skew(low) > skew(high) + 0.1
    assert min(map(len, low)) >= 2
    assert all(np.array_equal(a, b) for a, b in zip(low, dirichlet(labels, 5, alpha=0.1, seed=0)))


def test_labels_fields_hash_and_logs():
    assert label_of({"category": "math", "instruction": "x"}) == "math"
    assert label_of({"text": "INFO dfs.DataNode$PacketResponder: x"}) == "dfs.DataNode$PacketResponder:"
    assert label_of({"text": "abc"}, "hash:4") == label_of({"text": "abc"}, "hash:4")
    with pytest.raises(KeyError, match="no field 'topic'"):
        label_of({"text": "a"}, "topic")


def test_holdout_and_files(tmp_path):
    central, rest = holdout(RECORDS, 0.1, seed=0)
    assert len(central) == 18 and len(central) + len(rest) == len(RECORDS)
    paths = write_partitions(rest, iid(len(rest), 3, 0), tmp_path)
    back = [json.loads(line) for p in paths for line in p.read_text().splitlines()]
    assert sorted(map(json.dumps, back)) == sorted(map(json.dumps, rest))
