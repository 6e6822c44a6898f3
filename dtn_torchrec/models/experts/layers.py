"""Dense building blocks with the reference (Keras / tf.contrib) initialisation.

Every parameter-owning module here implements ``reset_parameters`` with that init, because
``DistributedModelParallel`` materialises meta-device modules by calling each module's own
``reset_parameters``: a plain ``nn.Linear`` would silently get PyTorch's Kaiming init instead.
"""

from __future__ import annotations

from typing import List, Optional

import torch
from torch import nn

_INITS = {
    "glorot_normal": nn.init.xavier_normal_,
    "glorot_uniform": nn.init.xavier_uniform_,
}


def init_dense_weight(weight: torch.Tensor, init: str) -> None:
    """Fills a ``[out, in]`` kernel in place with :class:`Dense`'s ``init``."""
    if init not in _INITS:
        raise ValueError(f"Dense init must be one of {sorted(_INITS)}, got {init!r}")
    _INITS[init](weight)


class Dense(nn.Linear):
    """``nn.Linear`` with a Glorot kernel and a zero bias (Keras ``Dense`` defaults).

    Args:
        in_features (int): input width.
        out_features (int): output width.
        bias (bool): add a bias. Default: True.
        init (str): ``"glorot_normal"`` or ``"glorot_uniform"``. Default: ``"glorot_normal"``.
        device (Optional[torch.device]): where the parameters live (meta allowed).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        init: str = "glorot_normal",
        device: Optional[torch.device] = None,
    ) -> None:
        if init not in _INITS:
            raise ValueError(f"Dense init must be one of {sorted(_INITS)}, got {init!r}")
        # Set before nn.Linear.__init__, which calls reset_parameters.
        self.init = init
        super().__init__(in_features, out_features, bias=bias, device=device)

    def reset_parameters(self) -> None:
        init_dense_weight(self.weight, self.init)
        if self.bias is not None:
            nn.init.zeros_(self.bias)


class DenseStack(nn.Module):
    """``Dense -> ReLU [-> Dropout]`` for each width in ``dims``.

    Args:
        in_features (int): input width.
        dims (List[int]): layer widths; the output has width ``dims[-1]``.
        dropout (float): dropout after every ReLU. Default: 0.
        init (str): kernel init of every layer. Default: ``"glorot_normal"``.
        device (Optional[torch.device]): where the parameters live.
    """

    def __init__(
        self,
        in_features: int,
        dims: List[int],
        dropout: float = 0.0,
        init: str = "glorot_normal",
        device: Optional[torch.device] = None,
    ) -> None:
        super().__init__()
        if not dims:
            raise ValueError("DenseStack needs at least one layer width")
        layers: List[nn.Module] = []
        for width in dims:
            layers.append(Dense(in_features, width, init=init, device=device))
            layers.append(nn.ReLU())
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            in_features = width
        self.layers = nn.Sequential(*layers)
        self.output_dim = dims[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x: ``[B, in_features]``. Returns: ``[B, dims[-1]]``."""
        return self.layers(x)
