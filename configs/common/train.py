# Common `train` settings for lazy configs (detectron2's lazy-config convention).
train = dict(
    output_dir="./output",
    init_checkpoint="",  # a local detectron2 checkpoint of the whole model, or ""
    max_iter=800,
    amp=dict(enabled=False),
    ddp=dict(broadcast_buffers=False, find_unused_parameters=False, fp16_compression=False),
    checkpointer=dict(period=400, max_to_keep=100),
    eval_period=400,
    log_period=20,
    device="cuda",  # set "cpu" on a machine without a GPU (train.device=cpu)
    seed=-1,  # >= 0: a fixed seed (model init, data order, augmentation); -1: a random one
    cudnn_benchmark=False,
    # --eval-only: an empty init_checkpoint is an error unless allow_random_weights (tests); a
    # checkpoint covering less than min_matched_weights of the model (elements) is refused.
    allow_random_weights=False,
    min_matched_weights=0.9,
)
