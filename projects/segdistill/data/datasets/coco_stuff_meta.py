"""COCO-Stuff-164k label space: the 182 official ids, the 171 classes used, and the hierarchy.

Pure data (no detectron2 import), so the preparation script and tests can use it cheaply.

Ids (from the official ``labels.txt`` of the COCO-Stuff repository):

* COCO category ids 1..91 are things, 92..182 stuff, 0 is "unlabeled";
* 11 thing ids have no segmentation in COCO and never occur (:data:`UNUSED_IDS`), so
  80 thing + 91 stuff = 171 classes are used;
* the official ``stuffthingmaps_trainval2017`` PNGs store ``id - 1`` (0..181) and 255 for
  unlabeled. :func:`raw_to_contiguous_lut` maps them to the contiguous training labels
  0..170 (ids in increasing order), with 255 for unlabeled and for the unused ids.

Hierarchy (the official one, ``CocoStuffClasses.m`` of the COCO-Stuff repositories, also the
figure "COCO-Stuff label hierarchy" of the paper): root -> things / stuff -> indoor /
outdoor -> 27 supercategories (12 of things, 15 of stuff) -> classes.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Dict, List

import numpy as np

__all__ = [
    "COCO_STUFF_ALL_NAMES", "UNUSED_IDS", "COCO_STUFF_IDS", "COCO_STUFF_CLASSES", "COCO_STUFF_IS_THING",
    "COCO_STUFF_SUPERCATEGORY", "COCO_STUFF_SUPERCATEGORIES", "COCO_STUFF_LEVELS", "SUPERCATEGORY_PARENT",
    "stuff_dataset_id_to_contiguous_id", "raw_to_contiguous_lut", "IGNORE",
]

IGNORE = 255

# Official id -> name, ids 1..182 (labels.txt; 0 = unlabeled is not a class).
_NAMES_1_TO_182 = """
person bicycle car motorcycle airplane bus train truck boat traffic_light fire_hydrant street_sign
stop_sign parking_meter bench bird cat dog horse sheep cow elephant bear zebra giraffe hat backpack
umbrella shoe eye_glasses handbag tie suitcase frisbee skis snowboard sports_ball kite baseball_bat
baseball_glove skateboard surfboard tennis_racket bottle plate wine_glass cup fork knife spoon bowl
banana apple sandwich orange broccoli carrot hot_dog pizza donut cake chair couch potted_plant bed
mirror dining_table window desk toilet door tv laptop mouse remote keyboard cell_phone microwave oven
toaster sink refrigerator blender book clock vase scissors teddy_bear hair_drier toothbrush hair_brush
banner blanket branch bridge building-other bush cabinet cage cardboard carpet ceiling-other
ceiling-tile cloth clothes clouds counter cupboard curtain desk-stuff dirt door-stuff fence
floor-marble floor-other floor-stone floor-tile floor-wood flower fog food-other fruit
furniture-other grass gravel ground-other hill house leaves light mat metal mirror-stuff moss
mountain mud napkin net paper pavement pillow plant-other plastic platform playingfield railing
railroad river road rock roof rug salad sand sea shelf sky-other skyscraper snow solid-other stairs
stone straw structural-other table tent textile-other towel tree vegetable wall-brick wall-concrete
wall-other wall-panel wall-stone wall-tile wall-wood water-other waterdrops window-blind
window-other wood
""".split()
#: ``{coco id: name}`` for all 182 official ids.
COCO_STUFF_ALL_NAMES: Dict[int, str] = {i + 1: n.replace("_", " ") for i, n in enumerate(_NAMES_1_TO_182)}
assert len(COCO_STUFF_ALL_NAMES) == 182

#: Thing ids without any segmentation in COCO (street sign, hat, shoe, eye glasses, plate,
#: mirror, window, desk, door, blender, hair brush).
UNUSED_IDS = (12, 26, 29, 30, 45, 66, 68, 69, 71, 83, 91)

#: The 171 used ids, increasing, and their names: contiguous label k is COCO id COCO_STUFF_IDS[k].
COCO_STUFF_IDS: List[int] = [i for i in range(1, 183) if i not in UNUSED_IDS]
COCO_STUFF_CLASSES: List[str] = [COCO_STUFF_ALL_NAMES[i] for i in COCO_STUFF_IDS]
COCO_STUFF_IS_THING: List[bool] = [i <= 91 for i in COCO_STUFF_IDS]

# Official hierarchy: supercategory -> its classes (unused thing ids left out).
_SUPER = OrderedDict([
    # things, outdoor
    ("person-things", "person"),
    ("vehicle-things", "bicycle car motorcycle airplane bus train truck boat"),
    ("outdoor-things", "traffic_light fire_hydrant stop_sign parking_meter bench"),
    ("animal-things", "bird cat dog horse sheep cow elephant bear zebra giraffe"),
    ("accessory-things", "backpack umbrella handbag tie suitcase"),
    ("sports-things", "frisbee skis snowboard sports_ball kite baseball_bat baseball_glove skateboard "
                      "surfboard tennis_racket"),
    # things, indoor
    ("kitchen-things", "bottle wine_glass cup fork knife spoon bowl"),
    ("food-things", "banana apple sandwich orange broccoli carrot hot_dog pizza donut cake"),
    ("furniture-things", "chair couch potted_plant bed dining_table toilet"),
    ("electronic-things", "tv laptop mouse remote keyboard cell_phone"),
    ("appliance-things", "microwave oven toaster sink refrigerator"),
    ("indoor-things", "book clock vase scissors teddy_bear hair_drier toothbrush"),
    # stuff, indoor
    ("rawmaterial-stuff", "cardboard paper plastic metal"),
    ("wall-stuff", "wall-tile wall-panel wall-wood wall-brick wall-stone wall-concrete wall-other"),
    ("ceiling-stuff", "ceiling-tile ceiling-other"),
    ("floor-stuff", "carpet floor-tile floor-wood floor-marble floor-stone floor-other"),
    ("window-stuff", "window-blind window-other"),
    ("furniture-stuff", "door-stuff desk-stuff table shelf cabinet cupboard mirror-stuff counter light "
                        "stairs furniture-other"),
    ("textile-stuff", "rug mat towel napkin clothes cloth curtain blanket pillow banner textile-other"),
    ("food-stuff", "fruit salad vegetable food-other"),
    # stuff, outdoor
    ("building-stuff", "house skyscraper bridge tent roof building-other"),
    ("structural-stuff", "fence cage net railing structural-other"),
    ("plant-stuff", "grass tree bush leaves flower branch moss straw plant-other"),
    ("sky-stuff", "clouds sky-other"),
    ("solid-stuff", "wood rock stone mountain hill solid-other"),
    ("ground-stuff", "sand snow dirt mud gravel road pavement railroad platform playingfield ground-other"),
    ("water-stuff", "fog river sea waterdrops water-other"),
])
#: Supercategory -> its parent in the hierarchy (indoor/outdoor of things/stuff).
SUPERCATEGORY_PARENT: Dict[str, str] = {
    s: ("outdoor" if i < 6 or i >= 20 else "indoor") + ("-things" if i < 12 else "-stuff")
    for i, s in enumerate(_SUPER)
}
#: The 27 supercategories, in the official order.
COCO_STUFF_SUPERCATEGORIES: List[str] = list(_SUPER)

_class_to_super = {n.replace("_", " "): s for s, names in _SUPER.items() for n in names.split()}
#: Supercategory of each of the 171 classes.
COCO_STUFF_SUPERCATEGORY: List[str] = [_class_to_super[n] for n in COCO_STUFF_CLASSES]

#: Group of each of the 171 classes at each level of the hierarchy, coarse to fine.
COCO_STUFF_LEVELS: "OrderedDict[str, List[str]]" = OrderedDict([
    ("kind", ["things" if t else "stuff" for t in COCO_STUFF_IS_THING]),
    ("scene", [SUPERCATEGORY_PARENT[s] for s in COCO_STUFF_SUPERCATEGORY]),
    ("super", list(COCO_STUFF_SUPERCATEGORY)),
])


def stuff_dataset_id_to_contiguous_id() -> Dict[int, int]:
    """``{COCO category id: contiguous label}`` for the 171 used ids (detectron2's metadata key)."""
    return {cid: k for k, cid in enumerate(COCO_STUFF_IDS)}


def raw_to_contiguous_lut() -> np.ndarray:
    """uint8[256]: official stuffthingmaps value (COCO id - 1, or 255) -> training label.

    Used ids map to 0..170, the 11 unused ids and 255 to 255. Values 182..254 are not
    official values (the converter refuses them); they map to 255 here.
    """
    lut = np.full(256, IGNORE, np.uint8)
    for k, cid in enumerate(COCO_STUFF_IDS):
        lut[cid - 1] = k
    return lut


assert len(COCO_STUFF_CLASSES) == 171 and sum(COCO_STUFF_IS_THING) == 80
assert len(_class_to_super) == 171 and set(_class_to_super) == set(COCO_STUFF_CLASSES)
