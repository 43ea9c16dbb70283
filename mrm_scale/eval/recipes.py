"""Named fine-tuning recipes: ``--recipe default`` (this project's) and ``--recipe mrm-paper`` (the paper's).

``mrm-paper`` restates the original fine-tuning scripts (the facts; the code is ours): full fine-tuning with SGD
(momentum 0.9, weight decay 0) over every weight, global batch 96, gradient clipping at norm 1, linear warmup then
half-cosine decay to 0 over a fixed number of steps, stochastic depth 0.1, 224-px input (train: RandomResizedCrop
224 with torchvision's default area range 0.08-1 + horizontal flip; test: resize the shorter side + centre crop),
the mean of the patch tokens *before* the encoder's final norm through a fresh LayerNorm (``fc_norm``) into a
linear head initialised truncated-normal with std 2e-5, learned position embeddings (trainable, as in timm's
ViT), validation AUC after every epoch of the training set, the test set scored once with the best-validation
weights. Steps / warm-up / peak lr per dataset and percent of the labels:

| dataset | 1% | 10% | 100% |
|---|---|---|---|
| NIH ChestX-ray14 | 3,000 / 50 / 3e-2 | 30,000 / 500 / 3e-3 | 200,000 / 5,000 / 3e-3 |
| RSNA Pneumonia | 2,000 / 50 / 3e-3 | 10,000 / 200 / 5e-4 | 50,000 / 2,000 / 5e-4 |
| CheXpert | 2,000 / 150 / 3e-3 | 60,000 / 1,500 / 5e-4 | 200,000 / 15,000 / 5e-4 |
| COVID | | | 1,000 / 50 / 3e-2 |

Where we differ from the scripts (none changes the protocol): bf16 autocast on GPUs instead of apex fp16 O2;
bicubic antialiased resizing instead of bilinear; the schedule's value for step s (1-based) is the one the
original's scheduler gives its s-th update.

``default``: linear probe (300 full-batch steps on cached features, AdamW lr 0.01, wd 1e-3) or fine-tune (10
epochs, AdamW lr 5e-4, wd 0.05, layer decay 0.75, warmup 1 epoch, drop path 0.1, standardised mean-pooled
features after the final norm), at the init's own geometry, RandomResizedCrop area 0.2-1.

Any explicit flag (``--lr``, ``--steps``, ``--batch-size``, ...) overrides the recipe's value; ``results.json``
records the whole resolved recipe and which values were overridden.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from mrm_scale.data.transforms import CROP_SCALE

from .datasets import DataSetError

RECIPES = ("default", "mrm-paper")
TORCHVISION_CROP_SCALE = (0.08, 1.0)  # RandomResizedCrop's default area range, the original scripts' crop

# (dataset, percent) -> (steps, warm-up steps, peak lr): the original fine-tuning scripts and README
PAPER_SCHEDULES: dict[tuple[str, int], tuple[int, int, float]] = {
    ("nih", 1): (3000, 50, 3e-2), ("nih", 10): (30000, 500, 3e-3), ("nih", 100): (200000, 5000, 3e-3),
    ("rsna", 1): (2000, 50, 3e-3), ("rsna", 10): (10000, 200, 5e-4), ("rsna", 100): (50000, 2000, 5e-4),
    ("chexpert", 1): (2000, 150, 3e-3), ("chexpert", 10): (60000, 1500, 5e-4),
    ("chexpert", 100): (200000, 15000, 5e-4),
    ("covid", 100): (1000, 50, 3e-2),
}
# the paper's mean AUC (MRM row) per (dataset, percent), for `mrm-scale eval table --paper`
PAPER_AUC: dict[tuple[str, int], float] = {
    ("chexpert", 1): 88.5, ("chexpert", 10): 88.5, ("chexpert", 100): 88.7,
    ("nih", 1): 79.4, ("nih", 10): 84.0, ("nih", 100): 85.9,
    ("rsna", 1): 91.3, ("rsna", 10): 92.7, ("rsna", 100): 93.3,
}


@dataclass(frozen=True)
class Recipe:
    """Every setting of a downstream run. ``None``: derived at run time (noted per field)."""

    name: str
    mode: str  # "finetune" | "linear"
    dataset: str | None = None
    percent: int | None = None
    optimizer: str = "adamw"  # "sgd" (momentum below) | "adamw"
    lr: float = 5e-4  # peak
    momentum: float = 0.9  # sgd only
    weight_decay: float = 0.05
    layer_decay: float | None = 0.75  # lr x decay^(depth + 1 - layer); None: one lr for all
    batch_size: int = 32  # images per optimizer step over all processes
    clip_grad: float | None = 1.0
    steps: int | None = None  # optimizer steps; None: epochs x steps per epoch
    epochs: int | None = 10  # used when steps is None
    warmup_steps: int | None = None  # None: warmup_epochs x steps per epoch
    warmup_epochs: float | None = 1.0
    drop_path: float = 0.1
    head: str = "standardised"  # "standardised": final norm, fixed standardisation | "fc_norm": pre-norm, fresh LN
    head_init_std: float = 0.01  # normal (standardised) or truncated normal (fc_norm)
    image_size: int | None = None  # side of the crop the model gets; None: the init's high-resolution side
    sr_scale: int | None = None  # the encoder sees image_size / sr_scale; None: the init's
    learned_pos_embed: bool = False  # position table trainable during fine-tuning
    crop_scale: tuple[float, float] = tuple(CROP_SCALE)  # RandomResizedCrop area range
    eval_every: int | None = None  # steps between validation scores; None: every epoch (linear: 10 steps)
    precision: str = "bf16 on CUDA, fp32 on CPU"
    overrides: dict = field(default_factory=dict)  # field -> the value given on the command line

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["crop_scale"] = list(self.crop_scale)
        return d


def paper_recipe(dataset: str, percent: int) -> Recipe:
    """``mrm-paper`` for one dataset and percent of the labels."""
    if (dataset, percent) not in PAPER_SCHEDULES:
        have = sorted(p for d, p in PAPER_SCHEDULES if d == dataset)
        if not have:
            raise DataSetError(f"--recipe mrm-paper is defined for --dataset "
                               f"{', '.join(sorted({d for d, _ in PAPER_SCHEDULES}))}, not {dataset!r}")
        raise DataSetError(f"--recipe mrm-paper: {dataset} is defined at {have} percent of the labels, not "
                           f"{percent}; give --label-fraction " + " or ".join(f"{p / 100:g}" for p in have))
    steps, warmup, lr = PAPER_SCHEDULES[(dataset, percent)]
    return Recipe(name="mrm-paper", mode="finetune", dataset=dataset, percent=percent, optimizer="sgd", lr=lr,
                  momentum=0.9, weight_decay=0.0, layer_decay=None, batch_size=96, clip_grad=1.0, steps=steps,
                  epochs=None, warmup_steps=warmup, warmup_epochs=None, drop_path=0.1, head="fc_norm",
                  head_init_std=2e-5, image_size=224, sr_scale=1, learned_pos_embed=True,
                  crop_scale=TORCHVISION_CROP_SCALE, eval_every=None)


def default_recipe(mode: str, dataset: str | None = None, percent: int | None = None) -> Recipe:
    if mode == "linear":
        return Recipe(name="default", mode="linear", dataset=dataset, percent=percent, lr=0.01, weight_decay=1e-3,
                      layer_decay=None, epochs=300, drop_path=0.0, clip_grad=None, eval_every=10)
    return Recipe(name="default", mode="finetune", dataset=dataset, percent=percent)


def resolve_recipe(name: str, mode: str | None, dataset: str | None, percent: int | None,
                   overrides: dict | None = None) -> Recipe:
    """The named recipe for (mode, dataset, percent), with the given (non-None) fields replaced."""
    if name not in RECIPES:
        raise DataSetError(f"--recipe {name!r}: unknown; one of {', '.join(RECIPES)}")
    if name == "mrm-paper":
        if mode == "linear":
            raise DataSetError("--recipe mrm-paper is full fine-tuning; drop --mode linear (or use --recipe default)")
        if dataset is None or percent is None:
            raise DataSetError("--recipe mrm-paper needs --dataset (chexpert, nih, rsna, covid) and "
                               "--label-fraction 0.01, 0.1 or 1")
        recipe = paper_recipe(dataset, percent)
    else:
        recipe = default_recipe(mode or "linear", dataset, percent)
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    fields = {f.name for f in dataclasses.fields(Recipe)}
    unknown = sorted(set(given) - fields)
    if unknown:
        raise ValueError(f"recipe fields {unknown} do not exist")
    if "crop_scale" in given:
        given["crop_scale"] = tuple(given["crop_scale"])
    changed = {k: v for k, v in given.items() if getattr(recipe, k) != v}
    return dataclasses.replace(recipe, **given, overrides={k: list(v) if isinstance(v, tuple) else v
                                                            for k, v in changed.items()})


# ----------------------------------------------------------------------------------------------------------------
# what a run costs
# ----------------------------------------------------------------------------------------------------------------
def run_images(recipe: Recipe, n_train: int, n_val: int, n_test: int) -> dict:
    """Images a run pushes through the model: training (forward + backward) and scoring (forward only)."""
    per_epoch = max(1, math.ceil(n_train / recipe.batch_size))
    steps = recipe.steps if recipe.steps is not None else recipe.epochs * per_epoch
    every = recipe.eval_every or per_epoch
    evals = steps // every
    return {"steps": steps, "steps_per_epoch": per_epoch, "val_passes": evals,
            "train_images": steps * recipe.batch_size, "eval_images": evals * n_val + n_test}


def run_flops(images: dict, forward_flops: float) -> float:
    """Matrix-product FLOPs of a run: training images 3 x forward, scored images 1 x."""
    return 3.0 * forward_flops * images["train_images"] + forward_flops * images["eval_images"]


# ----------------------------------------------------------------------------------------------------------------
# segmentation (launch/segment.py)
# ----------------------------------------------------------------------------------------------------------------
SEG_RECIPES = ("default", "mrm-paper")
# the paper's SIIM-ACR Dice (MRM row) per percent of the labels, for the README and --paper comparisons
PAPER_SIIM_DICE = {10: 73.2, 100: 91.4}
# what the paper states of its SIIM setup (the rest of mrm-paper's segmentation schedule is this project's: the
# original code has no segmentation configs)
PAPER_SEG_FACTS = ("UPerNet head on ViT-B blocks 4, 6, 8, 12 (indices 3, 5, 7, 11)",
                   "levels rescaled x4, x2, x1, x0.5 into a pyramid", "512 x 512 input", "focal + Dice loss",
                   "drop path 0.1")


@dataclass(frozen=True)
class SegRecipe:
    """Every setting of a segmentation run. ``None``: derived at run time (noted per field)."""

    name: str
    dataset: str | None = None
    percent: int | None = None
    lr: float = 3e-4  # AdamW peak
    weight_decay: float = 0.05
    layer_decay: float | None = 0.75  # encoder block lr x decay^(depth + 1 - layer); head and pyramid at lr
    batch_size: int = 16  # images per optimizer step over all processes
    steps: int = 1000
    warmup_steps: int | None = None  # None: steps // 10
    clip_grad: float | None = 1.0
    drop_path: float = 0.1
    loss: str = "dice-focal"  # "dice-focal" | "dice-bce" (MONAI DiceFocalLoss / DiceCELoss, sigmoid)
    channels: int | None = None  # UPerNet width; None: half the encoder's, 32..512
    levels: tuple[int, ...] | None = None  # encoder blocks; None: depth x (1/3, 1/2, 2/3, 1)
    image_size: int | None = None  # crop side = mask resolution; None: the init's high-resolution side
    sr_scale: int | None = None  # the encoder sees image_size / sr_scale; None: the init's
    crop_scale: tuple[float, float] = (0.5, 1.0)  # training RandomResizedCrop area range (+ flip)
    eval_every: int | None = None  # None: steps // 10
    threshold: float = 0.5  # sigmoid probability above which a pixel is predicted; 0: chosen on val (auto)
    balance: float = 0.0  # share of training draws from images with a non-empty mask; 0: a plain shuffle
    from_paper: tuple[str, ...] = ()
    overrides: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["crop_scale"] = list(self.crop_scale)
        d["levels"] = list(self.levels) if self.levels else None
        d["from_paper"] = list(self.from_paper)
        return d


# mrm-paper segmentation schedule per percent: (steps, warm-up, lr) at batch 16 -- this project's choice
PAPER_SEG_SCHEDULES = {1: (1000, 100, 1e-4), 10: (5000, 500, 1e-4), 100: (20000, 1500, 1e-4)}


def seg_recipe(name: str, dataset: str | None, percent: int | None, overrides: dict | None = None) -> SegRecipe:
    """``default`` (this project's, the init's geometry) or ``mrm-paper`` (the paper's SIIM setup: ViT-B levels
    3/5/7/11, pyramid, UPerNet, 512 px, focal + Dice, drop path 0.1; schedule ours, layer decay 0.65)."""
    if name not in SEG_RECIPES:
        raise DataSetError(f"--recipe {name!r}: unknown; one of {', '.join(SEG_RECIPES)}")
    if name == "mrm-paper":
        if percent not in PAPER_SEG_SCHEDULES:
            raise DataSetError(f"--recipe mrm-paper (segmentation) is defined at 1, 10 and 100 percent of the "
                               f"labels, not {percent}; give --label-fraction 0.01, 0.1 or 1")
        steps, warmup, lr = PAPER_SEG_SCHEDULES[percent]
        recipe = SegRecipe(name="mrm-paper", dataset=dataset, percent=percent, lr=lr, weight_decay=0.05,
                           layer_decay=0.65, batch_size=16, steps=steps, warmup_steps=warmup, drop_path=0.1,
                           loss="dice-focal", channels=512, levels=None, image_size=512, sr_scale=1,
                           eval_every=max(100, steps // 20), from_paper=PAPER_SEG_FACTS)
    else:
        recipe = SegRecipe(name="default", dataset=dataset, percent=percent)
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    fields = {f.name for f in dataclasses.fields(SegRecipe)}
    unknown = sorted(set(given) - fields)
    if unknown:
        raise ValueError(f"segmentation recipe fields {unknown} do not exist")
    for k in ("crop_scale", "levels"):
        if k in given:
            given[k] = tuple(given[k])
    if not 0 <= given.get("balance", 0.0) <= 1:
        raise DataSetError(f"--balance {given['balance']}: a share of the training draws, between 0 and 1")
    if not 0 <= given.get("threshold", 0.5) < 1:
        raise DataSetError(f"--threshold {given['threshold']}: a probability in (0, 1), or auto")
    changed = {k: v for k, v in given.items() if getattr(recipe, k) != v}
    return dataclasses.replace(recipe, **given, overrides={k: list(v) if isinstance(v, tuple) else v
                                                            for k, v in changed.items()})
