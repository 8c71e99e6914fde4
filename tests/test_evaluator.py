"""SemSegEvaluator against brute force, across two processes, and on bad labels."""
import json
import pickle

import numpy as np
import pytest
import torch

from conftest import free_port
from segdistill.data.labels import LabelValueError
from segdistill.evaluation import SemSegEvaluator

K = 6  # class 4: predicted but never in the ground truth; class 5: absent everywhere


def make_case(seed=0, n=5, h=23, w=31):
    rng = np.random.default_rng(seed)
    labels, logits = [], []
    for _ in range(n):
        gt = rng.choice([0, 1, 2, 3, 255], size=(h, w), p=[0.4, 0.25, 0.15, 0.1, 0.1])
        pred = np.where(rng.random((h, w)) < 0.6, np.where(gt == 255, 0, gt), rng.choice([0, 1, 2, 3, 4], size=(h, w)))
        lg = rng.normal(size=(K, h, w)).astype(np.float32)
        lg[pred, np.arange(h)[:, None], np.arange(w)[None]] += 10.0  # argmax = pred
        lg[5] = -100.0
        labels.append(gt.astype(np.uint8))
        logits.append(torch.from_numpy(lg))
    return labels, logits


def brute_force(labels, logits):
    """Class by class, pixel sets, no confusion matrix."""
    gt = np.concatenate([l.ravel() for l in labels]).astype(int)
    pred = np.concatenate([x.argmax(0).numpy().ravel() for x in logits])
    valid = gt != 255
    gt, pred = gt[valid], pred[valid]
    res = {}
    ious, accs, present = [], [], []
    for c in range(K):
        tp = np.sum((gt == c) & (pred == c))
        n_gt = np.sum(gt == c)
        n_pred = np.sum(pred == c)
        if n_gt:
            iou, acc = tp / (n_gt + n_pred - tp), tp / n_gt
            present.append(c)
        else:
            iou = acc = float("nan")
        ious.append(iou)
        accs.append(acc)
        res[f"IoU-c{c}"], res[f"ACC-c{c}"] = 100 * iou, 100 * acc
    res["mIoU"] = 100 * np.mean([ious[c] for c in present])
    res["mACC"] = 100 * np.mean([accs[c] for c in present])
    res["pACC"] = 100 * np.sum(gt == pred) / len(gt)
    res["fwIoU"] = 100 * sum(np.sum(gt == c) / len(gt) * ious[c] for c in present)
    return res


def run_evaluator(name, labels, logits, indices, output_dir=None, distributed=False):
    from detectron2.data import DatasetCatalog

    records = DatasetCatalog.get(name)
    ev = SemSegEvaluator(name, distributed=distributed, output_dir=output_dir)
    ev.reset()
    for i in indices:
        ev.process([{"file_name": records[i]["file_name"]}], [{"sem_seg": logits[i]}])
    return ev.evaluate()


def assert_close(res, ref):
    assert set(ref) <= set(res)
    for k, v in ref.items():
        if np.isnan(v):
            assert np.isnan(res[k]), k
        else:
            assert res[k] == pytest.approx(v, abs=1e-9), k


def test_every_metric_matches_brute_force(write_label_dataset, tmp_path):
    labels, logits = make_case()
    name = write_label_dataset("ev_brute", labels, K)
    res = run_evaluator(name, labels, logits, range(len(labels)), output_dir=str(tmp_path / "out"))
    ref = brute_force(labels, logits)
    assert_close(res["sem_seg"], ref)
    # class 4 is predicted but absent from the ground truth: not averaged into mIoU
    assert np.isnan(res["sem_seg"]["IoU-c4"]) and not np.isnan(res["sem_seg"]["IoU-c0"])
    conf = np.load(tmp_path / "out" / "confusion_sem_seg.npy")
    saved = json.load(open(tmp_path / "out" / "confusion_sem_seg.json"))
    assert saved["rows"] == "ground truth" and np.array_equal(np.array(saved["matrix"]), conf)
    assert conf.sum() == sum(int((l != 255).sum()) for l in labels)
    assert saved["metrics"]["IoU-c5"] is None  # NaN written as null


def test_per_exit_outputs_and_label_spaces(write_label_dataset):
    labels, logits = make_case(seed=3)
    name = write_label_dataset("ev_spaces", labels, K)
    from detectron2.data import DatasetCatalog

    records = DatasetCatalog.get(name)
    lut = np.array([0, 0, 1, 1, 1, 1])  # classes {0,1} -> 0, {2,3,4,5} -> 1
    ev = SemSegEvaluator(name, distributed=False, label_spaces={"sem_seg_res3": (lut, ["a", "b"])})
    ev.reset()
    for rec, lg in zip(records, logits):
        merged = torch.stack([lg[:2].max(0).values, lg[2:].max(0).values])
        ev.process([{"file_name": rec["file_name"]}], [{"sem_seg": lg, "sem_seg_res3": merged}])
    res = ev.evaluate()
    assert list(res) == ["sem_seg", "sem_seg_res3"]
    gt = np.concatenate([l.ravel() for l in labels]).astype(int)
    pred = np.concatenate([x.argmax(0).numpy().ravel() for x in logits])
    v = gt != 255
    g2, p2 = lut[gt[v]], lut[pred[v]]
    assert res["sem_seg_res3"]["pACC"] == pytest.approx(100 * np.mean(g2 == p2))


def _worker(rank, port, name, root, labels, logits, out_file):
    import torch.distributed as dist

    from detectron2.data import DatasetCatalog, MetadataCatalog

    torch.set_num_threads(1)
    from segdistill.data.datasets import load_sem_seg_folder

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    DatasetCatalog.register(name, lambda: load_sem_seg_folder(f"{root}/img", f"{root}/lbl", dataset_name=name, layout_help=""))
    MetadataCatalog.get(name).set(stuff_classes=[f"c{k}" for k in range(K)], ignore_label=255)
    res = run_evaluator(name, labels, logits, range(rank, len(labels), 2), distributed=True)
    if rank == 0:
        with open(out_file, "wb") as f:
            pickle.dump(res, f)
    else:
        assert res is None
    # both processes reach this point before either tears its group down: a process that
    # destroys its gloo group while the other still talks to it can abort (seen in CI once)
    dist.barrier()
    dist.destroy_process_group()


def test_distributed_gather_two_processes(write_label_dataset, tmp_path):
    labels, logits = make_case(seed=1, n=7)
    name = write_label_dataset("ev_dist", labels, K)
    out_file = str(tmp_path / "res.pkl")
    torch.multiprocessing.spawn(
        _worker, args=(free_port(), name, str(tmp_path / name), labels, logits, out_file), nprocs=2
    )
    with open(out_file, "rb") as f:
        res = pickle.load(f)
    assert_close(res["sem_seg"], brute_force(labels, logits))


def test_bad_label_values_name_the_file(write_label_dataset):
    labels, logits = make_case(seed=2, n=2)
    labels[1][3, 4] = 17  # neither a class nor the ignore value
    labels[1][5, 6] = 200
    name = write_label_dataset("ev_bad", labels, K)
    with pytest.raises(LabelValueError, match=r"001\.png.*\[17, 200\]"):
        run_evaluator(name, labels, logits, range(2))


def test_prediction_of_wrong_size_or_class_count(write_label_dataset):
    labels, logits = make_case(seed=4, n=1)
    name = write_label_dataset("ev_shape", labels, K)
    with pytest.raises(ValueError, match="height/width"):
        run_evaluator(name, labels, [logits[0][:, :-1]], [0])
    with pytest.raises(ValueError, match="NUM_CLASSES"):
        run_evaluator(name, labels, [logits[0][:4]], [0])
