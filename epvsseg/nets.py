"""Networks for ePVS segmentation, and the explicit architecture registry.

The shipped model is a lightweight 2.5D multi-channel U-Net (the seed study, Rashid
et al. 2023, used a 2D multi-channel U-Net on axial slices). Its input for one axial
slice ``k`` is, for every sequence of :data:`SEQUENCES` in order, the slices
``k - c ... k + c`` (``c`` = context), followed by one constant presence channel per
sequence (1 if the sequence was given, else 0, its image channels then being zeros).
One network thus serves every sequence combination (trained with modality dropout).

Tensor layout at the network edge: axial slices of an ``(I, J, K)`` volume (nibabel
voxel order, RAS+ after conforming) are fed as ``(batch, channels, I, J)``, the same
layout in training and inference, so no transpose happens anywhere.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

#: Sequence order of the input channels of every shipped model.
SEQUENCES: tuple[str, ...] = ("T2w", "T1w", "FLAIR", "SWI")


def n_input_channels(context: int, sequences: Sequence[str] = SEQUENCES) -> int:
    """Input channels of a 2.5D model: ``(2 * context + 1)`` slices per sequence + one presence flag each."""
    return len(sequences) * (2 * context + 1) + len(sequences)


#: Layer types per number of spatial dimensions: convolution, batch norm, max pooling, transposed convolution.
_LAYERS = {2: (nn.Conv2d, nn.BatchNorm2d, nn.MaxPool2d, nn.ConvTranspose2d),
           3: (nn.Conv3d, nn.BatchNorm3d, nn.MaxPool3d, nn.ConvTranspose3d)}


class _Block(nn.Sequential):
    """Two (conv 3 - batch norm - leaky ReLU) layers in ``dims`` spatial dimensions."""

    def __init__(self, cin: int, cout: int, dims: int = 2):
        conv, norm = _LAYERS[dims][:2]
        super().__init__(
            conv(cin, cout, 3, padding=1, bias=False),
            norm(cout),
            nn.LeakyReLU(0.01, inplace=True),
            conv(cout, cout, 3, padding=1, bias=False),
            norm(cout),
            nn.LeakyReLU(0.01, inplace=True),
        )


class _UNet(nn.Module):
    """The U-Net shared by :class:`UNet2D` and :class:`UNet3D`; ``dims`` picks the layer types.

    Parameter names (``down``, ``up``, ``dec``, ``head``) are those of the shipped weights files.
    """

    dims = 2

    def __init__(self, in_channels: int, base: int, depth: int):
        super().__init__()
        conv, _, pool, upconv = _LAYERS[self.dims]
        self.depth = depth
        widths = [base * 2**i for i in range(depth + 1)]
        self.down = nn.ModuleList()
        cin = in_channels
        for w in widths:
            self.down.append(_Block(cin, w, self.dims))
            cin = w
        self.pool = pool(2)
        self.up = nn.ModuleList()
        self.dec = nn.ModuleList()
        for w_low, w in zip(widths[::-1][:-1], widths[::-1][1:]):
            self.up.append(upconv(w_low, w, 2, stride=2))
            self.dec.append(_Block(2 * w, w, self.dims))
        self.head = conv(widths[0], 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        skips = []
        for i, block in enumerate(self.down):
            x = block(x)
            if i < self.depth:
                skips.append(x)
                x = self.pool(x)
        for up, dec, skip in zip(self.up, self.dec, skips[::-1]):
            x = dec(torch.cat([up(x), skip], dim=1))
        return self.head(x)


class UNet2D(_UNet):
    """A small 2D U-Net returning one logit map (ePVS vs background).

    Parameters
    ----------
    in_channels : int
        Input channels (see :func:`n_input_channels`).
    base : int
        Feature maps at full resolution; doubled at each of the ``depth`` down-steps.
    depth : int
        Number of 2x down-samplings. Input height and width must be multiples of ``2**depth``
        (:func:`pad_to_multiple` does that).

    Notes
    -----
    Input ``(N, in_channels, H, W)`` float32; output ``(N, 1, H, W)`` logits.
    """

    dims = 2

    def __init__(self, in_channels: int, base: int = 16, depth: int = 3):
        super().__init__(in_channels, base, depth)


class UNet3D(_UNet):
    """A small 3D U-Net on whole-volume patches, returning one logit map (ePVS vs background).

    The 3D counterpart of :class:`UNet2D`, used to compare the two designs
    (``benchmarks/arch_compare.py``, ``docs/architecture_choice.md``). Its input carries the same
    information as the 2.5D input, as volumes: one channel per sequence of :data:`SEQUENCES`
    (normalised image, zeros when the sequence is missing), then one constant presence channel per
    sequence, ``2 * len(SEQUENCES)`` = 8 channels (`benchmarks/infer3d.py::stack_channels_3d`).

    Parameters
    ----------
    in_channels : int
        Input channels (8 for the four sequences + presence flags).
    base : int
        Feature maps at full resolution; doubled at each of the ``depth`` down-steps.
    depth : int
        Number of 2x down-samplings (all three axes). Every spatial size must be a multiple of
        ``2**depth`` (`benchmarks/infer3d.py::predict_volume` tiles and pads to that).

    Notes
    -----
    Input ``(N, in_channels, I, J, K)`` float32 in nibabel voxel order; output ``(N, 1, I, J, K)`` logits.
    """

    dims = 3

    def __init__(self, in_channels: int = 2 * len(SEQUENCES), base: int = 8, depth: int = 3):
        super().__init__(in_channels, base, depth)


class Ensemble(nn.Module):
    """Several networks of one architecture whose logits are averaged (a mean of trained models).

    Parameters
    ----------
    member : str
        The members' registered architecture (not ``ensemble``).
    member_kwargs : dict
        Their keyword arguments (one architecture, so one input layout and one padding rule).
    members : int
        How many; their parameters are ``members.0.*``, ``members.1.*``, ... in the weights file.

    Notes
    -----
    The members run one after the other on the same input, so an ensemble of ``n`` takes about ``n`` times
    one member's time and no more memory than one member's activations at a time.
    """

    def __init__(self, member: str, member_kwargs: dict, members: int):
        super().__init__()
        if member == "ensemble" or members < 2:
            raise ValueError(f"an ensemble needs >= 2 members of a plain architecture, got {members} x {member!r}")
        self.members = nn.ModuleList(build(member, **member_kwargs) for _ in range(members))
        self.depth = max(getattr(m, "depth", 0) for m in self.members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return torch.stack([m(x) for m in self.members]).mean(dim=0)


#: Explicit architecture registry: name -> class (``model.json`` names one).
ARCHITECTURES: dict[str, type[nn.Module]] = {"unet2d": UNet2D, "unet3d": UNet3D, "ensemble": Ensemble}


def build(architecture: str, **kwargs) -> nn.Module:
    """Instantiate a registered architecture with its keyword arguments."""
    try:
        cls = ARCHITECTURES[architecture]
    except KeyError:
        raise ValueError(f"unknown architecture {architecture!r}; known: {sorted(ARCHITECTURES)}") from None
    return cls(**kwargs)


def pad_to_multiple(x: torch.Tensor, multiple: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """Zero-pad the last two axes of ``x`` up to multiples of ``multiple``; return the padded tensor and the
    original (H, W) to crop back to."""
    h, w = x.shape[-2:]
    ph = (-h) % multiple
    pw = (-w) % multiple
    if ph or pw:
        x = torch.nn.functional.pad(x, (0, pw, 0, ph))
    return x, (h, w)
