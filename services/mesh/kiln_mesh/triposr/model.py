"""The TripoSR model: image -> triplane scene code -> density and colour at any point."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812
from PIL import Image
from torch import Tensor, nn

from kiln_mesh.triposr.backbone import NeRFMLP, Transformer1D, Triplane1DTokenizer, TriplaneUpsampleNetwork
from kiln_mesh.triposr.config import TripoSRConfig
from kiln_mesh.triposr.vit import DINOImageTokenizer

__all__ = ["TripoSR"]


class TripoSR(nn.Module):
    """TripoSR, with the checkpoint's module tree.

    Submodules: `image_tokenizer`, `tokenizer`, `backbone`, `post_processor` and `decoder`, named as the
    checkpoint's key prefixes.

    Construction allocates parameters without meaningful values; use `kiln_mesh.triposr.load_triposr`
    to get a model with weights (it builds on the meta device, so nothing is initialised twice).
    All methods run without autograd.

    Args:
        config: The model configuration.
    """

    def __init__(self, config: TripoSRConfig) -> None:
        super().__init__()
        self.config = config
        self.image_tokenizer = DINOImageTokenizer(config.image_tokenizer.vit)
        self.tokenizer = Triplane1DTokenizer(config.tokenizer)
        self.backbone = Transformer1D(config.backbone)
        self.post_processor = TriplaneUpsampleNetwork(config.post_processor)
        self.decoder = NeRFMLP(config.decoder)

    @property
    def radius(self) -> float:
        """Half-side of the cube [-radius, radius]^3 the triplane spans, in world units."""
        return self.config.renderer.radius

    @property
    def device(self) -> torch.device:
        """Where the parameters live."""
        return self.tokenizer.embeddings.device

    @property
    def dtype(self) -> torch.dtype:
        """The parameters' dtype (queries compute in it and return float32)."""
        return self.tokenizer.embeddings.dtype

    def preprocess(self, images: Sequence[Image.Image]) -> Tensor:
        """Convert RGB images to the model input.

        Each image becomes float32 in [0, 1] (uint8 / 255) and is resized to cond_image_size square
        with bilinear interpolation, align_corners=False and antialias=True (the reference's settings;
        the aspect ratio is not kept, the framing step upstream makes images square). No clamping.

        Args:
            images: PIL images in mode RGB (background removal and grey compositing happen upstream).

        Returns:
            Pixels [B, 3, S, S], float32, on the CPU; `encode` moves them to the model.

        Raises:
            ValueError: No images, or an image is not RGB.
        """
        if not images:
            raise ValueError("preprocess needs at least one image")
        size = self.config.cond_image_size
        batch = []
        for index, image in enumerate(images):
            if image.mode != "RGB":
                raise ValueError(f"image {index} has mode {image.mode!r}; convert it to RGB first")
            array = np.array(image, dtype=np.uint8)  # a writable copy, [H, W, 3]
            pixels = torch.from_numpy(array).permute(2, 0, 1).unsqueeze(0).float() / 255.0
            batch.append(F.interpolate(pixels, size=(size, size), mode="bilinear", align_corners=False, antialias=True))
        return torch.cat(batch)

    def encode(self, pixels: Tensor) -> Tensor:
        """Image pixels to triplane scene codes.

        Args:
            pixels: [B, 3, S, S] with values in [0, 1] (from `preprocess`), any float dtype and device.

        Returns:
            Scene codes [B, 3, C, 2P, 2P] in the model's dtype, on its device (P = tokenizer.plane_size).

        Raises:
            ValueError: The pixels have the wrong shape.
        """
        size = self.config.cond_image_size
        if pixels.ndim != 4 or pixels.shape[1] != 3 or pixels.shape[2:] != (size, size):
            raise ValueError(f"expected pixels [B, 3, {size}, {size}], got {list(pixels.shape)}")
        with torch.no_grad():
            pixels = pixels.to(self.device)
            image_tokens = self.image_tokenizer(pixels)  # [B, 1 + patches, D]: the CLS token is context too
            tokens = self.tokenizer(pixels.shape[0])
            tokens = self.backbone(tokens, image_tokens)
            codes: Tensor = self.post_processor(self.tokenizer.detokenize(tokens))
        return codes

    def query(self, scene_code: Tensor, points: Tensor) -> tuple[Tensor, Tensor]:
        """Activated density and colour of one scene code at world-space points.

        No chunking happens here: memory grows with N (about 3 x C + several x n_neurons floats per point).

        Args:
            scene_code: One image's scene code [3, C, H, W] (from `encode`).
            points: [N, 3] world coordinates; points outside [-radius, radius]^3 see zero features.

        Returns:
            (density [N], rgb [N, 3]), float32: density = exp(raw + density_bias), rgb = sigmoid(raw) in (0, 1).
        """
        raw = self._raw(scene_code, points)
        density = torch.exp(raw[:, 0] + self.config.renderer.density_bias)
        return density, torch.sigmoid(raw[:, 1:4])

    def query_density(self, scene_code: Tensor, points: Tensor) -> Tensor:
        """Activated density only (no colour activation); equal to `query(...)[0]` bit for bit.

        Args:
            scene_code: One image's scene code [3, C, H, W].
            points: [N, 3] world coordinates.

        Returns:
            density [N], float32.
        """
        raw = self._raw(scene_code, points)
        return torch.exp(raw[:, 0] + self.config.renderer.density_bias)

    def triplane_features(self, scene_code: Tensor, points: Tensor) -> Tensor:
        """Per-point features [N, 3C] sampled from the three planes, in the scene code's dtype.

        Args:
            scene_code: One image's scene code [3, C, H, W].
            points: [N, 3] world coordinates.

        Returns:
            [plane 0 (x, y) | plane 1 (x, z) | plane 2 (y, z)] features per point.

        Raises:
            ValueError: Wrong shapes.
        """
        channels = self.config.post_processor.out_channels
        if scene_code.ndim != 4 or scene_code.shape[0] != 3 or scene_code.shape[1] != channels:
            raise ValueError(f"expected a scene code [3, {channels}, H, W], got {list(scene_code.shape)}")
        if points.ndim != 2 or points.shape[1] != 3:
            raise ValueError(f"expected points [N, 3], got {list(points.shape)}")
        count = points.shape[0]
        if count == 0:
            return scene_code.new_zeros((0, 3 * channels))
        r = self.radius
        # The reference's affine map [-r, r] -> [-1, 1], evaluated in its order, in float32.
        p = points.to(device=scene_code.device, dtype=torch.float32)
        u = ((p + r) / (r + r) * 2.0 - 1.0).to(scene_code.dtype)
        # grid_sample's last grid axis is (width = columns, height = rows): plane 0 samples x along columns
        # and y along rows, plane 1 (x, z), plane 2 (y, z).
        grid = torch.stack((u[:, [0, 1]], u[:, [0, 2]], u[:, [1, 2]])).unsqueeze(1)  # [3, 1, N, 2]
        sampled = F.grid_sample(scene_code, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        # [3, C, 1, N] -> [N, 3, C] -> [N, 3C]: concatenated plane-major (feature_reduction concat).
        return sampled[:, :, 0, :].permute(2, 0, 1).reshape(count, 3 * channels)

    def grid_density(self, scene_code: Tensor, resolution: int, start: int, stop: int) -> Tensor:
        """Activated density on rows `start:stop` (x index) of the marching-cubes grid, [stop-start, R, R].

        The same values as `query_density` at the grid points, computed in a way
        that uses the grid's structure: a grid point's plane-0 features depend on (x, y) only, plane 1
        on (x, z), plane 2 on (y, z), and the decoder's first layer is linear. So each plane is
        sampled once per 2-D grid position and projected through its third of the first layer, and
        the three projections are summed by broadcasting. That removes the per-point grid_sample
        and the widest matrix product; only the order of one sum changes (float rounding).
        """
        r = self.radius
        channels = self.config.post_processor.out_channels
        first = self.decoder.layers[0]
        assert isinstance(first, nn.Linear)
        device, dtype = scene_code.device, scene_code.dtype
        # The grid and the reference's affine map, both as the point path computes them.
        t = (torch.linspace(0.0, 1.0, resolution) * (r - (-r)) + (-r)).to(device)
        u = ((t + r) / (r + r) * 2.0 - 1.0).to(dtype)
        ux = u[start:stop]

        def plane(index: int, rows: Tensor, cols: Tensor) -> Tensor:
            # Sample plane `index` at every (col, row) pair -> [len(cols), len(rows), C] ... as (a, b, C)
            grid = torch.stack(torch.meshgrid(cols, rows, indexing="ij"), dim=-1)  # [A, B, 2] = (width, height)
            sampled = F.grid_sample(
                scene_code[index : index + 1], grid[None], mode="bilinear", padding_mode="zeros", align_corners=False
            )
            return sampled[0].permute(1, 2, 0)  # [A, B, C]

        weight = first.weight.to(dtype)
        w0, w1, w2 = weight[:, :channels], weight[:, channels : 2 * channels], weight[:, 2 * channels :]
        a = plane(0, u, ux) @ w0.T  # (x, y): [X, R, H]
        b = plane(1, u, ux) @ w1.T  # (x, z): [X, R, H]
        c = plane(2, u, u) @ w2.T  # (y, z): [R, R, H]
        hidden = a[:, :, None, :] + b[:, None, :, :] + c[None, :, :, :] + first.bias.to(dtype)
        out = self.decoder.layers[1:](hidden.reshape(-1, hidden.shape[-1]))
        density = torch.exp(out[:, 0].float() + self.config.renderer.density_bias)
        return density.reshape(stop - start, resolution, resolution)

    def _raw(self, scene_code: Tensor, points: Tensor) -> Tensor:
        with torch.no_grad():
            features = self.triplane_features(scene_code, points)
            # The MLP runs in the model dtype; activations in float32 (exp would overflow float16 early).
            raw: Tensor = self.decoder(features.to(self.dtype))
        return raw.float()
