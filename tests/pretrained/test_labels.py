"""gmflow.pretrained labels: id2label parsing and label lookup by id or name."""

from __future__ import annotations

import pytest
import torch

from gmflow.pretrained import label_ids, label_names, parse_id2label

ID2LABEL = {"0": "tench, Tinca tinca", "1": "goldfish, Carassius auratus", "2": "jay"}


def test_names_and_ids():
    table = parse_id2label(ID2LABEL, 3)
    assert table == {0: "tench, Tinca tinca", 1: "goldfish, Carassius auratus", 2: "jay"}
    assert label_names(table) == {
        "tench": 0,
        "Tinca tinca": 0,
        "goldfish": 1,
        "Carassius auratus": 1,
        "jay": 2,
    }
    assert label_ids(["jay", "Tinca tinca", 1, " goldfish "], 3, table) == [2, 0, 1, 1]
    assert label_ids("jay", 3, table) == [2] and label_ids(2, 3, {}) == [2]
    assert label_ids(torch.tensor([0, 2]), 3, {}) == [0, 2]
    assert parse_id2label(None, 3) == {}


@pytest.mark.parametrize(
    "labels,pattern",
    [
        (
            [0, 3],
            r"^class label 3 is out of range: this model has 3 classes \(ids 0..2; 3 is the null class\)$",
        ),
        ([-1], r"^class label -1 is out of range"),
        (["jya"], r"^unknown class label 'jya' \(did you mean 'jay'\?\); 5 names in id2label$"),
        ([], r"^class_labels must name at least one class$"),
        (
            torch.tensor([0.5]),
            r"^class_labels must be an int tensor of shape \(B,\), got torch.float32 of shape \(1,\)$",
        ),
    ],
)
def test_bad_labels(labels, pattern):
    with pytest.raises(ValueError, match=pattern):
        label_ids(labels, 3, parse_id2label(ID2LABEL, 3))
    with pytest.raises(ValueError, match="unknown class label 'jay'; no id2label in this pipeline"):
        label_ids("jay", 3, {})
    with pytest.raises(TypeError, match="class labels must be ints or names, got float 1.0"):
        label_ids([1.0], 3, {})


def test_bad_id2label():
    with pytest.raises(ValueError, match=r"^id2label: class id '3' is out of range for 3 classes$"):
        parse_id2label({"3": "x"}, 3)
    with pytest.raises(ValueError, match=r"^id2label: key 'a' is not a class id$"):
        parse_id2label({"a": "x"}, 3)
    with pytest.raises(ValueError, match=r"^id2label\['0'\] must be a non-empty string of names, got 5$"):
        parse_id2label({"0": 5}, 3)
    with pytest.raises(ValueError, match="id2label must be an object"):
        parse_id2label(["jay"], 3)
