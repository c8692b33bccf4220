"""Tiled VAE encode/decode with memory bounded by the tile, without seams or colour shift.

A VAE run tile by tile normalises each tile with its own GroupNorm statistics, so tiles
come out in slightly different tones (diffusers' `enable_tiling` hides it with a cross-fade;
the tone shift stays). Here, as the A1111 Tiled VAE does in its fast mode, the GroupNorm
statistics are estimated once on a downsampled copy of the whole input and every tile is
normalised with those; each tile is padded (11 latent px for the decoder, 32 px for the
encoder) and only its centre is kept. The statistics live in the call (a structural copy of the
VAE whose GroupNorms read them, weights shared), never in the shared VAE's modules: two threads
decoding on one pipeline get the pixels each would get alone.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from asd_models.image_share import current_share
from asd_models.images import CoverCanvas
from asd_models.latent_scale import from_latents, to_latents
from asd_models.memory import release_free_heap

DECODER_PAD = 11  # latent pixels
ENCODER_PAD = 32  # image pixels


class _StatsSession:
    """GroupNorm statistics of one tiled encode or decode: recorded per GroupNorm (in call order)
    on the downsampled whole, then applied to every tile. Each call has its own session and its
    own structural copy of the VAE, so concurrent calls on one VAE never see each other's."""

    def __init__(self) -> None:
        self.record = True
        self.calls: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self.counters: dict[int, int] = {}

    def applying(self) -> None:
        self.record = False
        self.counters = {}


class _StatsGroupNorm(nn.Module):
    """GroupNorm whose statistics come from the session: recorded (one var_mean pass) or applied
    as one fused per-channel affine, x * scale + shift. Weight and bias are the original
    module's tensors, shared, not copied."""

    def __init__(self, norm: nn.GroupNorm, index: int, session: _StatsSession) -> None:
        super().__init__()
        self.num_groups, self.eps, self.affine = norm.num_groups, norm.eps, norm.affine
        self.weight, self.bias = norm.weight, norm.bias
        self.index, self.session = index, session

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c = x.shape[:2]
        s = self.session
        calls = s.calls.setdefault(self.index, [])
        if s.record:
            var, mean = torch.var_mean(x.float().reshape(n, self.num_groups, -1), dim=2, unbiased=False)
            calls.append((mean, var))
        else:
            i = s.counters.get(self.index, 0)
            s.counters[self.index] = i + 1
            mean, var = calls[i % len(calls)]
        per = c // self.num_groups  # per-group statistics, as per-channel scale and shift
        inv = torch.rsqrt(var + self.eps).repeat_interleave(per, dim=1)
        scale, shift = inv, -mean.repeat_interleave(per, dim=1) * inv
        if self.affine:
            scale, shift = scale * self.weight.float(), shift * self.weight.float() + self.bias.float()
        shape = (scale.shape[0], c) + (1,) * (x.ndim - 2)  # N x C x H x W, or N x C x L in attention blocks
        return torch.addcmul(shift.view(shape), x.float(), scale.view(shape)).to(x.dtype)


VaeT = TypeVar("VaeT", bound=nn.Module)


def _with_session(vae: VaeT, session: _StatsSession) -> VaeT:
    """A structural copy of `vae` (parameters and buffers shared, not copied) whose GroupNorms
    take their statistics from `session`: the VAE itself is never patched."""
    shared = {id(t): t for t in (*vae.parameters(), *vae.buffers())}
    twin = copy.deepcopy(vae, shared)
    norms = [(name, m) for name, m in twin.named_modules() if isinstance(m, nn.GroupNorm)]
    for index, (name, norm) in enumerate(norms):
        parent_name, _, attr = name.rpartition(".")
        setattr(
            twin.get_submodule(parent_name) if parent_name else twin,
            attr,
            _StatsGroupNorm(norm, index, session),
        )
    return twin


def _tiles(length: int, tile: int) -> list[tuple[int, int]]:
    return [(s, min(tile, length - s)) for s in range(0, length, tile)]


@torch.no_grad()
def tiled_decode(
    vae,
    latents: torch.Tensor,
    tile: int = 64,
    pad: int = DECODER_PAD,
    estimate_size: int = 128,
    out: np.ndarray | None = None,
    crop: tuple[int, int, int, int] | None = None,
    progress: Callable[[int, int], None] | None = None,
    whole_below: int = 0,
    release_heap: bool = False,
) -> np.ndarray:
    """Decode 1 x C x h x w (scaled) latents tile by tile into an H x W x 3 uint8 array.

    `out` may be a preallocated (e.g. memory-mapped) array: very large images go to disk
    without ever existing twice in memory. `crop` (left, top, right, bottom, pixels) writes
    only that window of the decoded image into `out`. Latents of at most `whole_below`
    pixels are decoded in one piece: the VAE's mid-block attention is global, so tiles can
    only approximate it (measured on the demo's tiny VAE at 1920x1088: mean error 3.1/255
    against a whole decode even with exact statistics). `release_heap`: on the CPU, give each
    tile's freed activations back to the system before the next (`release_free_heap`): a
    lower peak for 5-13 % more time a tile, for the outputs where memory is what counts.
    """
    f = 2 ** (len(vae.config.block_out_channels) - 1)
    z = from_latents(vae, latents)
    _, _, h, w = z.shape
    whole = h * w <= whole_below
    decoder = vae
    if whole:
        tile, pad = max(h, w), 0
    else:
        scale = min(1.0, estimate_size / max(h, w))
        small = F.interpolate(z, scale_factor=scale, mode="area") if scale < 1 else z
        session = _StatsSession()
        decoder = _with_session(vae, session)
        decoder.decode(small)
        session.applying()
    left, top, right, bottom = crop or (0, 0, w * f, h * f)
    if out is None:
        out = np.zeros((bottom - top, right - left, 3), dtype=np.uint8)
    boxes = [(y, th, x, tw) for y, th in _tiles(h, tile) for x, tw in _tiles(w, tile)]
    share = None if whole else current_share()  # with an image share: this rank's tiles, summed after
    mine = share.mine([th * tw for _, th, _, tw in boxes]) if share else [True] * len(boxes)
    for i, (y, th, x, tw) in enumerate(boxes):
        if not mine[i]:
            continue
        y0, y1, x0, x1 = max(0, y - pad), min(h, y + th + pad), max(0, x - pad), min(w, x + tw + pad)
        img = decoder.decode(z[:, :, y0:y1, x0:x1]).sample[0]
        core = img[:, (y - y0) * f : (y - y0 + th) * f, (x - x0) * f : (x - x0 + tw) * f]
        core = ((core.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
        # paste the part of this tile that falls inside the crop window
        py0, px0 = y * f, x * f
        cy0, cy1 = max(py0, top), min(py0 + th * f, bottom)
        cx0, cx1 = max(px0, left), min(px0 + tw * f, right)
        if cy1 > cy0 and cx1 > cx0:
            out[cy0 - top : cy1 - top, cx0 - left : cx1 - left] = core[
                cy0 - py0 : cy1 - py0, cx0 - px0 : cx1 - px0
            ]
        if release_heap and z.device.type == "cpu":
            release_free_heap()
        if progress:
            progress(i + 1, len(boxes))
    if share is not None:
        share.gather_pixels(out)
    return out


@torch.no_grad()
def tiled_encode(
    vae,
    image: torch.Tensor | CoverCanvas,
    tile: int = 512,
    pad: int = ENCODER_PAD,
    estimate_size: int = 1024,
    progress: Callable[[int, int], None] | None = None,
    whole_below: int = 0,
) -> torch.Tensor:
    """Encode 1 x 3 x H x W in [-1, 1] tile by tile to scaled latents (posterior mean).
    H and W must be multiples of the VAE factor; images of at most `whole_below` latent
    pixels are encoded in one piece. `image` may be a `CoverCanvas`, whose pixels are made
    tile by tile (the whole image never exists)."""
    f = 2 ** (len(vae.config.block_out_channels) - 1)
    region: Callable[[int, int, int, int], torch.Tensor]
    shrunk: Callable[[int, int], torch.Tensor]
    if isinstance(image, CoverCanvas):
        canvas = image

        def region(y0: int, y1: int, x0: int, x1: int) -> torch.Tensor:
            return canvas.region(y0, y1, x0, x1).to(vae.dtype)

        def shrunk(sh: int, sw: int) -> torch.Tensor:
            return canvas.resized(sh, sw).to(vae.dtype)

        device = canvas.source.device
    else:
        pixels_in = image.to(vae.dtype)

        def region(y0: int, y1: int, x0: int, x1: int) -> torch.Tensor:
            return pixels_in[:, :, y0:y1, x0:x1]

        def shrunk(sh: int, sw: int) -> torch.Tensor:
            return F.interpolate(pixels_in, size=(sh, sw), mode="area")

        device = pixels_in.device
    _, _, H, W = image.shape
    if H % f or W % f:
        raise ValueError(f"tiled_encode needs sides that are multiples of {f}, got {W}x{H}")
    if (H // f) * (W // f) <= whole_below:
        return to_latents(vae, vae.encode(region(0, H, 0, W)).latent_dist.mean.float())
    tile = max(f, tile // f * f)
    pad = -(-pad // f) * f
    scale = min(1.0, estimate_size / max(H, W))
    if scale < 1:
        small = shrunk(max(f, round(H * scale / f) * f), max(f, round(W * scale / f) * f))
    else:  # the whole input is no larger than the estimate size: its statistics are exact
        small = region(0, H, 0, W)
    session = _StatsSession()
    encoder = _with_session(vae, session)
    encoder.encode(small)
    session.applying()
    latents = torch.zeros(1, vae.config.latent_channels, H // f, W // f, device=device)
    boxes = [(y, th, x, tw) for y, th in _tiles(H, tile) for x, tw in _tiles(W, tile)]
    share = current_share()  # with an image share: this rank's tiles, all-reduced after
    mine = share.mine([th * tw for _, th, _, tw in boxes]) if share else [True] * len(boxes)
    for i, (y, th, x, tw) in enumerate(boxes):
        if not mine[i]:
            continue
        y0, y1, x0, x1 = max(0, y - pad), min(H, y + th + pad), max(0, x - pad), min(W, x + tw + pad)
        z = encoder.encode(region(y0, y1, x0, x1)).latent_dist.mean
        latents[:, :, y // f : (y + th) // f, x // f : (x + tw) // f] = z.float()[
            :, :, (y - y0) // f : (y - y0 + th) // f, (x - x0) // f : (x - x0 + tw) // f
        ]
        if progress:
            progress(i + 1, len(boxes))
    if share is not None:
        share.all_reduce(latents)
    return to_latents(vae, latents)
