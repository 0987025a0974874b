"""Class labels of a class-conditional pipeline: ``id2label`` and label lookup by id or name.

``id2label`` (in ``model_index.json``, as in diffusers' DiT checkpoints) maps the class id (a JSON
string key) to a comma-separated list of names, e.g. ``{"1": "goldfish, Carassius auratus"}``; each
name, stripped, selects that id. Ids run over ``0 .. N-1`` for ``N`` classes; id ``N`` is the null
class (unconditional), which is never a label.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping
from typing import Any

from torch import Tensor

__all__ = ["label_ids", "label_names", "parse_id2label"]


def parse_id2label(obj: Any, num_classes: int, where: str = "id2label") -> dict[int, str]:
    """``{int id: names}`` from a JSON object with integer-string keys in ``[0, num_classes)``."""
    if obj is None:
        return {}
    if not isinstance(obj, Mapping):
        raise ValueError(f"{where} must be an object {{class id: names}}, got {type(obj).__name__}")
    out: dict[int, str] = {}
    for key, names in obj.items():
        try:
            i = int(key)
        except (TypeError, ValueError):
            raise ValueError(f"{where}: key {key!r} is not a class id") from None
        if isinstance(key, bool) or not 0 <= i < num_classes:
            raise ValueError(f"{where}: class id {key!r} is out of range for {num_classes} classes")
        if not isinstance(names, str) or not names.strip():
            raise ValueError(f"{where}[{key!r}] must be a non-empty string of names, got {names!r}")
        out[i] = names
    return dict(sorted(out.items()))


def label_names(id2label: Mapping[int, str]) -> dict[str, int]:
    """Every comma-separated name of ``id2label`` -> its class id (a name listed twice keeps its first id)."""
    table: dict[str, int] = {}
    for i, names in id2label.items():
        for name in names.split(","):
            table.setdefault(name.strip(), int(i))
    return table


def label_ids(
    labels: int | str | Tensor | Iterable[int | str], num_classes: int, id2label: Mapping[int, str]
) -> list[int]:
    """Class ids of ``labels``: ints in ``[0, num_classes)`` and/or names of ``id2label``.

    A single int or name gives a one-element list. An id out of range or an unknown name raises a
    one-line ValueError naming it.
    """
    if isinstance(labels, Tensor):
        if labels.is_floating_point() or labels.is_complex() or labels.dim() > 1:
            what = f"{labels.dtype} of shape {tuple(labels.shape)}"
            raise ValueError(f"class_labels must be an int tensor of shape (B,), got {what}")
        labels = labels.reshape(-1).tolist()
    elif isinstance(labels, (int, str)):
        labels = [labels]
    labels = list(labels)
    if not labels:
        raise ValueError("class_labels must name at least one class")
    table = None
    out = []
    for lab in labels:
        if isinstance(lab, str):
            table = label_names(id2label) if table is None else table
            if lab.strip() not in table:
                close = difflib.get_close_matches(lab.strip(), list(table), n=3)
                hint = f" (did you mean {', '.join(map(repr, close))}?)" if close else ""
                known = "no id2label in this pipeline" if not table else f"{len(table)} names in id2label"
                raise ValueError(f"unknown class label {lab!r}{hint}; {known}")
            out.append(table[lab.strip()])
        elif isinstance(lab, int) and not isinstance(lab, bool):
            if not 0 <= lab < num_classes:
                raise ValueError(
                    f"class label {lab} is out of range: this model has {num_classes} classes "
                    f"(ids 0..{num_classes - 1}; {num_classes} is the null class)"
                )
            out.append(int(lab))
        else:
            raise TypeError(f"class labels must be ints or names, got {type(lab).__name__} {lab!r}")
    return out
