"""FAR, Freeze And Reconfigure (Vucetic et al. 2022, "Efficient Fine-Tuning of BERT Models on
the Edge"): fine-tune a subset of each feed-forward network's nodes. Node j of an FFN is its
intermediate neuron: row j of the up-projection (and of the gate projection, in a gated FFN) and
column j of the down-projection,

    score_j = ‖W_up[j, :]‖₁ (+ ‖W_gate[j, :]‖₁) + ‖W_down[:, j]‖₁,

and in each FFN only the top nodes by score train (`density`: a fraction of its d_ff nodes, or
`count`: nodes per FFN); everything else stays frozen. Each projection carries a sparse delta
(selective.py) on the rows / columns of the chosen nodes, so frozen nodes stay bitwise θ₀.
Trainable per FFN: n · (d_model · (2 or 3)) for n kept nodes (biases stay frozen).
"""
from __future__ import annotations

import torch
from torch import nn

from .errors import PeftError
from .registry import Method, SelectionConfig, SiteContext, register
from .selective import SparseDelta

ROWS = ("up_proj", "gate_proj")         # a node is a row of these
COLUMNS = ("down_proj",)                # and a column of this


def role(path: str) -> str:
    leaf = path.rpartition(".")[2]
    if leaf not in ROWS + COLUMNS:
        raise PeftError(f"far: {path!r} is not a feed-forward projection: expected modules named "
                        f"{list(ROWS + COLUMNS)}")
    return leaf


def nodes(config: SelectionConfig, d_ff: int) -> int:
    return config.budget(d_ff)


def kept_nodes(model: nn.Module, ffn_path: str, config: SelectionConfig) -> torch.Tensor:
    """The sorted node indices that train in the FFN at `ffn_path`."""
    ffn = model.get_submodule(ffn_path)
    down = ffn.down_proj.weight                                              # (d_model, d_ff)
    score = down.detach().abs().sum(0).float()                              # (d_ff,)
    for name in ROWS:
        if getattr(ffn, name, None) is not None:
            score = score + getattr(ffn, name).weight.detach().abs().sum(1).float()
    return torch.topk(score, nodes(config, score.numel()), sorted=False).indices.sort().values


def flat_entries(kind: str, chosen: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """Flat indices of rows (up / gate) or columns (down) `chosen` of a (out, in) weight."""
    out_f, in_f = shape
    if kind in ROWS:
        return (chosen[:, None] * in_f + torch.arange(in_f)).reshape(-1)
    return (torch.arange(out_f)[:, None] * in_f + chosen[None, :]).reshape(-1)


@register
class Far(Method):
    name = "far"
    config_class = SelectionConfig
    default_targets = None
    needs = "a feed-forward network with up_proj / down_proj projections"

    def narrow(self, names: list[str]) -> list[str]:
        return [n for n in names if n.rpartition(".")[2] in ROWS + COLUMNS]

    def adapter_for(self, base: nn.Linear, config: SelectionConfig, site: SiteContext) -> nn.Module:
        kind, ffn = role(site.path), site.path.rpartition(".")[0]

        def select():
            if ffn not in site.shared:
                site.shared[ffn] = kept_nodes(site.model, ffn, config)
            return flat_entries(kind, site.shared[ffn], tuple(base.weight.shape))
        return SparseDelta.on(base, "weight", site, select)

    def count_for(self, base: nn.Linear, config: SelectionConfig, site: SiteContext) -> int:
        kind = role(site.path)
        d_ff = base.out_features if kind in ROWS else base.in_features
        width = base.in_features if kind in ROWS else base.out_features
        return nodes(config, d_ff) * width
