"""RandAugment on a uint8 device batch, with timm's semantics and string grammar.

RandAugment: Cubuk et al., arXiv 1909.13719. timm's variant (timm 1.0, `timm/data/auto_augment.py`,
Ross Wightman): each image draws `n` ops with replacement, each applied with probability p at a
magnitude drawn from N(m, mstd) clamped to [0, mmax], with a random sign for signed ops; the
"increasing" op set (inc1) is the one ResNet Strikes Back uses (A3: 'rand-m6-mstd0.5-inc1').
With timm's default interpolation ('random'), every geometric op picks bilinear or bicubic at random.

timm runs this image by image with PIL on the CPU. Here every image still draws its own ops on the
host (numpy, seeded from the optional `torch.Generator`), the draws become one (batch, layers x
`ops.NUM_COLUMNS`) float64 array that reaches the device in one pinned, non-blocking copy, and each
layer runs the same kernels whatever was drawn (see `ops.apply_layer`): the cheap ones over the whole
batch, the costly ones over a fixed number of listed images. So a call never synchronises with the
host (given a CPU generator or none) and can be compiled.
"""
from __future__ import annotations

import math
import re
from typing import Sequence

import numpy as np
import torch

from . import kernels
from .ops import (LEVEL_DENOM, NUM_COLUMNS, OPS, TIMM_FILL, INTERPOLATIONS, Stages, apply_layer, check_images,
                  device_constants, fill_values, host_rng, layer_columns, lookup_op, memory_format, op_stages,
                  stage_capacity, stage_indices, to_device)

RAND_OPS = (  # timm's _RAND_TRANSFORMS (inc0)
    "AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "SolarizeAdd", "Color",
    "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel",
)
RAND_INCREASING_OPS = (  # timm's _RAND_INCREASING_TRANSFORMS (inc1), the RSB set
    "AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing", "SolarizeIncreasing",
    "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing",
    "SharpnessIncreasing", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel",
)

RAND_AUGMENT_GRAMMAR = (
    "rand[-m<magnitude>][-n<ops per image>][-mstd<magnitude std>][-mmax<magnitude max>]"
    "[-p<op probability>][-inc<0|1>], e.g. 'rand-m6-mstd0.5-inc1' (timm's grammar; the 't' transform-set "
    "token is not supported)"
)


class RandAugment:
    """timm's RandAugment, batched: each image draws `num_ops` ops with replacement, each applied with
    probability `prob` at magnitude N(magnitude, magnitude_std) clamped to [0, magnitude_max], with a
    random sign for signed ops. magnitude_std=inf samples uniformly in [0, magnitude], as timm does.
    `fill`: the colour outside a warped image (timm's create_transform: the ImageNet mean as uint8).
    `interpolation`: 'random' (bilinear or bicubic per image and application, timm's default),
    'bilinear', 'bicubic' or 'nearest'.
    """

    def __init__(self, ops: Sequence[str] = RAND_INCREASING_OPS, num_ops: int = 2, magnitude: float = 10.0,
                 magnitude_std: float = 0.0, magnitude_max: float = LEVEL_DENOM, prob: float = 0.5,
                 fill: int | Sequence[int] = TIMM_FILL, interpolation: str = "random", translate_pct: float = 0.45):
        self.ops = tuple(ops)
        for name in self.ops:
            lookup_op(name)
        if not self.ops:
            raise ValueError("RandAugment needs at least one op")
        if num_ops < 0 or int(num_ops) != num_ops:
            raise ValueError(f"num_ops must be a non-negative integer, got {num_ops!r}")
        if not 0.0 <= prob <= 1.0:
            raise ValueError(f"prob must be in [0, 1], got {prob!r}")
        if magnitude < 0 or magnitude_std < 0 or magnitude_max <= 0:
            raise ValueError("magnitude and magnitude_std must be >= 0 and magnitude_max > 0, got "
                             f"{magnitude!r}, {magnitude_std!r}, {magnitude_max!r}")
        if interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, got {interpolation!r}")
        self.fill = fill_values(fill)
        self.num_ops = int(num_ops)
        self.magnitude = float(magnitude)
        self.magnitude_std = float(magnitude_std)
        self.magnitude_max = float(magnitude_max)
        self.prob = float(prob)
        self.interpolation = interpolation
        self.translate_pct = float(translate_pct)
        self.stages = Stages.of(self.ops, self.prob)
        self._signed = np.array([OPS[name].signed for name in self.ops])
        # per layer, the chance that an image needs each costly stage (`ops.STAGES`): the op draw is uniform
        needs = np.array([op_stages(OPS[name]) for name in self.ops], dtype=np.float64)
        self._stage_p = tuple(self.prob * needs.mean(axis=0))

    @classmethod
    def from_timm(cls, config: str, **kwargs) -> "RandAugment":
        """Parse timm's string, e.g. 'rand-m6-mstd0.5-inc1' (RSB A3) or 'rand-m7-mstd0.5-inc1' (A1/A2).

        Defaults as in timm's rand_augment_transform: m10, n2, p0.5, mstd0, mmax10, inc0; mstd above
        100 means uniform magnitudes. `kwargs` (fill, interpolation, translate_pct) go to __init__.
        """
        if not isinstance(config, str):
            raise ValueError(f"RandAugment config must be a string in the grammar {RAND_AUGMENT_GRAMMAR}")
        tokens = config.split("-")
        if tokens[0] != "rand":
            raise ValueError(f"RandAugment config {config!r} must start with 'rand'; grammar: {RAND_AUGMENT_GRAMMAR}")
        params = dict(magnitude=LEVEL_DENOM, num_ops=2, prob=0.5, magnitude_std=0.0, magnitude_max=LEVEL_DENOM)
        increasing = False
        keys = {"m": "magnitude", "n": "num_ops", "p": "prob", "mstd": "magnitude_std", "mmax": "magnitude_max"}
        for token in tokens[1:]:
            match = re.fullmatch(r"(mstd|mmax|inc|m|n|p)(\d+(?:\.\d*)?|\.\d+)", token)
            if match is None:
                raise ValueError(f"bad RandAugment token {token!r} in {config!r}; grammar: {RAND_AUGMENT_GRAMMAR}")
            key, value = match.group(1), float(match.group(2))
            if key == "inc":
                if value not in (0.0, 1.0):
                    raise ValueError(f"bad RandAugment token {token!r}: inc takes 0 or 1; grammar: {RAND_AUGMENT_GRAMMAR}")
                increasing = bool(value)
            elif key == "n":
                if value != int(value):
                    raise ValueError(f"bad RandAugment token {token!r}: n takes an integer; grammar: {RAND_AUGMENT_GRAMMAR}")
                params["num_ops"] = int(value)
            elif key == "p" and value > 1:
                raise ValueError(f"bad RandAugment token {token!r}: p is a probability; grammar: {RAND_AUGMENT_GRAMMAR}")
            elif key == "mstd":
                params["magnitude_std"] = math.inf if value > 100 else value  # timm: > 100 means uniform
            elif key == "mmax":
                params["magnitude_max"] = value if value > 0 else LEVEL_DENOM  # timm: `mmax or 10`
            else:
                params[keys[key]] = value
        ops = RAND_INCREASING_OPS if increasing else RAND_OPS
        return cls(ops=ops, **params, **kwargs)

    def __repr__(self) -> str:
        return (f"RandAugment(n={self.num_ops}, m={self.magnitude}, mstd={self.magnitude_std}, "
                f"mmax={self.magnitude_max}, p={self.prob}, interpolation={self.interpolation}, "
                f"fill={self.fill}, ops={list(self.ops)})")

    @property
    def num_columns(self) -> int:
        """Width of `pack`'s array: NUM_COLUMNS per layer."""
        return self.num_ops * NUM_COLUMNS

    def sample_params(self, batch_size: int, generator: torch.Generator | None = None,
                      rng: np.random.Generator | None = None) -> dict[str, np.ndarray]:
        """Draw every image's ops on the host. Returns (batch_size, num_ops) arrays:
        op_index (into self.ops), applied (bool), magnitude (clamped, signed for signed ops; 0 where not
        applied), negated (bool, the random sign; False for unsigned ops), bicubic (bool: the
        interpolation of a geometric op; a coin per draw when interpolation is 'random')."""
        rng = rng if rng is not None else host_rng(generator)
        shape = (batch_size, self.num_ops)
        op_index = rng.integers(0, len(self.ops), size=shape)
        applied = rng.random(shape) < self.prob
        if math.isinf(self.magnitude_std):
            magnitude = rng.uniform(0.0, self.magnitude, size=shape)
        elif self.magnitude_std > 0:
            magnitude = rng.normal(self.magnitude, self.magnitude_std, size=shape)
        else:
            magnitude = np.full(shape, self.magnitude)
        magnitude = np.clip(magnitude, 0.0, self.magnitude_max)
        negated = (rng.random(shape) < 0.5) & self._signed[op_index]
        magnitude = np.where(negated, -magnitude, magnitude) * applied
        if self.interpolation == "random":
            bicubic = rng.random(shape) < 0.5  # timm: random.choice((BILINEAR, BICUBIC)) per application
        else:
            bicubic = np.full(shape, self.interpolation == "bicubic")
        return dict(op_index=op_index, applied=applied, magnitude=magnitude, negated=negated & applied,
                    bicubic=bicubic)

    def capacities(self, batch: int) -> tuple[int, ...]:
        """How many images each costly stage (`ops.STAGES`) works on in a layer, for this batch size."""
        return tuple(stage_capacity(batch, p) for p in self._stage_p)

    def pack(self, params: dict[str, np.ndarray], height: int, width: int) -> tuple[np.ndarray, tuple]:
        """Drawn params -> ((batch, num_columns) float64, layer after layer, and the caps of each layer's
        costly stages): what the device part reads. The caps are `capacities(batch)`, except for a stage
        whose list is longer this call (probability about 1e-9), which then takes the whole batch."""
        op_index = params["op_index"]
        if op_index.ndim != 2 or op_index.shape[1] != self.num_ops:
            raise ValueError(f"params are for {op_index.shape[1:]} layers, this RandAugment has {self.num_ops}")
        batch = op_index.shape[0]
        nominal = self.capacities(batch)
        layers, caps = [], []
        for i in range(self.num_ops):
            rows = layer_columns(self.ops, op_index[:, i], params["applied"][:, i], params["magnitude"][:, i],
                                 params["bicubic"][:, i], height, width, self.translate_pct)
            caps.append(stage_indices(rows, nominal))
            layers.append(rows)
        return (np.concatenate(layers, axis=1) if layers else np.zeros((batch, 0))), tuple(caps)

    def constants(self, device: torch.device, height: int, width: int) -> dict:
        """The device tensors a call at this size needs (made once per device and size, then reused)."""
        return device_constants(device, height, width, self.fill)

    def apply_packed(self, images: torch.Tensor, packed: torch.Tensor, caps: tuple,
                     consts: dict | None = None) -> torch.Tensor:
        """The device part: uint8 images and `pack`'s array (on their device) and caps -> uint8 images.
        The same kernels run whatever the draws (for given caps); no host synchronisation. `consts`:
        `constants(...)`, passed in by a compiled caller so that the compiled code never fills the cache."""
        _, _, h, w = images.shape
        consts = consts if consts is not None else self.constants(images.device, h, w)
        out = images.clone() if self.num_ops == 0 else images
        for layer in range(self.num_ops):
            cols = packed[:, layer * NUM_COLUMNS:(layer + 1) * NUM_COLUMNS]
            out = apply_layer(out, cols, self.stages, consts, self.interpolation, caps[layer])
        return out.contiguous(memory_format=memory_format(images))

    def apply_params(self, images: torch.Tensor, params: dict[str, np.ndarray]) -> torch.Tensor:
        """Apply drawn params (from `sample_params`): one host-to-device copy, then `apply_packed`."""
        check_images(images, "RandAugment", uint8=True)
        batch, _, h, w = images.shape
        if params["op_index"].shape[0] != batch:
            raise ValueError(f"params are for a batch of {params['op_index'].shape[0]}, images batch is {batch}")
        packed, caps = self.pack(params, h, w)
        with kernels.cpu_threads(images.device):
            return self.apply_packed(images, to_device(packed, images.device), caps)

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None = None,
                 rng: np.random.Generator | None = None) -> torch.Tensor:
        check_images(images, "RandAugment", uint8=True)
        return self.apply_params(images, self.sample_params(images.shape[0], generator, rng))
