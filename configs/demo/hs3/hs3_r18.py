# Lazy-config twin of hs3_r18.yaml: HS3 Phase 2 on the demo DeepLabV3-R18, exits on res3 and res4.
# Each exit's class count, label table and evaluated label space come from CLUSTERS_FILE
# (written by tools/hs3_pipeline.py --config-file configs/demo/hs3/hs3_r18.yaml; run from the
# repository root). Phase 1 / the pipeline use the YAML configs.
from detectron2.config import LazyCall as L
from segdistill.modeling.exits import HS3Objective, build_exit_heads
from segdistill.modeling.exits.hs3 import clusters_label_luts, clusters_label_spaces, clusters_num_classes
from segdistill.modeling.meta_arch.multi_exit import MultiExitSegmentor

from ...common.demo_data import IGNORE, NUM_CLASSES, dataloader
from ...common.demo_model import PIXEL_MEAN, PIXEL_STD, RESNET18_OS8, demo_backbone, demo_deeplabv3_head, shapes
from ...common.optim import SGD as optimizer
from ...common.schedule import poly_lr_multiplier as lr_multiplier
from ...common.train import train

CLUSTERS_FILE = "output/demo/hs3/r18/hs3/clusters.json"
EXITS = ["res3", "res4"]
STAGES = {k: RESNET18_OS8[k] for k in ("res3", "res4", "res5")}

model = L(MultiExitSegmentor)(
    backbone=demo_backbone(out_features=STAGES),
    sem_seg_head=demo_deeplabv3_head(),
    pixel_mean=PIXEL_MEAN,
    pixel_std=PIXEL_STD,
    exits=L(build_exit_heads)(
        input_shape=shapes(STAGES),
        in_features=EXITS,
        num_classes=L(clusters_num_classes)(path=CLUSTERS_FILE, exit_names=EXITS, class_names=NUM_CLASSES),
        channels=64,
        common_stride=8,
        norm="BN",
        with_classifier=False,
        max_downsample=2,
    ),
    final_classifier=None,
    objective=L(HS3Objective)(
        weight=1.0, ignore_value=IGNORE,
        label_luts=L(clusters_label_luts)(path=CLUSTERS_FILE, exit_names=EXITS, class_names=NUM_CLASSES,
                                          ignore_value=IGNORE),
        clusters_file=CLUSTERS_FILE,
    ),
    eval_exits=True,  # per-exit mIoU, each exit in its own cluster space
    fusion=None,
)
dataloader.evaluator.label_spaces = L(clusters_label_spaces)(
    path=CLUSTERS_FILE, exit_names=EXITS, dataset_name="${...test.dataset.names}"
)

optimizer.lr = 0.02
train.max_iter = 800
train.device = "cpu"
train.output_dir = "output/demo/hs3/r18/phase2_lazy"
