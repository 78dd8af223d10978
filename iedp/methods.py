"""The methods of DESIGN §1, defined once: ``model.method`` picks one, and every comparison of the paper reruns them.

| method   | training context                     | inference context                |
|----------|--------------------------------------|----------------------------------|
| vpd      | class tokens (seg) / GT scene token  | same                             |
| implicit | class tokens + implicit tokens       | same                             |
| explicit | class tokens + explicit tokens       | same (an oracle: needs labels)   |
| iedp     | both branches, losses summed         | implicit only                    |

Scripts that compare methods (``bench/ablation.py``) take the names from :data:`METHODS`.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Method:
    train_branches: tuple[str, ...]  # the guidance branches run in a training step, their losses summed
    infer_branch: str  # the branch that predicts at inference
    description: str  # one line for model cards


METHODS: dict[str, Method] = {
    "vpd": Method(
        ("vpd",),
        "vpd",
        "VPD (Zhao et al., arXiv 2303.02153): the UNet conditioned on fixed class-name text embeddings",
    ),
    "implicit": Method(
        ("implicit",),
        "implicit",
        "IEDP's implicit branch alone: learnable queries over frozen CLIP image tokens",
    ),
    "explicit": Method(
        ("explicit",),
        "explicit",
        "IEDP's explicit branch alone (an oracle: needs the ground-truth label prompt at test time)",
    ),
    "iedp": Method(
        ("implicit", "explicit"),
        "implicit",
        "IEDP (Wang, Cao et al., arXiv 2404.07600): implicit + explicit language guidance in training, "
        "the implicit branch alone at inference",
    ),
}
