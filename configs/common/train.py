# Common `train` settings for lazy configs (detectron2's lazy-config convention): every key a lazy
# config's `train` may set, with its default and what it does, is in lazy_train_defaults
# (projects/segdistill/config/lazy_check.py); a key that is not there is refused when the file loads.
from segdistill.config import lazy_train_defaults

train = lazy_train_defaults()
