"""HS3 clusters file: which cluster every class belongs to, per exit, and how it was made.

Phase 1 of HS3 (``segdistill.hs3``, ``tools/hs3_analyze.py``) writes it; Phase 2 (the ``hs3``
exit mode, :mod:`.hs3`) and the evaluator read it (``MODEL.EXITS.HS3.CLUSTERS_FILE``). The file is JSON, readable and
editable by hand (docs/hs3.md)::

    {"format": "segdistill-hs3-clusters", "version": 1,
     "class_names": [...], "num_classes": N,
     "method": "spectral", "theta": null, "seed": 0, "created": "...", "sources": {...},
     "exits": {"res3": {"num_clusters": K, "assignment": [cluster of class 0, ...],
                        "clusters": [[class names of cluster 0], ...],
                        "cluster_names": ["sky", "building+road", ...]}, ...}}

``assignment`` is the source of truth; an exit may instead give only ``clusters`` (lists
of class names, e.g. a manual grouping written by a person) and the assignment is
derived from it. Every mistake is an error naming the file, the exit and the values.
"""
from __future__ import annotations

import datetime
import json
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np

__all__ = [
    "ClustersFileError", "ExitClusters", "HS3Clusters", "load_clusters", "save_clusters",
    "assignment_from_groups", "cluster_names_of", "groups_of", "ground_truth_lut", "map_labels",
    "canonical_assignment", "clusters_from_dict", "synthetic_clusters", "file_sha256", "clusters_fingerprint", "dumps_readable", "FORMAT", "VERSION",
]

FORMAT = "segdistill-hs3-clusters"
VERSION = 1
# Cluster names are used as metric names (IoU-<name>); long clusters are abbreviated.
_MAX_NAMES_IN_CLUSTER_NAME = 3


class ClustersFileError(ValueError):
    """A clusters file (or clusters object) that cannot be used as it is."""


def canonical_assignment(assignment: Sequence[int]) -> np.ndarray:
    """Renumber clusters by their first class (cluster 0 holds class 0): one labelling per
    partition, so results are comparable and files stable across runs."""
    a = np.asarray(assignment, dtype=np.int64)
    order: Dict[int, int] = {}
    for v in a.tolist():
        order.setdefault(v, len(order))
    return np.array([order[v] for v in a.tolist()], dtype=np.int64)


def groups_of(assignment: Sequence[int], class_names: Sequence[str]) -> List[List[str]]:
    """Class names per cluster, clusters in index order."""
    a = np.asarray(assignment)
    k = int(a.max()) + 1 if len(a) else 0
    return [[class_names[c] for c in np.flatnonzero(a == i)] for i in range(k)]


def cluster_names_of(groups: Sequence[Sequence[str]]) -> List[str]:
    """A readable, unique name per cluster: its class names joined by '+', abbreviated
    after three names ("a+b+c+4 more")."""
    names = []
    for g in groups:
        shown = "+".join(g[:_MAX_NAMES_IN_CLUSTER_NAME])
        if len(g) > _MAX_NAMES_IN_CLUSTER_NAME:
            shown += f"+{len(g) - _MAX_NAMES_IN_CLUSTER_NAME} more"
        names.append(shown)
    return names


def assignment_from_groups(groups: Sequence[Sequence[str]], class_names: Sequence[str], where: str = "") -> np.ndarray:
    """Cluster index per class from lists of class names; every class in exactly one list."""
    where = f"{where}: " if where else ""
    index = {n: i for i, n in enumerate(class_names)}
    a = np.full(len(class_names), -1, dtype=np.int64)
    for k, g in enumerate(groups):
        if len(g) == 0:
            raise ClustersFileError(f"{where}cluster {k} is empty.")
        for n in g:
            if n not in index:
                raise ClustersFileError(f"{where}cluster {k} names {n!r}, which is not a class (classes: {list(class_names)}).")
            if a[index[n]] >= 0:
                raise ClustersFileError(f"{where}class {n!r} is in clusters {a[index[n]]} and {k}; a class belongs to one cluster.")
            a[index[n]] = k
    missing = [class_names[i] for i in np.flatnonzero(a < 0)]
    if missing:
        raise ClustersFileError(f"{where}classes {missing} are in no cluster; every class must belong to one.")
    return a


@dataclass
class ExitClusters:
    """The clustered label space of one exit: ``assignment[c]`` = cluster of class ``c``."""

    assignment: np.ndarray
    num_clusters: int
    extra: Dict[str, Any] = field(default_factory=dict)  # e.g. analysis mIoU, source file

    def lut(self, ignore_value: int = 255) -> np.ndarray:
        return ground_truth_lut(self.assignment, ignore_value)


@dataclass
class HS3Clusters:
    """Every exit's clusters plus how they were made (method, theta, seed, sources, date)."""

    class_names: List[str]
    exits: Dict[str, ExitClusters]
    method: str = "spectral"
    theta: Optional[float] = None
    seed: int = 0
    sources: Dict[str, str] = field(default_factory=dict)
    created: str = ""
    info: Dict[str, Any] = field(default_factory=dict)  # reference point, K grid, normalisation...

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def exit_names(self) -> List[str]:
        return list(self.exits)

    def num_clusters(self, exit_name: str) -> int:
        return self[exit_name].num_clusters

    def groups(self, exit_name: str) -> List[List[str]]:
        return groups_of(self[exit_name].assignment, self.class_names)

    def cluster_names(self, exit_name: str) -> List[str]:
        return cluster_names_of(self.groups(exit_name))

    def lut(self, exit_name: str, ignore_value: int = 255) -> np.ndarray:
        return self[exit_name].lut(ignore_value)

    def __getitem__(self, exit_name: str) -> ExitClusters:
        if exit_name not in self.exits:
            raise KeyError(f"HS3 clusters have no exit {exit_name!r} (exits: {self.exit_names}).")
        return self.exits[exit_name]

    def to_dict(self) -> Dict[str, Any]:
        exits = {}
        for name, e in self.exits.items():
            groups = groups_of(e.assignment, self.class_names)
            exits[name] = {
                "num_clusters": int(e.num_clusters),
                "assignment": [int(v) for v in e.assignment],
                "clusters": groups,
                "cluster_names": cluster_names_of(groups),
                **e.extra,
            }
        return {
            "format": FORMAT,
            "version": VERSION,
            "num_classes": self.num_classes,
            "class_names": list(self.class_names),
            "method": self.method,
            "theta": self.theta,
            "seed": int(self.seed),
            "created": self.created or _now(),
            "sources": dict(self.sources),
            **({"info": self.info} if self.info else {}),
            "exits": exits,
        }


def _now() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def _validate_exit(name: str, entry: Dict[str, Any], class_names: Sequence[str], where: str) -> ExitClusters:
    n = len(class_names)
    here = f"{where}, exit {name!r}"
    if not isinstance(entry, dict):
        raise ClustersFileError(f"{here}: expected an object with 'assignment' or 'clusters', got {type(entry).__name__}.")
    if "assignment" not in entry and "clusters" not in entry:
        raise ClustersFileError(f"{here}: needs 'assignment' (cluster per class) or 'clusters' (class names per cluster).")
    from_groups = None
    if "clusters" in entry:
        from_groups = assignment_from_groups(entry["clusters"], class_names, here)
    k_file = entry.get("num_clusters")
    if "assignment" in entry:
        raw = entry["assignment"]
        if not isinstance(raw, list) or len(raw) != n:
            got = len(raw) if isinstance(raw, list) else type(raw).__name__
            raise ClustersFileError(f"{here}: 'assignment' has {got} entries but there are {n} classes.")
        missing = [class_names[i] for i, v in enumerate(raw) if v is None or (isinstance(v, (int, float)) and v < 0)]
        if missing:
            raise ClustersFileError(f"{here}: classes {missing} are in no cluster (assignment null or negative).")
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in raw):
            bad = [v for v in raw if not (isinstance(v, int) and not isinstance(v, bool))]
            raise ClustersFileError(f"{here}: cluster indices must be integers, got {bad[:5]}.")
        a = np.asarray(raw, dtype=np.int64)
        k = int(k_file) if k_file is not None else int(a.max()) + 1
        out = sorted({int(v) for v in a if v >= k})
        if out:
            bad_classes = [class_names[i] for i in np.flatnonzero(a >= k)]
            raise ClustersFileError(
                f"{here}: cluster indices {out} (classes {bad_classes}) are out of range [0, {k}) for num_clusters={k}."
            )
        if from_groups is not None and not np.array_equal(from_groups, a):
            diff = [class_names[i] for i in np.flatnonzero(from_groups != a)]
            raise ClustersFileError(f"{here}: 'assignment' and 'clusters' disagree on classes {diff}; keep one of them.")
    else:
        a = from_groups
        k = int(k_file) if k_file is not None else int(a.max()) + 1
        if k != int(a.max()) + 1:
            raise ClustersFileError(f"{here}: num_clusters={k} but 'clusters' lists {int(a.max()) + 1} clusters.")
    if k < 1 or k > n:
        raise ClustersFileError(f"{here}: num_clusters={k} must be in [1, {n}] (the number of classes).")
    empty = sorted(set(range(k)) - {int(v) for v in a})
    if empty:
        raise ClustersFileError(f"{here}: clusters {empty} of {k} are empty (no class is assigned to them).")
    known = ("num_clusters", "assignment", "clusters", "cluster_names")
    return ExitClusters(assignment=a, num_clusters=k, extra={kk: v for kk, v in entry.items() if kk not in known})


def clusters_from_dict(data: Dict[str, Any], class_names: Union[Sequence[str], int, None] = None,
                       exit_names: Optional[Sequence[str]] = None, where: str = "HS3 clusters") -> HS3Clusters:
    """Validate a parsed clusters file (see :func:`load_clusters`)."""
    if not isinstance(data, dict):
        raise ClustersFileError(f"{where}: expected a JSON object, got {type(data).__name__}.")
    if data.get("format", FORMAT) != FORMAT:
        raise ClustersFileError(f"{where}: format {data.get('format')!r} is not {FORMAT!r}.")
    if int(data.get("version", VERSION)) > VERSION:
        raise ClustersFileError(f"{where}: version {data.get('version')} is newer than this code reads ({VERSION}).")
    names = data.get("class_names")
    if not isinstance(names, list) or not names:
        raise ClustersFileError(f"{where}: needs 'class_names', the list of the dataset's classes.")
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise ClustersFileError(f"{where}: class names {dup} appear twice.")
    if "num_classes" in data and int(data["num_classes"]) != len(names):
        raise ClustersFileError(f"{where}: num_classes={data['num_classes']} but {len(names)} class names.")
    if class_names is not None:
        expected = class_names if isinstance(class_names, int) else len(class_names)
        if expected != len(names):
            raise ClustersFileError(
                f"{where}: made for {len(names)} classes but the model/dataset has {expected} "
                "(clusters of another dataset, or a wrong NUM_CLASSES?)."
            )
        if not isinstance(class_names, int):
            diff = [(i, a, b) for i, (a, b) in enumerate(zip(names, class_names)) if a != b]
            if diff:
                shown = ", ".join(f"#{i}: {a!r} in the file vs {b!r}" for i, a, b in diff[:5])
                raise ClustersFileError(f"{where}: class names differ from the dataset's ({shown}).")
    exits_raw = data.get("exits")
    if not isinstance(exits_raw, dict) or not exits_raw:
        raise ClustersFileError(f"{where}: needs 'exits', an object with one entry per exit.")
    if exit_names is not None:
        missing = [e for e in exit_names if e not in exits_raw]
        extra = [e for e in exits_raw if e not in exit_names]
        if missing or extra:
            raise ClustersFileError(
                f"{where}: exit names do not match the model's: the model has {list(exit_names)}, the file "
                f"{list(exits_raw)} (missing in the file: {missing}; not in the model: {extra})."
            )
    exits = {name: _validate_exit(name, entry, names, where) for name, entry in exits_raw.items()}
    if exit_names is not None:
        exits = {e: exits[e] for e in exit_names}
    return HS3Clusters(
        class_names=list(names),
        exits=exits,
        method=str(data.get("method", "")),
        theta=data.get("theta"),
        seed=int(data.get("seed", 0) or 0),
        sources=dict(data.get("sources") or {}),
        created=str(data.get("created", "")),
        info=dict(data.get("info") or {}),
    )


def load_clusters(path: str, class_names: Union[Sequence[str], int, None] = None,
                  exit_names: Optional[Sequence[str]] = None) -> HS3Clusters:
    """Read and validate a clusters file.

    ``class_names`` (names or a count) and ``exit_names`` are the model's; when given they
    must match the file. Errors (ClustersFileError) name the file, the exit and the values.
    """
    where = f"HS3 clusters file {path!r}"
    if not path:
        raise ClustersFileError("No HS3 clusters file given (MODEL.EXITS.HS3.CLUSTERS_FILE is empty); "
                                "make one with tools/hs3_analyze.py (docs/hs3.md).")
    if not os.path.isfile(path):
        raise ClustersFileError(f"{where} does not exist; make it with tools/hs3_analyze.py (docs/hs3.md).")
    with open(path) as f:
        try:
            data = json.load(f)
        except ValueError as e:
            raise ClustersFileError(f"{where} is not valid JSON: {e}") from None
    return clusters_from_dict(data, class_names, exit_names, where)


def dumps_readable(obj, indent: int = 1, _level: int = 0) -> str:
    """JSON with objects and nested lists indented but lists of scalars on one line (an
    assignment of 171 classes stays one line; clusters one line each)."""
    pad, inner = " " * indent * _level, " " * indent * (_level + 1)
    if isinstance(obj, dict):
        if not obj:
            return "{}"
        items = [f"{inner}{json.dumps(str(k))}: {dumps_readable(v, indent, _level + 1)}" for k, v in obj.items()]
        return "{\n" + ",\n".join(items) + "\n" + pad + "}"
    if isinstance(obj, (list, tuple)):
        if all(not isinstance(v, (dict, list, tuple)) for v in obj):
            return json.dumps(list(obj))
        return "[\n" + ",\n".join(inner + dumps_readable(v, indent, _level + 1) for v in obj) + "\n" + pad + "]"
    return json.dumps(obj)


def save_clusters(path: str, clusters: HS3Clusters) -> str:
    """Validate and write ``clusters`` as JSON (atomically: a killed run leaves no half file)."""
    data = clusters.to_dict()
    clusters_from_dict(json.loads(json.dumps(data)), where=f"HS3 clusters to write to {path!r}")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(dumps_readable(data) + "\n")
    os.replace(tmp, path)
    return path


def synthetic_clusters(num_classes: int, exit_names: Sequence[str]) -> HS3Clusters:
    """Valid clusters without an analysis, for benchmarks and cost counts: exit i of E (shallowest
    first) gets K_i = N / 2^(E - i) clusters (at least 2), class c in cluster c mod K_i."""
    names = [f"c{i}" for i in range(num_classes)]
    exits = {}
    for i, e in enumerate(exit_names):
        k = max(2, num_classes // 2 ** (len(exit_names) - i))
        exits[e] = {"assignment": [c % k for c in range(num_classes)]}
    return clusters_from_dict({"class_names": names, "exits": exits}, where="synthetic HS3 clusters")


def file_sha256(path: str, algorithm: str = "sha256") -> str:
    """Hex digest of a file's bytes (what a run was built from: the HS3 pipeline and the
    analysis record it)."""
    import hashlib

    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def clusters_fingerprint(clusters: HS3Clusters) -> str:
    """SHA-256 of what a model trains on: the class names and every exit's assignment (not the
    file's date or analysis notes, so a clusters file rewritten with the same clusters keeps it)."""
    import hashlib

    content = {"class_names": list(clusters.class_names),
               "exits": {e: [int(v) for v in c.assignment] for e, c in clusters.exits.items()}}
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


def ground_truth_lut(assignment: Sequence[int], ignore_value: int = 255, size: Optional[int] = None) -> np.ndarray:
    """Lookup table label -> cluster: ``lut[c] = assignment[c]``, ``lut[ignore] = ignore``.

    Size 256 (or enough for the classes and the ignore value); values that are neither a
    class nor the ignore value also map to the ignore value (labels are checked for them
    where they are read). int64, so it indexes numpy arrays and torch tensors alike.
    """
    a = np.asarray(assignment, dtype=np.int64)
    if a.ndim != 1 or (a.size and a.min() < 0):
        raise ValueError(f"assignment must be a 1-D array of cluster indices >= 0, got {a!r}")
    if ignore_value is not None and 0 <= ignore_value < len(a):
        raise ValueError(f"ignore value {ignore_value} is also a class index (there are {len(a)} classes).")
    n = max(256, len(a), (ignore_value + 1) if ignore_value is not None and ignore_value >= 0 else 0)
    n = max(n, size or 0)
    fill = ignore_value if ignore_value is not None else -1
    lut = np.full(n, fill, dtype=np.int64)
    lut[: len(a)] = a
    return lut


def map_labels(labels, lut, ignore_value: int = 255):
    """Map labels through a class -> cluster table: the one mapping of the package (the HS3
    objective's targets, the evaluator's ground truth of every ``sem_seg_<exit>``).

    ``labels``: a numpy array or a torch tensor (any shape, any device); ``lut``: a numpy
    array or a tensor (:func:`ground_truth_lut`). ``lut[label]`` for labels inside the
    table; the ignore value stays ignore, and every other value (negative, or beyond the
    table) becomes the ignore value. Returns int64 of the labels' kind (and device).
    """
    if isinstance(labels, np.ndarray):
        table = np.asarray(lut, dtype=np.int64)
        lab = labels.astype(np.int64, copy=False)
        inside = (lab >= 0) & (lab < table.size) & (lab != ignore_value)
        return np.where(inside, table[np.clip(lab, 0, table.size - 1)], np.int64(ignore_value))
    import torch

    table = torch.as_tensor(lut, dtype=torch.long).to(labels.device)
    lab = labels.long()
    inside = (lab >= 0) & (lab < table.numel()) & (lab != ignore_value)
    out = table[lab.clamp(0, table.numel() - 1)]
    return torch.where(inside, out, torch.full_like(out, ignore_value))
