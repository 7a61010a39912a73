"""Token mixers that timm's MetaFormer lacks, written to plug into `timm.models.metaformer.MetaFormer`.

timm's MetaFormer builds every token mixer as ``mixer_cls(dim=..., proj_drop=..., device=..., dtype=..., **kwargs)``
where ``kwargs`` are the *same* for every stage. Mixers whose size depends on the stage's token count (the frozen
random matrix and the spatial FC) therefore receive a ``token_counts`` mapping ``{stage width: H*W}`` and pick their
own entry by ``dim``; `build_metaformer` computes that mapping from ``img_size``.

All mixers here take and return NCHW maps, so they sit in the same stage layout as timm's `Pooling` and work with
the channel-first norms (GroupNorm1, LayerNorm2d, BatchNorm2d) used by the ablations.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from timm.models.metaformer import Attention
from torch import nn


def _stage_tokens(mixer: str, dim: int, token_counts: Mapping[int, int] | None) -> int:
    if not token_counts or dim not in token_counts:
        raise ValueError(
            f"{mixer} needs the token count (H*W) of its stage, but none was given for a stage of width {dim}. "
            "Build the model through build_metaformer(..., img_size=...) or timm.create_model(name, img_size=...)."
        )
    return int(token_counts[dim])


def _check_tokens(mixer: str, expected: int, x: torch.Tensor) -> None:
    h, w = x.shape[-2:]
    if h * w != expected:
        raise ValueError(
            f"{mixer} was built for {expected} tokens per image but got a {h}x{w} map ({h * w} tokens): "
            "its mixing matrix is tied to the input resolution. Rebuild the model with img_size equal to the "
            "size of the images you feed it."
        )


class RandomMixing(nn.Module):
    """Frozen global random token mixing ``X' = W_R X`` (PoolFormer Table 5, RandFormer in MetaFormer Baselines).

    ``W_R`` (N x N, N = H*W of the stage) is drawn from U[0, 1) and row-softmaxed, as in sail-sg/metaformer.
    It is kept as a persistent *buffer*, not a parameter: it is never trained, so keeping it out of
    ``parameters()`` keeps it away from optimizers and weight decay and makes parameter counts match the papers'
    tables (which list these frozen values separately), while ``state_dict()`` still carries it so a checkpoint
    restores the same mixing. The key ``random_matrix`` matches sail-sg's checkpoints.
    """

    random_matrix: torch.Tensor  # a registered buffer, declared for the type checker (nn.Module's getattr is loose)

    def __init__(
        self,
        dim: int,
        token_counts: Mapping[int, int] | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        **kwargs: object,  # MetaFormer's kwargs for the other mixers
    ) -> None:
        super().__init__()
        self.num_tokens = _stage_tokens("RandomMixing", dim, token_counts)
        self.register_buffer(
            "random_matrix", torch.empty(self.num_tokens, self.num_tokens, device=device, dtype=dtype)
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Draw a new random matrix (also used to materialise a model built on the meta device)."""
        with torch.no_grad():
            self.random_matrix.copy_(torch.rand_like(self.random_matrix).softmax(dim=-1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_tokens("RandomMixing", self.num_tokens, x)
        b, c, h, w = x.shape
        # (B, C, N) @ W_R^T mixes tokens with the same weights for every channel.
        return torch.matmul(x.flatten(2), self.random_matrix.t()).reshape(b, c, h, w)

    def extra_repr(self) -> str:
        return f"num_tokens={self.num_tokens}"


class SpatialMlp(nn.Module):
    """Spatial FC token mixer (PoolFormer Table 5 "SpatialFC"): one linear layer across the H*W tokens, shared by
    all channels, as in ResMLP. The paper uses a single FC layer here, hence no hidden layer or activation."""

    def __init__(
        self,
        dim: int,
        token_counts: Mapping[int, int] | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        **kwargs: object,  # MetaFormer's kwargs for the other mixers
    ) -> None:
        super().__init__()
        self.num_tokens = _stage_tokens("SpatialMlp", dim, token_counts)
        self.fc = nn.Linear(self.num_tokens, self.num_tokens, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_tokens("SpatialMlp", self.num_tokens, x)
        b, c, h, w = x.shape
        return self.fc(x.flatten(2)).reshape(b, c, h, w)


class DepthwiseConv(nn.Conv2d):
    """Depthwise convolution token mixer (PoolFormer Table 5 "Pooling -> Depthwise Convolution").

    Its kernel is the ablation's local window ``pool_size`` (3 by default), which is what keeps the row at the
    paper's 11.9 M parameters; a 7x7 kernel would add 0.17 M.
    """

    def __init__(
        self,
        dim: int,
        pool_size: int = 3,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        **kwargs: object,  # MetaFormer's kwargs for the other mixers
    ) -> None:
        super().__init__(
            dim, dim, kernel_size=pool_size, padding=pool_size // 2, groups=dim, device=device, dtype=dtype
        )


class Attention2d(nn.Module):
    """timm's MetaFormer `Attention` applied to an NCHW map.

    timm's MetaFormer switches a stage whose mixer subclasses `Attention` to (B, N, C) tensors, which then need a
    channels-last norm. Wrapping it instead keeps hybrid stages ([Pool, Pool, Attention, Attention]) in NCHW so
    they share the ablation's norm (GroupNorm1, BatchNorm2d, ...) with the pooling stages. Parameter count and
    MACs are those of timm's Attention (no qkv bias, as in CAFormer).
    """

    def __init__(
        self,
        dim: int,
        head_dim: int = 32,
        proj_drop: float = 0.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        **kwargs: object,  # MetaFormer's kwargs for the other mixers
    ) -> None:
        super().__init__()
        if dim % head_dim:
            raise ValueError(
                f"attention needs a stage width divisible by head_dim={head_dim}, got width {dim}; "
                "change dims or head_dim"
            )
        self.attn = Attention(dim, head_dim=head_dim, proj_drop=proj_drop, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        y = self.attn(x.flatten(2).transpose(1, 2))
        return y.transpose(1, 2).reshape(b, c, h, w)
