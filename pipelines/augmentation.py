"""The one augmentation spec: what every loader (DALI GPU and CPU, the torchvision baseline) does to an image,
and the normalisation the TensorBoard image grid undoes. Defined once, read by all of them.

The defaults are the 90-epoch ResNet-50 recipe's: RandomResizedCrop (area 8-100%, aspect ratio 3/4-4/3), a
horizontal flip with p = 0.5, colour jitter 0.4, ImageNet mean and std; validation resizes the shorter side
to image_size / 0.875 (256 for 224) and centre crops.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# ImageNet statistics on 0-1 pixels (DALI works on 0-255 and scales them)
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


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
    repeated_aug: int = opt(1, "each image k times per epoch's stream, augmented independently (DALI loaders)")
    val_resize_ratio: float = opt(0.875, "validation: resize shorter side to image_size / ratio, centre crop")

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
        if not 0 < self.val_resize_ratio <= 1:
            raise UserError(f"val_resize_ratio must lie in (0, 1], got {self.val_resize_ratio}")
        return self
