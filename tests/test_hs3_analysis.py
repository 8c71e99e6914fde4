"""HS3 without the model: clusters file, ground-truth LUT, split, clustering, merged mIoU,
the K choice, the label-space provider and tools/hs3_analyze.py (docs/hs3.md)."""
from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import REPO
from segdistill.evaluation import build_label_spaces, confusion_matrix, metrics_from_confusion
from segdistill.hs3 import (
    ClustersFileError, TradeoffCurve, choose_k, clustered_miou, constant_ratio_ks, ground_truth_lut, kmeans_clusters,
    load_clusters, map_labels, merge_confusion, reference_theta, save_clusters, spectral_clusters, split_records,
)
from segdistill.hs3.splits import register_hs3_split, maybe_register_hs3_split
from segdistill.hs3.report import run_hs3_analysis
from segdistill.hs3.choose import clusters_from_assignments, theta_line
from segdistill.modeling.exits.hs3_clusters import canonical_assignment

DEMO = ["sky", "building", "road", "sidewalk", "vegetation", "car", "person", "pole", "wire", "sign"]
COARSE = [["sky"], ["building", "vegetation"], ["road", "sidewalk"], ["car", "person", "pole", "wire", "sign"]]


def partition(assignment):
    """The partition as a set of frozensets: comparison up to label permutation."""
    a = np.asarray(assignment)
    return {frozenset(np.flatnonzero(a == v).tolist()) for v in np.unique(a)}


def block_confusion(groups, n, seed, within=(50, 100), noise=2.0, diag=1000.0):
    rng = np.random.default_rng(seed)
    c = rng.uniform(0, noise, (n, n))
    for g in groups:
        for i in g:
            for j in g:
                c[i, j] += rng.uniform(*within)
    np.fill_diagonal(c, diag * rng.uniform(0.2, 5, n))  # very unequal class sizes
    return c


# ----------------------------------------------------------------------------- clustering


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_spectral_clustering_recovers_blocks(seed):
    n = 12
    perm = np.random.default_rng(seed + 10).permutation(n)  # groups are not contiguous index ranges
    groups = [perm[:4], perm[4:6], perm[6:11], perm[11:]]
    conf = block_confusion(groups, n, seed)
    a = spectral_clusters(conf, 4, seed=0)
    assert partition(a) == {frozenset(g.tolist()) for g in groups}
    assert a[0] == 0 and sorted(set(a.tolist())) == [0, 1, 2, 3]  # canonical numbering
    assert np.array_equal(spectral_clusters(conf, 4, seed=0), a)  # deterministic
    assert np.array_equal(spectral_clusters(conf, n, seed=0), np.arange(n))


def test_kmeans_on_class_features_recovers_groups():
    rng = np.random.default_rng(0)
    truth = np.array([0, 1, 1, 2, 0, 2, 1, 0])
    centres = rng.normal(0, 10, (3, 16))
    feats = centres[truth] + rng.normal(0, 0.1, (8, 16))
    assert partition(kmeans_clusters(feats, 3, seed=0)) == partition(truth)
    feats[2, 0] = np.nan
    with pytest.raises(ValueError, match=r"classes \[2\] are not finite"):
        kmeans_clusters(feats, 3)


@pytest.mark.parametrize("seed", range(4))
def test_merged_confusion_miou_equals_bruteforce_relabelling(seed):
    rng = np.random.default_rng(seed)
    n, k, ignore = 7, 3, 255
    assignment = canonical_assignment(np.r_[np.arange(k), rng.integers(0, k, n - k)][rng.permutation(n)])
    gt = rng.integers(0, n, (40, 50))
    gt[gt == 5] = 4  # class 5 absent from the ground truth (only predicted)
    gt[rng.random(gt.shape) < 0.1] = ignore
    pred = np.where(rng.random(gt.shape) < 0.5, np.where(gt == ignore, 0, gt), rng.integers(0, n, gt.shape))
    conf = confusion_matrix(gt, pred, n, ignore)
    # brute force: relabel every pixel through the assignment, count again, score
    lut = ground_truth_lut(assignment, ignore)
    gt_c, pred_c = lut[gt], assignment[pred]
    assert (gt_c[gt == ignore] == ignore).all()
    conf_c = confusion_matrix(gt_c, pred_c, k, ignore)
    expected = metrics_from_confusion(conf_c, [f"c{i}" for i in range(k)])["mIoU"]
    assert np.array_equal(merge_confusion(conf, assignment, k), conf_c)
    assert clustered_miou(conf, assignment, k) == pytest.approx(expected, abs=1e-9)
    assert clustered_miou(conf, np.arange(n)) == pytest.approx(metrics_from_confusion(conf, [str(i) for i in range(n)])["mIoU"])



@pytest.mark.parametrize("dtype", [np.int64, np.uint64, np.float64])
def test_merged_confusion_is_exact_at_large_counts(dtype):
    """merge_confusion sums integer counts in float64 (BLAS) only where that is exact: the
    result equals the loop sum in Python integers, in the confusion's own dtype."""
    rng = np.random.default_rng(3)
    n, k = 30, 7
    conf = rng.integers(0, 2**40, (n, n)).astype(dtype)  # ~2**50 in all: float64-exact sums
    assignment = np.r_[np.arange(k), rng.integers(0, k, n - k)]
    want = [[0] * k for _ in range(k)]
    for g in range(n):
        for p in range(n):
            want[assignment[g]][assignment[p]] += int(conf[g, p])
    got = merge_confusion(conf, assignment, k)
    assert got.dtype == conf.dtype and got.shape == (k, k)
    assert [[int(v) for v in row] for row in got] == want
    if dtype is np.int64:  # beyond 2**53 in all: the integer path, still exact
        big = conf.copy()
        big[0, 0] = 2**60
        want[assignment[0]][assignment[0]] += 2**60 - int(conf[0, 0])
        assert [[int(v) for v in row] for row in merge_confusion(big, assignment, k)] == want

# ----------------------------------------------------------------------------- the K choice


def curve(mious, stage="exit"):
    ks = list(range(2, 2 + len(mious)))
    return TradeoffCurve(stage, ks, list(mious), [[0] * 10 for _ in ks])


def test_choose_k_on_constructed_curves():
    n, final = 10, 50.0  # reference ratio: 5 mIoU per class
    c = curve([90, 80, 70, 60, 40, 35, 25, 20, 15])  # K = 2..10; K=7 lies exactly on the line (35/7 = 5)
    assert choose_k(c, n, final) == 7  # largest K with mIoU/K >= 5 (on the line counts)
    assert choose_k(c, n, final, theta=reference_theta(final)) == 7  # the same line, written as an angle
    assert reference_theta(final) == pytest.approx(math.degrees(math.atan(2.0)))
    assert choose_k(c, n, final, theta=0) == n  # deep supervision: the full class set
    assert choose_k(c, n, final, theta=90) == 5  # exits must reach the final mIoU: 60 >= 50 > 40
    # theta = 30: line y = 0.5 - (1 - K/10) cot(30 deg): K=8 -> 0.154 <= 0.25, K=9 -> 0.327 > 0.20
    assert choose_k(c, n, final, theta=30) == 8
    thetas = [0, 10, 30, 50, reference_theta(final), 70, 80, 90]
    ks = [choose_k(c, n, final, theta=t) for t in thetas]
    assert ks == sorted(ks, reverse=True) and ks[-1] == min(ks)  # theta = 90 gives the smallest K
    weak = curve([45, 40, 30, 20, 15, 10, 8, 6, 5])  # never reaches the final mIoU
    assert choose_k(weak, n, final, theta=90) == 2
    with pytest.raises(ValueError, match="theta"):
        choose_k(c, n, final, theta=120)


def test_theta_line_geometry():
    (x0, y0), (x1, y1) = theta_line(10, 50.0, None)  # the paper's line: origin to the reference point
    assert np.allclose([x0, y0, x1, y1], [0, 0, 10, 50])
    assert np.allclose(theta_line(10, 50.0, 0), [(10, 0), (10, 100)])  # vertical through R
    assert np.allclose(theta_line(10, 50.0, 90), [(0, 50), (10, 50)])  # horizontal through R


def test_constant_ratio_ks():
    assert constant_ratio_ks(["res3", "res4"], 10) == {"res3": 3, "res4": 5}
    assert constant_ratio_ks(["stage2", "stage3"], 19) == {"stage2": 5, "stage3": 10}
    assert constant_ratio_ks(["a", "b", "c"], 4) == {"a": 2, "b": 2, "c": 2}


# ----------------------------------------------------------------------------- LUT


def test_ground_truth_lut_numpy_and_torch():
    assignment = [1, 0, 1, 2]
    lut = ground_truth_lut(assignment, ignore_value=255)
    assert lut.shape == (256,) and lut[255] == 255 and list(lut[:4]) == assignment
    labels = np.array([[0, 1, 2, 3], [255, 3, 255, 0]])
    expected = np.array([[1, 0, 1, 2], [255, 2, 255, 1]])
    assert np.array_equal(lut[labels], expected)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for dev in devices:
        out = map_labels(torch.as_tensor(labels, device=dev), lut, 255)
        assert out.device.type == dev and out.dtype == torch.long
        assert np.array_equal(out.cpu().numpy(), expected)
    with pytest.raises(ValueError, match="ignore value 2 is also a class"):
        ground_truth_lut(assignment, ignore_value=2)


# ----------------------------------------------------------------------------- clusters file


def good_file(tmp_path):
    cl = clusters_from_assignments(
        DEMO, {"res3": [0, 1, 2, 2, 1, 3, 3, 3, 3, 3], "res4": [0, 1, 2, 3, 4, 5, 6, 7, 7, 5]},
        method="spectral", theta=None, seed=0, sources={"final": "x.npy"})
    path = str(tmp_path / "clusters.json")
    save_clusters(path, cl)
    with open(path) as f:
        return path, json.load(f)


def write_variant(tmp_path, data, name="bad.json"):
    path = str(tmp_path / name)
    with open(path, "w") as f:
        json.dump(data, f)
    return path


def test_clusters_file_roundtrip(tmp_path):
    path, data = good_file(tmp_path)
    cl = load_clusters(path, DEMO, ["res3", "res4"])
    assert cl.num_clusters("res3") == 4 and cl.num_clusters("res4") == 8
    assert data["exits"]["res3"]["clusters"] == COARSE[:1] + [["building", "vegetation"], ["road", "sidewalk"], COARSE[3]]
    assert cl.cluster_names("res3")[3] == "car+person+pole+2 more"
    assert list(cl.lut("res3")[:10]) == [0, 1, 2, 2, 1, 3, 3, 3, 3, 3]
    assert data["method"] == "spectral" and data["created"] and data["class_names"] == DEMO
    # a person's file: only class names per cluster
    d = {"class_names": DEMO, "exits": {"res3": {"clusters": COARSE}}}
    assert cl.exits["res3"].assignment.tolist() == load_clusters(write_variant(tmp_path, d), 10).exits["res3"].assignment.tolist()


def test_bad_clusters_files(tmp_path):
    path, data = good_file(tmp_path)

    def err(d, match, class_names=DEMO, exit_names=("res3", "res4")):
        p = write_variant(tmp_path, d)
        with pytest.raises(ClustersFileError, match=match) as e:
            load_clusters(p, class_names, exit_names)
        assert p in str(e.value)  # every error names the file
        return str(e.value)

    err(data, r"made for 10 classes but the model/dataset has 11", class_names=DEMO + ["x"])
    err(data, r"made for 10 classes but the model/dataset has 9", class_names=9)
    err(data, r"class names differ .*'sky' in the file vs 'SKY'", class_names=["SKY"] + DEMO[1:])
    msg = err(data, r"exit names do not match", exit_names=("res3", "res5"))
    assert "missing in the file: ['res5']" in msg and "not in the model: ['res4']" in msg

    d = copy.deepcopy(data)
    del d["exits"]["res3"]["clusters"]
    d["exits"]["res3"]["assignment"][7] = 4  # num_clusters stays 4
    assert "exit 'res3'" in err(d, r"cluster indices \[4\] \(classes \['pole'\]\) are out of range \[0, 4\)")

    d = copy.deepcopy(data)
    del d["exits"]["res3"]["clusters"]
    d["exits"]["res3"]["assignment"][8] = None
    err(d, r"exit 'res3'.*classes \['wire'\] are in no cluster")

    d = copy.deepcopy(data)
    d["exits"]["res3"] = {"clusters": [["sky"], ["building", "vegetation"], ["road", "sidewalk"], ["car", "person", "pole", "sign"]]}
    err(d, r"exit 'res3'.*classes \['wire'\] are in no cluster")

    d = copy.deepcopy(data)
    d["exits"]["res3"] = {"clusters": COARSE + [[]]}
    err(d, r"exit 'res3'.*cluster 4 is empty")

    d = copy.deepcopy(data)
    del d["exits"]["res4"]["clusters"]
    d["exits"]["res4"]["num_clusters"] = 9  # cluster 8 has no class
    err(d, r"exit 'res4'.*clusters \[8\] of 9 are empty")

    d = copy.deepcopy(data)
    del d["exits"]["res4"]["clusters"]
    d["exits"]["res4"]["num_clusters"] = 11
    err(d, r"num_clusters=11 must be in \[1, 10\]")

    d = copy.deepcopy(data)
    d["exits"]["res3"]["assignment"][0] = 1  # disagrees with the 'clusters' lists
    err(d, r"'assignment' and 'clusters' disagree on classes \['sky'\]")

    with pytest.raises(ClustersFileError, match="does not exist"):
        load_clusters(str(tmp_path / "none.json"))


# ----------------------------------------------------------------------------- split


def records(n):
    return [{"file_name": f"/data/img_{i:04d}.png", "sem_seg_file_name": f"/data/lab_{i:04d}.png"} for i in range(n)]


def test_split_deterministic_disjoint_covering():
    recs = records(100)
    red, ana = split_records(recs, 0.1, seed=0)
    names = lambda rs: [r["file_name"] for r in rs]  # noqa: E731
    assert len(ana) == 10 and len(red) == 90
    assert set(names(red)).isdisjoint(names(ana)) and set(names(red)) | set(names(ana)) == set(names(recs))
    shuffled = [recs[i] for i in np.random.default_rng(5).permutation(100)]
    red2, ana2 = split_records(shuffled, 0.1, seed=0)
    assert set(names(ana2)) == set(names(ana))  # independent of the input order
    assert set(names(split_records(recs, 0.1, seed=1)[1])) != set(names(ana))
    assert len(split_records(records(37), 0.25)[1]) == 9  # round(9.25)
    assert names(red) == sorted(names(red))  # input order kept
    red3, ana3 = split_records(recs, analysis_files=["img_0003.png", "/data/img_0050.png"])
    assert names(ana3) == ["/data/img_0003.png", "/data/img_0050.png"] and len(red3) == 98
    with pytest.raises(ValueError, match="not in the dataset: \\['nope.png'\\]"):
        split_records(recs, analysis_files=["nope.png"])
    with pytest.raises(ValueError, match="analysis_fraction"):
        split_records(recs, 1.0)


def test_register_split_in_catalog():
    from detectron2.data import DatasetCatalog, MetadataCatalog

    name = "hs3_test_split_parent"
    DatasetCatalog.register(name, lambda: records(30))
    MetadataCatalog.get(name).set(stuff_classes=DEMO, ignore_label=255, evaluator_type="sem_seg")
    try:
        red_name, ana_name = register_hs3_split(name, 0.2, seed=3)
        assert (red_name, ana_name) == (name + "_hs3_reduced", name + "_hs3_analysis")
        red, ana = DatasetCatalog.get(red_name), DatasetCatalog.get(ana_name)
        assert len(ana) == 6 and len(red) == 24
        assert [r["file_name"] for r in ana] == [r["file_name"] for r in split_records(records(30), 0.2, 3)[1]]
        assert MetadataCatalog.get(ana_name).stuff_classes == DEMO and MetadataCatalog.get(red_name).evaluator_type == "sem_seg"
        assert register_hs3_split(name, 0.2, seed=3) == (red_name, ana_name)  # idempotent
        assert maybe_register_hs3_split(ana_name) and not maybe_register_hs3_split("unknown_hs3_analysis")
    finally:
        for n in (name, name + "_hs3_reduced", name + "_hs3_analysis"):
            if n in DatasetCatalog.list():
                DatasetCatalog.remove(n)
                MetadataCatalog.remove(n)


# ----------------------------------------------------------------------------- provider


def test_label_space_provider(tmp_path):
    from detectron2.config import CfgNode as CN
    from detectron2.data import MetadataCatalog

    from conftest import tiny_cfg

    path, _ = good_file(tmp_path)
    name = "hs3_test_provider_ds"
    MetadataCatalog.get(name).set(stuff_classes=DEMO, ignore_label=255)
    cfg = tiny_cfg()
    try:
        assert build_label_spaces(cfg, name) == {}  # no MODEL.EXITS: not HS3
        cfg.defrost()
        if "EXITS" not in cfg.MODEL:  # the keys come with the multi-exit segmentor
            cfg.MODEL.EXITS = CN({"MODE": "ds", "IN_FEATURES": ["res3", "res4"]})
        if "HS3" not in cfg.MODEL.EXITS:
            cfg.MODEL.EXITS.HS3 = CN({"CLUSTERS_FILE": ""})
        cfg.MODEL.EXITS.MODE = "ds"
        cfg.MODEL.EXITS.IN_FEATURES = ["res3", "res4"]
        assert build_label_spaces(cfg, name) == {}
        cfg.MODEL.EXITS.MODE = "hs3"
        with pytest.raises(ValueError, match="CLUSTERS_FILE is empty"):
            build_label_spaces(cfg, name)
        cfg.MODEL.EXITS.HS3.CLUSTERS_FILE = path
        spaces = build_label_spaces(cfg, name)
        assert sorted(spaces) == ["sem_seg_res3", "sem_seg_res4"]
        lut, names = spaces["sem_seg_res3"]
        assert names == ["sky", "building+vegetation", "road+sidewalk", "car+person+pole+2 more"]
        assert lut[255] == 255 and list(lut[:10]) == [0, 1, 2, 2, 1, 3, 3, 3, 3, 3]
        cfg.MODEL.EXITS.IN_FEATURES = ["res3", "res5"]
        with pytest.raises(ClustersFileError, match="exit names do not match"):
            build_label_spaces(cfg, name)
        cfg.MODEL.EXITS.IN_FEATURES = ["res3", "res4"]
        MetadataCatalog.get(name + "_other").set(stuff_classes=DEMO[:9], ignore_label=255)
        with pytest.raises(ClustersFileError, match="made for 10 classes"):
            build_label_spaces(cfg, name + "_other")
    finally:
        MetadataCatalog.remove(name)
        if name + "_other" in MetadataCatalog.list():
            MetadataCatalog.remove(name + "_other")


# ----------------------------------------------------------------------------- CLI


def stage_confusion(p_correct, p_group, seed):
    """Synthetic confusion of a stage: a share of each class's pixels right, a share
    confused within its coarse group, the rest anywhere; unequal class sizes."""
    rng = np.random.default_rng(seed)
    n = len(DEMO)
    group = {DEMO.index(c): gi for gi, g in enumerate(COARSE) for c in g}
    sizes = rng.integers(2_000, 200_000, n)
    conf = np.zeros((n, n), dtype=np.int64)
    for i in range(n):
        mates = [j for j in range(n) if group[j] == group[i] and j != i]
        w = np.full(n, (1 - p_correct - (p_group if mates else 0)) / n)
        w[i] += p_correct
        for j in mates:
            w[j] += p_group / len(mates)
        w *= rng.uniform(0.8, 1.2, n)
        conf[i] = rng.multinomial(sizes[i], w / w.sum())
    return conf


def write_confusions(folder):
    os.makedirs(folder, exist_ok=True)
    for key, (pc, pg, seed) in {"sem_seg": (0.8, 0.15, 0), "sem_seg_res4": (0.55, 0.35, 1), "sem_seg_res3": (0.35, 0.45, 2)}.items():
        conf = stage_confusion(pc, pg, seed)
        np.save(os.path.join(folder, f"confusion_{key}.npy"), conf)
        with open(os.path.join(folder, f"confusion_{key}.json"), "w") as f:
            json.dump({"prediction": key, "classes": DEMO, "matrix": conf.tolist()}, f)


def analyze(argv):
    """tools/hs3_analyze.py's arguments -> the package's run_hs3_analysis (tests do not import tools/)."""
    p = argparse.ArgumentParser()
    p.add_argument("confusion_dir")
    for opt in ("--output-dir", "--method", "--groups", "--exits", "--ks", "--features-dir"):
        p.add_argument(opt, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--theta", type=float, default=None)
    p.add_argument("--force", action="store_true")
    a = p.parse_args(argv)
    groups = None
    if a.groups:
        with open(a.groups) as f:
            groups = json.load(f)
    return run_hs3_analysis(a.confusion_dir, a.output_dir, method=a.method or "spectral", theta=a.theta,
                            k_grid=a.ks or "", seed=a.seed, exits=[e for e in (a.exits or "").split(",") if e] or None,
                            features_dir=a.features_dir, groups=groups, force=a.force)


def test_cli_runs_the_package_analysis(tmp_path):
    """The command line is a thin wrapper: one subprocess run writes the same clusters as the package."""
    conf_dir = str(tmp_path / "inference")
    write_confusions(conf_dir)
    out = subprocess.run([sys.executable, os.path.join(REPO, "tools", "hs3_analyze.py"), conf_dir, "--output-dir",
                          str(tmp_path / "cli"), "--seed", "0"], capture_output=True, text=True, check=True).stdout
    assert "clusters: " in out
    direct = analyze([conf_dir, "--output-dir", str(tmp_path / "pkg"), "--seed", "0"])
    cli, pkg = load_clusters(str(tmp_path / "cli" / "clusters.json")), load_clusters(direct["clusters"])
    assert all(cli.groups(e) == pkg.groups(e) for e in ("res3", "res4"))


def test_cli_end_to_end_and_resume(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    conf_dir, out = str(tmp_path / "inference"), str(tmp_path / "hs3")
    write_confusions(conf_dir)
    paths = analyze([conf_dir, "--output-dir", out, "--seed", "0"])
    for p in paths.values():
        assert os.path.getsize(p) > 0
    cl = load_clusters(paths["clusters"], DEMO, ["res3", "res4"])
    k3, k4 = cl.num_clusters("res3"), cl.num_clusters("res4")
    assert 2 <= k3 <= k4 < 10  # the weaker (shallower) exit gets the simpler task
    assert cl.info["exit_order"] == ["res3", "res4"]  # ordered weakest first
    with open(paths["curves"]) as f:
        curves = json.load(f)
    final = curves["final_mIoU"]
    for e in ("res3", "res4"):  # the choice is the largest K on or above the line through the origin
        c = curves["stages"][e]
        ok = [k for k, m in zip(c["ks"], c["mIoU"]) if m / k >= final / 10 - 1e-9]
        assert cl.num_clusters(e) == max(ok)
        assert cl[e].extra["on_or_above_line"]
    # coarse groups: classes confused within their group end up together at K = 4
    assert partition(np.array(curves["stages"]["res3"]["assignments"][2])) == partition(
        [next(gi for gi, g in enumerate(COARSE) if c in g) for c in DEMO])
    with open(paths["report"]) as f:
        report = f.read()
    assert "| res3 |" in report and "## res4" in report

    # resume: nothing is redone
    mtimes = {k: os.path.getmtime(p) for k, p in paths.items()}
    caplog.clear()
    analyze([conf_dir, "--output-dir", out, "--seed", "0"])
    assert {k: os.path.getmtime(p) for k, p in paths.items()} == mtimes
    assert sum("up to date" in r.getMessage() for r in caplog.records) == 4
    # another theta: the curves are kept, the choice is redone
    caplog.clear()
    analyze([conf_dir, "--output-dir", out, "--theta", "0"])
    assert os.path.getmtime(paths["curves"]) == mtimes["curves"]
    assert os.path.getmtime(paths["clusters"]) != mtimes["clusters"] or load_clusters(paths["clusters"]).theta == 0
    assert load_clusters(paths["clusters"]).num_clusters("res3") == 10  # theta = 0: deep supervision
    # --force redoes everything
    caplog.clear()
    analyze([conf_dir, "--output-dir", out, "--theta", "0", "--force"])
    assert not any("up to date" in r.getMessage() for r in caplog.records)


def test_cli_manual_and_kmeans(tmp_path):
    conf_dir = str(tmp_path / "inference")
    write_confusions(conf_dir)
    groups = {"res3": COARSE}
    gpath = write_variant(tmp_path, groups, "groups.json")
    paths = analyze([conf_dir, "--output-dir", str(tmp_path / "manual"), "--method", "manual", "--groups", gpath,
                       "--exits", "res3,res4", "--ks", "2-5"])
    cl = load_clusters(paths["clusters"], DEMO, ["res3", "res4"])
    assert cl.groups("res3") == COARSE and cl.num_clusters("res4") == 5  # half of the final output's 10
    assert cl.method == "manual"
    # k-means on per-class features: the coarse groups are recovered at K = 4
    rng = np.random.default_rng(0)
    fdir = tmp_path / "features"
    fdir.mkdir()
    centres = rng.normal(0, 10, (4, 8))
    gid = [next(gi for gi, g in enumerate(COARSE) if c in g) for c in DEMO]
    for e in ("res3", "res4"):
        np.save(fdir / f"features_{e}.npy", centres[gid] + rng.normal(0, 0.5, (10, 8)))
    paths = analyze([conf_dir, "--output-dir", str(tmp_path / "km"), "--method", "kmeans", "--features-dir", str(fdir)])
    with open(paths["curves"]) as f:
        curves = json.load(f)
    c = curves["stages"]["res3"]
    assert partition(c["assignments"][c["ks"].index(4)]) == partition(gid)
    assert "final" not in curves["stages"]  # no features for the final output: no curve
    load_clusters(paths["clusters"], DEMO, ["res3", "res4"])
