"""Models as plain nn.Modules with a `body` (feature extractor) and an optional `head`.

Algorithms never hold a model's parameters in the module: they call `torch.func.functional_call`
with a parameter dict, so one model object serves every task and every adaptation step.
MLP, Conv4 (the MAML/ProtoNets papers') and ResNet-12 (MetaOptNet's and RFS's).
ANIL adapts only the `head.*` parameters; Prototypical Networks use the body alone.

BatchNorm normalises with the statistics of the batch it is given (the papers' transductive
protocol). `forward(x, stats_rows=n)` normalises the whole batch with the statistics of its first
`n` rows instead: called on [support; query], every query row is then normalised by the support
set's statistics alone and so does not depend on the other queries (`model.bn_stats: support`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.utils.checkpoint import checkpoint

from platform.config import EMBEDDING_ALGORITHMS, RunConfig

DROPBLOCK_SIZE = 5  # MetaOptNet's and RFS's block, in the 10x10 and 5x5 maps of stages 3-4 at 84x84


class Body(nn.Sequential):
    """A feature extractor whose normalising blocks take `stats_rows` (see the module docstring).

    `pixels` (task.mean, task.std) normalises the input images per channel first: constants of the
    run, kept as non-persistent buffers, so they are neither meta-parameters nor in a state dict;
    they travel in the run config (the checkpoint's), from which every learner builds its model.
    """

    def __init__(self, *layers: nn.Module, pixels: tuple[tuple[float, ...], tuple[float, ...]] | None = None):
        super().__init__(*layers)
        self.normalises_pixels = pixels is not None
        # model.recompute and model.precision (set by build_model): how the blocks run, not what they compute
        self.recompute, self.autocast_dtype = False, None
        if pixels is not None:
            for name, values in zip(("pixel_mean", "pixel_std"), pixels):
                self.register_buffer(name, torch.tensor(values).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor, stats_rows: int | None = None) -> torch.Tensor:
        if self.normalises_pixels:
            x = (x - self.pixel_mean) / self.pixel_std
        if self.autocast_dtype is None:
            return self._layers(x, stats_rows)
        with torch.autocast(x.device.type, self.autocast_dtype):
            return self._layers(x, stats_rows).to(x.dtype)  # the head and the losses in float32

    def _layers(self, x: torch.Tensor, stats_rows: int | None) -> torch.Tensor:
        for layer in self:
            if not isinstance(layer, (ConvBlock, ResidualBlock)):
                x = layer(x)
            elif self.recompute and torch.is_grad_enabled():
                x = _recomputed(layer, x, stats_rows)
            else:
                x = layer(x, stats_rows)
        return x


def _block_with(block: nn.Module, names: list[str], x: torch.Tensor, stats_rows: int | None, *weights: torch.Tensor):
    return functional_call(block, dict(zip(names, weights)), (x, stats_rows))


def _recomputed(block: nn.Module, x: torch.Tensor, stats_rows: int | None) -> torch.Tensor:
    """`block(x, stats_rows)` with only its input kept for the backward pass, which computes it again.
    Its weights are passed in explicitly: inside functional_call they are the caller's (adapted)
    tensors, which the recomputation, run after functional_call has put the module's own back, must
    use too. Non-reentrant checkpointing supports autograd.grad with create_graph (second order)."""
    names, weights = zip(*block.named_parameters())
    return checkpoint(_block_with, block, list(names), x, stats_rows, *weights, use_reentrant=False)


class MLP(nn.Module):
    """Two hidden ReLU layers (40 units each in the MAML paper's sinusoid experiment). Nothing in it
    normalises, so every row is computed on its own whatever `stats_rows` says."""

    def __init__(self, in_features: int, width: int, out_features: int | None, pixels=None):
        super().__init__()
        layers = (nn.Flatten(), nn.Linear(in_features, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU())
        self.body = Body(*layers, pixels=pixels)
        self.head = nn.Linear(width, out_features) if out_features else None

    def forward(self, x: torch.Tensor, stats_rows: int | None = None) -> torch.Tensor:
        features = self.body(x, stats_rows)
        return self.head(features) if self.head is not None else features

    def batched(self, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """`forward` for T tasks at once with the parameters given: x is (T, n, ...) and each parameter
        either shared (its own shape) or per task (a leading T); row t is task t's forward."""
        if self.body.normalises_pixels:
            x = (x - self.body.pixel_mean) / self.body.pixel_std
        x = x.flatten(2)  # the body's Flatten, per task
        layers = [(f"body.{i}", layer) for i, layer in enumerate(self.body)] + [("head", self.head)]
        for name, layer in layers:
            if isinstance(layer, nn.Linear):
                weight, bias = params[f"{name}.weight"], params[f"{name}.bias"]  # shared, or per task: baddbmm
                x = F.linear(x, weight, bias) if weight.dim() == 2 else torch.baddbmm(bias.unsqueeze(-2), x, weight.mT)
            elif isinstance(layer, nn.ReLU):
                x = F.relu(x)
        return x


class BatchNorm(nn.BatchNorm2d):
    """BatchNorm2d with the batch's statistics (no running averages, as in the MAML paper), always
    computed on NCHW memory: PyTorch's channels-last CPU kernel sums the statistics in fp32 in one
    pass, which measured ~1e-4 relative error on a 75-image query batch; the NCHW kernel is accurate."""

    def __init__(self, width: int):
        super().__init__(width, track_running_stats=False)

    def forward(self, x: torch.Tensor, stats_rows: int | None = None) -> torch.Tensor:
        # Under bf16 autocast (model.precision) the statistics in float32, as GPU kernels compute them
        # (CPU autocast would compute them in bfloat16).
        x = (x.float() if x.dtype == torch.bfloat16 else x).contiguous()
        if stats_rows is None:
            return super().forward(x)
        # Written out rather than F.batch_norm(training=False), which passes no gradient to the
        # statistics: here they are functions of the parameters (training with bn_stats: support).
        ref = x[:stats_rows]
        mean, variance = ref.mean((0, 2, 3), keepdim=True), ref.var((0, 2, 3), correction=0, keepdim=True)
        scale = self.weight.view(1, -1, 1, 1) * torch.rsqrt(variance + self.eps)
        return (x - mean) * scale + self.bias.view(1, -1, 1, 1)


class ConvBlock(nn.Sequential):
    """conv-BN-pool-ReLU; `stats_rows` goes to the BatchNorm."""

    def forward(self, x: torch.Tensor, stats_rows: int | None = None) -> torch.Tensor:
        conv, bn, pool, relu = self
        return relu(pool(bn(conv(x), stats_rows)))


def _conv_block(in_channels: int, width: int, block=ConvBlock) -> ConvBlock:
    # Pooling before the ReLU gives exactly the paper's conv-BN-ReLU-pool (ReLU is monotone, so it
    # commutes with max; gradients are identical too) with the ReLU on a quarter of the values.
    return block(nn.Conv2d(in_channels, width, 3, padding=1), BatchNorm(width), nn.MaxPool2d(2), nn.ReLU())


class ImageBlock(ConvBlock):
    """The first conv-BN-pool-ReLU block, on the input images, computed as one matrix product.

    With batch statistics, BatchNorm(conv(x)) at a pixel is an affine map of its centred 3x3 patch p:
        gamma_c * w_c . (p - mean(p)) / sqrt(w_c' Cov(p) w_c + eps) + beta_c
    and the patch mean and covariance depend on the images alone. So they are computed once, in
    float64, and one addmm writes the normalised 64-channel output (channels-last) instead of a
    convolution, a BatchNorm and their backward passes each sweeping the largest tensor of the
    network (15 MB for 75 query images): the same function and gradients, ~1.3x faster per task on
    CPU, and more accurate than fp32 BatchNorm. The conv bias cancels in BatchNorm; it stays in the
    graph so that its gradient is an exact zero rather than missing. With `stats_rows` the patch
    mean and covariance are those of the first `stats_rows` images' patches.
    """

    def forward(self, x: torch.Tensor, stats_rows: int | None = None) -> torch.Tensor:
        conv, bn, pool, relu = self
        n, _, height, width = x.shape
        patches = F.unfold(x, conv.kernel_size, padding=conv.padding).transpose(1, 2).reshape(n * height * width, -1)
        patches = patches.double()
        rows = (n if stats_rows is None else stats_rows) * height * width
        patches = patches - patches[:rows].mean(0)
        covariance = patches[:rows].T @ patches[:rows] / rows
        weight = conv.weight.flatten(1)
        weight64 = weight.double()
        variance = ((weight64 @ covariance) * weight64).sum(1).to(x.dtype)
        weight = weight * (bn.weight * torch.rsqrt(variance + bn.eps)).unsqueeze(1)
        out = torch.addmm(bn.bias + (conv.bias - conv.bias), patches.to(x.dtype), weight.T)
        out = out.view(n, height, width, -1).permute(0, 3, 1, 2)  # NCHW view of channels-last memory
        return relu(pool(out))  # channels-last: the next convolution is fastest on it


class Conv4(nn.Module):
    """The 4-block convolutional network of the MAML and ProtoNets papers: 28x28 Omniglot -> 1x1 x width
    features; 84x84 miniImageNet (the MAML paper's 32 filters) -> 5x5 x width, flattened."""

    def __init__(self, in_channels: int, width: int, out_features: int | None, image_size: int = 28, pixels=None):
        super().__init__()
        self.body = Body(
            _conv_block(in_channels, width, ImageBlock),
            _conv_block(width, width),
            _conv_block(width, width),
            _conv_block(width, width),
            nn.Flatten(),
            pixels=pixels,
        )
        features = width * (image_size // 2**4) ** 2  # four 2x2 poolings, each rounding down
        self.head = nn.Linear(features, out_features) if out_features else None

    def forward(self, x: torch.Tensor, stats_rows: int | None = None) -> torch.Tensor:
        features = self.body(x, stats_rows)
        return self.head(features) if self.head is not None else features


def resnet12_widths(width: int) -> tuple[int, int, int, int]:
    """The 4 stages' channels: MetaOptNet's and RFS's 64-160-320-640 for width 64, in those proportions."""
    return (width, int(2.5 * width), 5 * width, 10 * width)


class ResidualBlock(nn.Module):
    """One ResNet-12 stage (MetaOptNet, RFS): 3 x conv3x3-BN with LeakyReLU(0.1) after the first two, plus a
    1x1 conv-BN shortcut, then LeakyReLU and a 2x2 max-pool. Convolutions have no bias (BN follows).
    `stats_rows` goes to every BatchNorm."""

    def __init__(self, in_channels: int, width: int, drop_rate: float = 0.0, drop_blocks: bool = False):
        super().__init__()
        self.drop_rate, self.drop_blocks = drop_rate, drop_blocks
        self.convs = nn.ModuleList(nn.Conv2d(c, width, 3, padding=1, bias=False) for c in (in_channels, width, width))
        self.norms = nn.ModuleList(BatchNorm(width) for _ in range(3))
        self.shortcut = nn.Conv2d(in_channels, width, 1, bias=False)
        self.shortcut_norm = BatchNorm(width)

    def forward(self, x: torch.Tensor, stats_rows: int | None = None) -> torch.Tensor:
        out = x
        for i, (conv, norm) in enumerate(zip(self.convs, self.norms)):
            out = norm(conv(out), stats_rows)
            out = F.leaky_relu(out, 0.1) if i < 2 else out
        out = out + self.shortcut_norm(self.shortcut(x), stats_rows)
        out = F.max_pool2d(F.leaky_relu(out, 0.1), 2)
        if not (self.training and self.drop_rate):
            return out
        return drop_block(out, self.drop_rate) if self.drop_blocks else F.dropout(out, self.drop_rate)


def drop_block(x: torch.Tensor, rate: float, size: int = DROPBLOCK_SIZE) -> torch.Tensor:
    """DropBlock (Ghiasi et al. 2018) as MetaOptNet has it: block centres drawn where a whole block fits,
    with the rate scaled so that about `rate` of the map is dropped, each centre zeroing a size x size
    block; what is kept is scaled by (all / kept) over the batch, so the mean is unchanged. Draws from
    torch's RNG."""
    _, _, height, width = x.shape
    size = min(size, height, width)
    fits = (height - size + 1) * (width - size + 1)
    gamma = rate / size**2 * height * width / fits
    centres = torch.rand(*x.shape[:2], height - size + 1, width - size + 1, device=x.device) < gamma
    dropped = F.max_pool2d(F.pad(centres.to(x.dtype), [size - 1] * 4), size, stride=1)
    keep = 1 - dropped
    return x * keep * (keep.numel() / keep.sum().clamp(min=1))


@contextlib.contextmanager
def drawing_masks(model: nn.Module, seed: int | None, device: torch.device) -> Iterator[None]:
    """One training computation (a task's forward and backward passes, a pre-training step) with the
    model's training-time masks (dropout, DropBlock; a model without them: nothing changes), drawn from
    torch's RNG seeded by `seed` (a task's own seed), so they are a function of the task like its
    images: the same on any worker. Outside, the model is in eval mode (build_model), without masks:
    meta-test, adaptation and serving are deterministic."""
    if not getattr(model, "drop_rate", 0.0):
        yield
        return
    if seed is None:
        raise ValueError("model.dropblock draws a task's masks from its seed: this task has none")
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        model.train()
        try:
            yield
        finally:
            model.eval()


class ResNet12(nn.Module):
    """ResNet-12 (MetaOptNet, RFS): 4 residual stages of `resnet12_widths(width)` channels, each halving the
    image, then the average over the remaining map (5x5 at 84x84): 10 x width features at any input size."""

    def __init__(self, in_channels: int, width: int, out_features: int | None, pixels=None, drop_rate: float = 0.0):
        super().__init__()
        self.drop_rate = drop_rate
        widths = resnet12_widths(width)
        ins = (in_channels, *widths[:-1])
        stages = [ResidualBlock(c, w, drop_rate, drop_blocks=i >= 2) for i, (c, w) in enumerate(zip(ins, widths))]
        self.body = Body(*stages, nn.AdaptiveAvgPool2d(1), nn.Flatten(), pixels=pixels)
        self.head = nn.Linear(widths[-1], out_features) if out_features else None

    def forward(self, x: torch.Tensor, stats_rows: int | None = None) -> torch.Tensor:
        features = self.body(x, stats_rows)
        return self.head(features) if self.head is not None else features


def build_model(config: RunConfig) -> nn.Module:
    """The model a run config asks for. Parameters are initialised from torch's global RNG."""
    t, m = config.task, config.model
    out = 1 if t.kind == "sinusoid" else t.ways
    if config.algorithm in EMBEDDING_ALGORITHMS:
        out = None  # prototypes and probes live in the embedding space (pretrain's own head: platform/pretrain.py)
    if t.kind == "sinusoid":
        model = MLP(1, m.width, out)
    else:
        pixels = None if t.mean is None else (t.mean, t.std)
        channels, size = t.image_format.channels, t.image_format.size
        if m.kind == "mlp":
            model = MLP(channels * size * size, m.width, out, pixels)
        elif m.kind == "resnet12":
            model = ResNet12(channels, m.width, out, pixels, m.dropblock)
        else:
            model = Conv4(channels, m.width, out, size, pixels)
    model.body.recompute = m.recompute
    model.body.autocast_dtype = torch.bfloat16 if m.precision == "bf16" else None
    return model.eval()  # training-time masks only inside drawing_masks
