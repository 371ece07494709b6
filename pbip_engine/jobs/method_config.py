"""Spec sections -> the method's own config objects, shared by every stage that builds the method's model.

The classnet stage trains with this config and the pseudo stage rebuilds the same network from it, so
both read it here rather than one stage importing the other. It goes away when a method builds its config
from the spec's ``method:`` section itself (issue 14).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pbip_engine.schemas.spec import JobSpec

if TYPE_CHECKING:
    from pbip_engine.methods.pbip.classnet import ClassNetConfig


def classnet_config(spec: JobSpec) -> ClassNetConfig:
    """Spec section -> the engine's ClassNetConfig (the spec names only what users tune)."""
    from pbip_engine.methods.pbip.classnet import ClassNetConfig

    c = spec.classnet
    return ClassNetConfig(
        backbone=c.backbone,
        pretrained=c.backbone_checkpoint or True,
        levels=tuple(c.levels),
        hidden=c.hidden,
        merge_train=c.merge_train,
        merge_eval=c.merge_eval,
        delta=c.delta,
        threshold=c.threshold,
        alpha=c.alpha,
        beta=c.beta,
        tau=c.tau,
        theta1=c.theta1,
        theta2=c.theta2,
        use_sim=c.use_sim,
        sim_size=c.sim_size,
        lr=c.lr,
        weight_decay=c.weight_decay,
        epochs=c.epochs,
        batch_size=c.batch_size,
        amp=c.amp,
    )
