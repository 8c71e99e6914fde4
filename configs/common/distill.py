# Lazy building blocks of the papers' distillation pairs (configs/<dataset>/distill/*.py): the
# baseline student of configs/<dataset>/baseline/ taught by the DeepLabV3-ResNet101 teacher of the
# same folder (its YAML config and trained weights), in the distillation setting of HWD and FAKD:
# 512x512 crops, batch 8, 40k iterations, SGD lr 0.01, poly. The method is
# `model.losses.names` (as MODEL.DISTILL.LOSSES; settings: each loss's defaults, changed with
# `model.losses.opts`), e.g. on the command line:
#   python train_net.py --config-file configs/cityscapes/distill/deeplabv3_r18.py \
#       'model.losses.names=[pd,skd]'
from detectron2.config import LazyCall as L
from segdistill.modeling.distill import distill_losses_from_names
from segdistill.modeling.meta_arch.distill import Distiller, build_teacher

from .zoo import IGNORE, NORM


def paper_distiller(student, dataset, losses=("cwd",)):
    teacher = f"configs/{dataset}/baseline/deeplabv3_r101.yaml"
    return L(Distiller)(
        student=student,
        teacher=L(build_teacher)(
            config_file=teacher,
            weights=f"output/{dataset}/baseline/deeplabv3_r101/model_final.pth",
            # the trained teacher replaces every tensor: no ImageNet download for its backbone
            opts=["MODEL.TIMM.PRETRAINED", ""],
            allow_random=False,  # True: tests/benchmarks only
        ),
        teacher_name=teacher,
        teacher_input_format="RGB",
        losses=L(distill_losses_from_names)(names=list(losses), opts=["MODEL.NORM", NORM]),
        ignore_value=IGNORE,
        exclude_ignore=False,
        eval_teacher=True,  # the evaluator scores sem_seg_teacher too
        input_format="RGB",
    )


def paper_distillation_schedule(dataloader, optimizer, train, output_dir):
    """HWD/FAKD's distillation setting, on a baseline's lazy objects (in place)."""
    dataloader.train.mapper.augmentations[1].crop_size = (512, 512)
    dataloader.train.total_batch_size = 8
    optimizer.lr = 0.01
    train.max_iter = 40000
    train.checkpointer.period = 4000
    train.eval_period = 4000
    train.output_dir = output_dir
