# Lazy-config twin of hs3_r18.yaml: HS3 Phase 2 on the demo DeepLabV3-R18, exits on res3 and res4.
# Each exit's class count, label table and evaluated label space come from CLUSTERS_FILE
# (written by tools/hs3_pipeline.py --config-file configs/demo/hs3/hs3_r18.yaml; run from the
# repository root). Phase 1 / the pipeline use the YAML configs.
from detectron2.config import LazyCall as L
from detectron2.layers import ShapeSpec
from segdistill.hs3.model import clusters_label_luts, clusters_label_spaces, clusters_num_classes
from segdistill.modeling import SegDeepLabV3Head, TimmBackbone
from segdistill.modeling.exits import build_exit_heads
from segdistill.modeling.losses.hs3 import HS3Objective
from segdistill.modeling.meta_arch.multi_exit import MultiExitSegmentor

from ...common.demo_data import IGNORE, NUM_CLASSES, dataloader
from ...common.optim import SGD as optimizer
from ...common.schedule import poly_lr_multiplier as lr_multiplier
from ...common.train import train

CLUSTERS_FILE = "output/demo/hs3/r18/hs3/clusters.json"
EXITS = ["res3", "res4"]
STAGES = {"res3": (128, 8), "res4": (256, 8), "res5": (512, 8)}

model = L(MultiExitSegmentor)(
    backbone=L(TimmBackbone)(model_name="resnet18", output_stride=8, out_features=list(STAGES)),
    sem_seg_head=L(SegDeepLabV3Head)(
        input_shape={"res5": L(ShapeSpec)(channels=512, stride=8)},
        in_feature="res5",
        num_classes=NUM_CLASSES,
        aspp_channels=128,
        aspp_dilations=[3, 6, 9],
        aspp_dropout=0.1,
        norm="BN",
        ignore_value=IGNORE,
        loss_type="cross_entropy",
    ),
    pixel_mean=[123.675, 116.28, 103.53],
    pixel_std=[58.395, 57.12, 57.375],
    exits=L(build_exit_heads)(
        input_shape={k: L(ShapeSpec)(channels=c, stride=s) for k, (c, s) in STAGES.items()},
        in_features=EXITS,
        num_classes=L(clusters_num_classes)(path=CLUSTERS_FILE, exit_names=EXITS, class_names=NUM_CLASSES),
        channels=64,
        common_stride=8,
        norm="BN",
        with_classifier=False,
    ),
    objective=L(HS3Objective)(
        gammas=1.0, ignore_value=IGNORE,
        label_luts=L(clusters_label_luts)(path=CLUSTERS_FILE, exit_names=EXITS, class_names=NUM_CLASSES,
                                          ignore_value=IGNORE),
    ),
    eval_exits=True,  # per-exit mIoU, each exit in its own cluster space
)
dataloader.evaluator.label_spaces = L(clusters_label_spaces)(
    path=CLUSTERS_FILE, exit_names=EXITS, dataset_name="${...test.dataset.names}"
)

optimizer.lr = 0.02
train.max_iter = 800
train.device = "cpu"
train.output_dir = "output/demo/hs3/r18/phase2_lazy"
