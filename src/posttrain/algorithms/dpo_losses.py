"""The preference loss types of ``posttrain train dpo --loss-type NAME``: one table entry each,
saying what the loss needs, so the trainer picks by table and never compares names.

An entry's ``compute(logps_P2, ref_P2, desirable_P, config) -> (loss, metrics)`` gets, for each of
P rows, the policy's sequence log-probs of two completions of one prompt (``dpo_data.pair_logprobs``):
[chosen, rejected] for paired losses; for KTO (``unpaired``) [the example's completion, the
mismatched completion of its KL pair] (``kto_data``). They are sums over completion tokens, or
their means per token when ``normalise`` (the trainer divides by the lengths, the reference's too).
``ref_P2`` is the precomputed reference table's row for each (None when ``reference`` is False:
then no reference is loaded, computed or stored). ``desirable_P`` is KTO's labels (None otherwise).
The metrics always include ``rewards/accuracy``, the held-out evaluation's preference accuracy
under that loss's own implicit reward (DPO family and KTO: beta times the reference log-ratio;
SimPO: beta times the mean log-prob; ORPO: the log odds).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

from posttrain.objectives import losses
from posttrain.objectives.losses.dpo import SMOOTHED


@dataclasses.dataclass(frozen=True)
class LossType:
    compute: Callable
    reference: bool
    """Needs reference log-probs (computed once before training, ``reference_logps.pt``)."""
    normalise: bool = False
    """Sequence log-probs divided by the completion's length (per-token means) instead of sums."""
    unpaired: bool = False
    """Trains on KTO's unpaired examples ({prompt, completion, label}; a paired file is split)."""
    nll: bool = False
    """Has the chosen completion's NLL (an SFT term) in the loss."""
    beta: Optional[float] = None
    """Default of ``beta`` for this loss (None: the loss has no beta)."""
    fields: tuple[str, ...] = ()
    """The config fields of this loss alone (refused with another loss type)."""
    source: str = ""


def _dpo(name: str):
    def compute(lp, ref, desirable, c):
        return losses.dpo_loss(lp[:, 0], lp[:, 1], ref[:, 0], ref[:, 1], c.beta_value, name, c.label_smoothing)
    return compute


def _simpo(lp, ref, desirable, c):
    return losses.simpo_loss(lp[:, 0], lp[:, 1], c.beta_value, c.simpo_gamma, c.label_smoothing)


def _orpo(lp, ref, desirable, c):
    return losses.orpo_loss(lp[:, 0], lp[:, 1], c.orpo_lambda)


def _kto(lp, ref, desirable, c):
    return losses.kto_loss(lp[:, 0], ref[:, 0], lp[:, 1], ref[:, 1], desirable, c.beta_value,
                           c.kto_desirable_weight, c.kto_undesirable_weight)


LOSS_TYPES: dict[str, LossType] = {
    "sigmoid": LossType(_dpo("sigmoid"), reference=True, beta=0.1, source="DPO, Rafailov et al. 2023"),
    "ipo": LossType(_dpo("ipo"), reference=True, normalise=True, beta=0.1, source="IPO, Azar et al. 2023"),
    "hinge": LossType(_dpo("hinge"), reference=True, beta=0.1, source="SLiC, Zhao et al. 2023"),
    "robust": LossType(_dpo("robust"), reference=True, beta=0.1, source="rDPO, Chowdhury et al. 2024"),
    "simpo": LossType(_simpo, reference=False, normalise=True, beta=2.0, fields=("simpo_gamma",),
                      source="SimPO, Meng et al. 2024"),
    "orpo": LossType(_orpo, reference=False, normalise=True, nll=True, fields=("orpo_lambda",),
                     source="ORPO, Hong et al. 2024"),
    "kto": LossType(_kto, reference=True, unpaired=True, beta=0.1,
                    fields=("kto_desirable_weight", "kto_undesirable_weight"), source="KTO, Ethayarajh et al. 2024"),
}
"""Every ``--loss-type``; a new one is a pure function in ``objectives/losses`` and one entry here."""

LABEL_SMOOTHING = (*SMOOTHED, "simpo")
"""The loss types that take ``label_smoothing`` (DPO's conservative / robust forms; SimPO as TRL's CPO)."""


def check(config) -> None:
    """The checks of a config that picks a ``loss_type`` of this table (``train dpo``, ``train
    online-dpo``): its truncation lengths, and a loss type x label_smoothing that cannot work together."""
    from posttrain.algorithms.dpo_data import check_lengths
    from posttrain.runtime.config import refuse

    check_lengths(config)
    if config.label_smoothing and config.loss_type not in LABEL_SMOOTHING:
        raise refuse("label_smoothing", f"label_smoothing applies to {', '.join(map(repr, LABEL_SMOOTHING))} only, "
                     f"not {config.loss_type!r}", "loss_type")


def beta_of(config) -> float:
    """``config.beta``, or its loss type's default."""
    return config.beta if config.beta is not None else LOSS_TYPES[config.loss_type].beta


def applies_when(reference_field: str) -> dict:
    """``APPLIES_WHEN`` entries of a config that picks a ``loss_type`` of this table: ``beta``, the
    field that sets its reference (``ref_model``, ``ref_update``), and each loss type's own fields."""
    return {
        "beta": ("with a loss type that has one (not orpo: --orpo-lambda)", lambda c: LOSS_TYPES[c.loss_type].beta is not None),
        reference_field: ("with a loss type that uses a reference (not simpo or orpo)",
                          lambda c: LOSS_TYPES[c.loss_type].reference),
        **{f: (f"with --loss-type {name}", lambda c, n=name: c.loss_type == n)
           for name, entry in LOSS_TYPES.items() for f in entry.fields},
    }
