"""The one augmentation spec: what every loader (DALI GPU and CPU, the torchvision baseline) does to an image,
and the normalisation the TensorBoard image grid undoes. Defined once, read by all of them.

The defaults are the 90-epoch ResNet-50 recipe's: RandomResizedCrop (area 8-100%, aspect ratio 3/4-4/3), a
horizontal flip with p = 0.5, colour jitter 0.4, ImageNet mean and std; validation resizes the shorter side
to image_size / 0.875 (256 for 224) and centre crops.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

# ImageNet statistics on 0-1 pixels (DALI works on 0-255 and scales them)
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


RANDAUGMENT_MAX = 30  # DALI's auto_aug: magnitudes are bins 0..30 (num_magnitude_bins 31)


def opt(default, help: str, flat: str | None = None):
    """A spec field with its help text and, where the section's context makes a shorter name read better
    in code, its flat name (the CLI flag and the key in presets and recipe.json)."""
    return field(default=default, metadata={"help": help, "flat": flat})


@dataclass(frozen=True)
class Augmentation:
    image_size: int = opt(224, "training crop and validation crop size")
    crop_area: tuple[float, ...] = opt((0.08, 1.0), "RandomResizedCrop: range of the crop's share of the image area")
    crop_ratio: tuple[float, ...] = opt((3 / 4, 4 / 3), "RandomResizedCrop: range of the crop's aspect ratio")
    hflip: float = opt(0.5, "probability of a horizontal flip")
    color_jitter: float = opt(0.4, "brightness, contrast and saturation strength; 0 switches it off")
    randaugment_magnitude: int = opt(0, "RandAugment inside the DALI pipeline (e.g. 7, of 30); 0: off")
    randaugment_layers: int = opt(2, "RandAugment: operations per image")
    randaugment_magnitude_std: float = opt(0.0, "RandAugment: random spread of the magnitude per image")
    trivial_augment: bool = opt(False, "TrivialAugment-wide: one random operation per image at a random strength "
                                       "(DALI's auto_aug, torchvision's TrivialAugmentWide); not with RandAugment")
    random_erase: float = opt(0.0, "random erasing: the probability per image of zeroing one rectangle (2-33% of the "
                                   "crop, aspect 0.3-3.3) after normalisation, torchvision's RandomErasing; 0: off")
    repeated_aug: int = opt(1, "each image k times per epoch's stream, augmented independently (DALI loaders)")
    val_resize_ratio: float = opt(0.875, "validation: resize shorter side to val size / ratio, centre crop")
    # progressive resizing (FFCV's): low resolution for most of the run, a ramp up to max_res late
    min_res: int = opt(0, "progressive resizing: the training resolution up to start_ramp; 0: image_size")
    max_res: int = opt(0, "progressive resizing: the training resolution from end_ramp on; 0: off (image_size "
                          "throughout)")
    start_ramp: int = opt(0, "progressive resizing: the epoch (0-based) after which the ramp starts")
    end_ramp: int = opt(0, "progressive resizing: the epoch from which max_res is used")
    # validation apart from training (the train-test resolution discrepancy, Touvron et al. 2019)
    val_image_size: int = opt(0, "validation crop size; 0: image_size")
    val_flip: bool = opt(False, "validation: average the logits of each image and its mirror")
    # the dataset's own statistics (python -m tools.stats DIR prints them); saved in every checkpoint's recipe
    normalize: tuple[float, ...] = opt(MEAN + STD, "per-channel normalisation MEAN_R,MEAN_G,MEAN_B,STD_R,STD_G,"
                                                   "STD_B on 0-1 pixels (default: ImageNet's)")

    @property
    def mean(self) -> tuple[float, ...]:
        return tuple(self.normalize[:3])

    @property
    def std(self) -> tuple[float, ...]:
        return tuple(self.normalize[3:])

    def train_size(self, epoch: int) -> int:
        """The training resolution of epoch `epoch` (0-based), as FFCV's get_resolution: min_res up to
        start_ramp, max_res from end_ramp, a linear ramp between rounded to multiples of 32 px."""
        if not self.max_res:
            return self.image_size
        low = self.min_res or self.image_size
        if epoch <= self.start_ramp:
            return low
        if epoch >= self.end_ramp:
            return self.max_res
        ramp = low + (self.max_res - low) * (epoch - self.start_ramp) / (self.end_ramp - self.start_ramp)
        return int(round(ramp / 32)) * 32

    def train_sizes(self, epochs: int) -> list[int]:
        """Every epoch's training resolution, in order."""
        return [self.train_size(epoch) for epoch in range(epochs)]

    @property
    def val_size(self) -> int:
        return self.val_image_size or self.image_size

    @property
    def val_resize_to(self) -> int:
        """The shorter side validation resizes to before the centre crop: val_size / val_resize_ratio truncated,
        as every loader applies it (36 for 32 px, 292 for 256 px, 256 for 224 px at the default 0.875)."""
        return int(self.val_size / self.val_resize_ratio)

    @property
    def auto_augment(self) -> bool:
        """RandAugment or TrivialAugment is on: DALI builds them with conditionals (one branch per operation)."""
        return self.randaugment_magnitude > 0 or self.trivial_augment

    @property
    def jitter_range(self) -> tuple[float, float]:
        """The range brightness, contrast and saturation factors are drawn from: [max(0, 1 - s), 1 + s] for
        strength s, torchvision's ColorJitter's (a factor below 0 is no colour at all); every loader's."""
        return max(0.0, 1.0 - self.color_jitter), 1.0 + self.color_jitter

    def validate(self) -> "Augmentation":
        from pipelines.errors import UserError

        if not (len(self.crop_area) == 2 and 0 < self.crop_area[0] <= self.crop_area[1] <= 1):
            raise UserError(f"crop_area must be two fractions 0 < low <= high <= 1, got {list(self.crop_area)}")
        if not (len(self.crop_ratio) == 2 and 0 < self.crop_ratio[0] <= self.crop_ratio[1]):
            raise UserError(f"crop_ratio must be two ratios 0 < low <= high, got {list(self.crop_ratio)}")
        if not 0.0 <= self.hflip <= 1.0:
            raise UserError(f"hflip is a probability in [0, 1], got {self.hflip}")
        for name in ("image_size", "repeated_aug"):
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("min_res", "max_res", "start_ramp", "end_ramp", "val_image_size"):
            if getattr(self, name) < 0:
                raise UserError(f"{name} must not be negative, got {getattr(self, name)}")
        if self.max_res:
            low = self.min_res or self.image_size
            if low > self.max_res:
                raise UserError(f"progressive resizing goes up: min_res {low} is above max_res {self.max_res}")
            if self.end_ramp <= self.start_ramp:
                raise UserError(f"end_ramp ({self.end_ramp}) must come after start_ramp ({self.start_ramp}); "
                                "give the epochs between which the resolution rises")
        elif self.min_res:
            raise UserError("min_res without max_res: progressive resizing is on when --max-res is set; give "
                            "--max-res too, or --image-size alone for one resolution")
        if len(self.normalize) != 6 or not all(s > 0 for s in self.normalize[3:]):
            raise UserError(f"normalize takes six numbers MEAN,MEAN,MEAN,STD,STD,STD (R, G, B) with every std > 0, "
                            f"got {list(self.normalize)}; `python -m tools.stats DIR` prints a dataset's own")
        if not all(math.isfinite(v) for v in self.normalize):
            raise UserError(f"normalize values must be finite numbers, got {list(self.normalize)}")
        if not 0 < self.val_resize_ratio <= 1:
            raise UserError(f"val_resize_ratio must lie in (0, 1], got {self.val_resize_ratio}")
        # ranges the loaders cannot take (DALI and torchvision would fail mid-build)
        if not 0.0 <= self.color_jitter <= 1.0:  # brightness, contrast, saturation factors in [1 - cj, 1 + cj]
            raise UserError(f"color_jitter must lie in [0, 1] (0: off; the recipe's is 0.4), got {self.color_jitter}")
        if not 0 <= self.randaugment_magnitude <= RANDAUGMENT_MAX:
            raise UserError(f"randaugment_magnitude must lie in 0..{RANDAUGMENT_MAX} (0: off; e.g. 7 or 9), got "
                            f"{self.randaugment_magnitude}")
        if self.randaugment_layers < 1 or self.randaugment_magnitude_std < 0:
            raise UserError(f"randaugment_layers must be at least 1 and randaugment_magnitude_std not negative, got "
                            f"{self.randaugment_layers} and {self.randaugment_magnitude_std}")
        if self.trivial_augment and self.randaugment_magnitude > 0:
            raise UserError("trivial_augment and randaugment_magnitude are two automatic augmentation policies, one "
                            "per run: drop --trivial-augment or set --randaugment-magnitude 0")
        if not 0.0 <= self.random_erase <= 1.0:
            raise UserError(f"random_erase is a probability per image in [0, 1] (0: off; torchvision's recipe: 0.1), "
                            f"got {self.random_erase}")
        return self
