"""One objective per method: `loss, metrics = objective.loss(model, batch)` for `llmkit.train.Trainer`.

Batches come from `align.data` (`collate_pairs` / `collate_unpaired`): paired methods see one
concatenated batch (rows 0..B-1 chosen, B..2B-1 rejected) and run ONE forward of the policy over
it; KTO sees its B examples plus the B mismatched pairs, also in one forward.

The reference π_ref of DPO, IPO and KTO is one of (argument `reference`):
- an `nn.Module`: a frozen copy of the starting policy (`frozen_copy(model)`), run under no_grad;
- a PEFT handle (anything with `.disable()`, e.g. `llmkit.peft.apply(model, "lora", ...)`): the
  policy itself with its adapters switched off, so the reference costs no memory;
- None: reference log-probs precomputed into the examples (`precompute_reference_logps`), carried
  by the batch as "ref_chosen_logps"/"ref_rejected_logps" (DPO and IPO), so no reference model
  stays in memory during training.
The reference always runs in eval mode (no dropout), so π = π_ref at step 1 gives DPO loss ln 2.
"""
from __future__ import annotations

import copy
from typing import Any, Sequence

import torch
from torch import nn

from ..model import ValueModel
from ..model.modes import evaluating
from .data import collate_pairs
from .logps import causal_lm_logps
from .losses import dpo_loss, ipo_loss, kto_loss, orpo_loss, preference_metrics, reward_loss


def frozen_copy(model: nn.Module) -> nn.Module:
    """A deep copy in eval mode with every parameter frozen: the reference model."""
    ref = copy.deepcopy(model).eval()
    ref.requires_grad_(False)
    return ref


def reward_model_from(backbone: nn.Module) -> ValueModel:
    """A reward model on a pretrained stack: `backbone.transformer` (shared, not copied) plus a fresh
    scalar head scoring the last real token (`ValueModel`). Works for decoders and encoders."""
    if not hasattr(backbone, "transformer") or not hasattr(backbone, "config"):
        raise TypeError(f"reward_model_from: {type(backbone).__name__} has no .transformer/.config: expected an "
                        "llmkit model (CausalLM, EncoderModel, MaskedLM, ...)")
    model = ValueModel(backbone.config)
    model.transformer = backbone.transformer
    return model


class _ReferenceMixin:
    """Reference log-probs from a frozen model, the adapter-free policy, or the batch."""

    reference: Any = None

    def _check_reference(self, reference: Any, precomputed_ok: bool) -> None:
        if reference is None and not precomputed_ok:
            raise ValueError(f"{type(self).__name__}: reference=None (precomputed log-probs) is not available: "
                             "KTO's z_ref pairs change with every batch; pass a frozen copy or a PEFT handle")
        if reference is not None and not isinstance(reference, nn.Module) and not hasattr(reference, "disable"):
            raise TypeError(f"reference={type(reference).__name__}: expected an nn.Module (frozen copy), a PEFT "
                            "handle with .disable(), or None (precomputed log-probs in the batch)")
        if isinstance(reference, nn.Module):
            reference.eval().requires_grad_(False)
        self.reference = reference

    @torch.no_grad()
    def reference_logps(self, model: nn.Module, batch: dict) -> torch.Tensor:
        """(N,) summed reference log-probs of the batch's rows."""
        ids, am, lm = batch["input_ids"], batch["attention_mask"], batch["loss_mask"]
        ref = self.reference
        if ref is None:
            if "ref_chosen_logps" not in batch:
                raise KeyError("reference=None but the batch has no 'ref_chosen_logps'/'ref_rejected_logps': "
                               "run precompute_reference_logps on the examples first, or pass a reference model")
            return torch.cat([batch["ref_chosen_logps"], batch["ref_rejected_logps"]]).to(ids.device)
        if isinstance(ref, nn.Module):
            if next(ref.parameters()).device != ids.device:
                ref.to(ids.device)
            return causal_lm_logps(ref, ids, am, lm, "sum")
        with ref.disable(), evaluating(model):
            return causal_lm_logps(model, ids, am, lm, "sum")


def precompute_reference_logps(examples: Sequence[dict], reference: nn.Module, pad_id: int, *,
                               handle: Any = None, batch_size: int = 16) -> list[dict]:
    """Copies of paired examples carrying "ref_chosen_logps"/"ref_rejected_logps" (summed, floats) from
    `reference` (or, with `handle`, from `reference` run with its adapters disabled)."""
    helper = _ReferenceMixin()
    helper.reference = handle if handle is not None else reference
    device = next(reference.parameters()).device
    out = []
    with evaluating(reference):
        for start in range(0, len(examples), batch_size):
            chunk = examples[start:start + batch_size]
            batch = {k: v.to(device) for k, v in collate_pairs(chunk, pad_id).items()}
            logps = helper.reference_logps(reference, batch).float().cpu()                # (2b,)
            for i, example in enumerate(chunk):
                out.append({**example, "ref_chosen_logps": float(logps[i]),
                            "ref_rejected_logps": float(logps[len(chunk) + i])})
    return out


class RewardObjective:
    """Bradley–Terry reward model (see `losses.reward_loss`): one forward of a scalar-head model
    (`ValueModel`, score at the last real token) over chosen and rejected rows. A batch "label" (B,)
    (soft preferences, e.g. RL-CAI's `harmlessness_labels`) makes it the soft-label cross-entropy."""

    def __init__(self, margin: float = 0.0, center_coef: float = 0.0):
        self.margin, self.center_coef = margin, center_coef

    def loss(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, dict]:
        scores = model(batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()   # (2B,)
        if scores.dim() != 1:
            raise ValueError(f"RewardObjective: the model returned scores of shape {tuple(scores.shape)}: expected "
                             "one scalar per sequence (B,), as ValueModel / reward_model_from(...) give")
        b = scores.shape[0] // 2
        chosen, rejected = scores[:b], scores[b:]                                  # (B,), (B,)
        margin = batch.get("margin")
        if margin is None and self.margin:
            margin = torch.full_like(chosen, self.margin)
        losses = reward_loss(chosen, rejected, margin=margin, center_coef=self.center_coef, label=batch.get("label"))
        loss = losses.mean()
        return loss, {"loss": loss.item(), **preference_metrics(chosen.detach(), rejected.detach())}


def _check_nll_coef(nll_coef: float) -> float:
    if isinstance(nll_coef, bool) or not isinstance(nll_coef, (int, float)) or nll_coef < 0:
        raise ValueError(f"nll_coef={nll_coef!r}: expected a float >= 0 (0 = plain loss, 1 = RPO's choice)")
    return float(nll_coef)


class DPOObjective(_ReferenceMixin):
    """DPO (`losses.dpo_loss`; loss_type "sigmoid" | "hinge", label_smoothing for cDPO).

    nll_coef = α > 0 adds the length-normalised NLL of the chosen answers (RPO: Pang et al., 2024,
    "Iterative Reasoning Preference Optimization"):

        L = L_DPO + α · mean_i( −log π(y_w,i | x_i) / |y_w,i| )

    DPO alone can lower the chosen log-probs as long as the rejected ones fall faster; the NLL term
    keeps the chosen answers likely. The metrics then add "nll" (the term before α)."""

    def __init__(self, reference: Any = None, *, beta: float = 0.1, label_smoothing: float = 0.0,
                 loss_type: str = "sigmoid", nll_coef: float = 0.0):
        self._check_reference(reference, precomputed_ok=True)
        self.beta, self.label_smoothing, self.loss_type = beta, label_smoothing, loss_type
        self.nll_coef = _check_nll_coef(nll_coef)
        dpo_loss(*[torch.zeros(1)] * 4, beta=beta, label_smoothing=label_smoothing, loss_type=loss_type)  # check

    def _losses(self, pc, pr, rc, rr, counts_c, counts_r):
        return dpo_loss(pc, pr, rc, rr, beta=self.beta, label_smoothing=self.label_smoothing,
                        loss_type=self.loss_type)

    def loss(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, dict]:
        ids, am, lm = batch["input_ids"], batch["attention_mask"], batch["loss_mask"]
        b = ids.shape[0] // 2
        logps, counts = causal_lm_logps(model, ids, am, lm, "sum", return_counts=True)   # (2B,), (2B,)
        ref = self.reference_logps(model, batch).float()                                 # (2B,)
        losses, chosen_r, rejected_r = self._losses(logps[:b], logps[b:], ref[:b], ref[b:], counts[:b], counts[b:])
        loss = losses.mean()
        extra = {}
        if self.nll_coef:
            nll = (-logps[:b] / counts[:b].clamp(min=1)).mean()                              # ()
            loss = loss + self.nll_coef * nll
            extra["nll"] = nll.item()
        return loss, {"loss": loss.item(), **extra, **preference_metrics(chosen_r, rejected_r, logps[:b], logps[b:])}


class IPOObjective(DPOObjective):
    """IPO (`losses.ipo_loss`): tau plays β's role; length_normalize divides every log-prob by its
    completion length (TRL's form), else summed log-probs (the paper's). nll_coef as in DPOObjective."""

    def __init__(self, reference: Any = None, *, tau: float = 0.1, length_normalize: bool = True,
                 nll_coef: float = 0.0):
        self._check_reference(reference, precomputed_ok=True)
        if tau <= 0:
            raise ValueError(f"tau={tau!r}: expected a positive float")
        self.tau, self.length_normalize, self.nll_coef = tau, length_normalize, _check_nll_coef(nll_coef)

    def _losses(self, pc, pr, rc, rr, counts_c, counts_r):
        lengths = dict(chosen_lengths=counts_c, rejected_lengths=counts_r) if self.length_normalize else {}
        return ipo_loss(pc, pr, rc, rr, tau=self.tau, **lengths)


class KTOObjective(_ReferenceMixin):
    """KTO (`losses.kto_loss`) on unpaired batches from `collate_unpaired`; metrics add "kl" (z_ref).
    rewards/chosen and rewards/rejected are the mean rewards of the batch's desirable and undesirable
    examples (0.0 when the batch has none of a kind). nll_coef = α > 0 adds α times the mean
    length-normalised NLL of the batch's desirable completions (the RPO term of DPOObjective)."""

    def __init__(self, reference: Any, *, beta: float = 0.1, lambda_d: float = 1.0, lambda_u: float = 1.0,
                 nll_coef: float = 0.0):
        self._check_reference(reference, precomputed_ok=False)
        self.beta, self.lambda_d, self.lambda_u = beta, lambda_d, lambda_u
        self.nll_coef = _check_nll_coef(nll_coef)

    def loss(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, dict]:
        if "desirable" not in batch:
            raise KeyError("KTOObjective: the batch has no 'desirable' labels: expected collate_unpaired batches "
                           "(paired rows are split with align.data.to_unpaired)")
        ids, am, lm = batch["input_ids"], batch["attention_mask"], batch["loss_mask"]
        b = batch["desirable"].shape[0]
        logps, counts = causal_lm_logps(model, ids, am, lm, "sum", return_counts=True)   # (2B,) matched, mismatched
        ref = self.reference_logps(model, batch).float()                            # (2B,)
        losses, rewards, z_ref = kto_loss(logps[:b], ref[:b], batch["desirable"], logps[b:], ref[b:],
                                          beta=self.beta, lambda_d=self.lambda_d, lambda_u=self.lambda_u)
        loss = losses.mean()
        good = batch["desirable"].bool()
        extra = {}
        if self.nll_coef:
            nll = (-logps[:b] / counts[:b].clamp(min=1))[good].sum() / good.sum().clamp(min=1)   # ()
            loss = loss + self.nll_coef * nll
            extra["nll"] = nll.item()
        mean = lambda x, m: (x[m].sum() / m.sum().clamp(min=1)).item()  # noqa: E731
        chosen_r, rejected_r = mean(rewards, good), mean(rewards, ~good)
        return loss, {"loss": loss.item(), **extra, "kl": z_ref.item(), "rewards/chosen": chosen_r,
                      "rewards/rejected": rejected_r, "rewards/margins": chosen_r - rejected_r,
                      "logps/chosen": mean(logps[:b].detach(), good), "logps/rejected": mean(logps[:b].detach(), ~good)}


class ORPOObjective:
    """ORPO (`losses.orpo_loss`): no reference model; lam weighs the odds-ratio term."""

    def __init__(self, *, lam: float = 0.1):
        self.lam = lam

    def loss(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, dict]:
        ids, am, lm = batch["input_ids"], batch["attention_mask"], batch["loss_mask"]
        b = ids.shape[0] // 2
        mean_logps = causal_lm_logps(model, ids, am, lm, "mean")                    # (2B,)
        losses, chosen_r, rejected_r, log_odds = orpo_loss(mean_logps[:b], mean_logps[b:], lam=self.lam)
        loss = losses.mean()
        return loss, {"loss": loss.item(), "nll": -mean_logps[:b].mean().item(),
                      "log_odds_ratio": log_odds.mean().item(),
                      **preference_metrics(chosen_r, rejected_r, mean_logps[:b], mean_logps[b:])}


ALIGN_METHODS = ("rm", "dpo", "ipo", "kto", "orpo")


def make_alignment_objective(method: str, reference: Any = None, **options) -> Any:
    """The objective for `method` with its options (beta, label_smoothing, loss_type, tau,
    length_normalize, nll_coef (dpo/ipo), lambda_d, lambda_u, lam, margin, center_coef)."""
    builders = {"rm": lambda: RewardObjective(**options), "dpo": lambda: DPOObjective(reference, **options),
                "ipo": lambda: IPOObjective(reference, **options), "kto": lambda: KTOObjective(reference, **options),
                "orpo": lambda: ORPOObjective(**options)}
    if method not in builders:
        raise ValueError(f"method={method!r}: expected one of {list(ALIGN_METHODS)}")
    try:
        return builders[method]()
    except TypeError as exc:
        raise ValueError(f"method {method!r}: bad option in {sorted(options)} ({exc})") from exc
