"""From user options to MergeSettings: the one place where defaults and checks live."""

from __future__ import annotations

from dataclasses import dataclass

from .adapters import Adapter
from .budgets import BudgetReport, plan_schedule
from .encoder import MergeSettings
from .errors import UsageError
from .methods import METHODS, MethodConfig


ATTENTION = ("auto", "explicit", "fused")
DEFAULT_R = 0.9  # PiToMe's kept fraction per layer, used when no budget is given


@dataclass(frozen=True)
class MergeOptions:
    """What the user asks for; `resolve` turns it into settings for one model."""

    method: str = "pitome"
    r: float | int | None = None
    schedule: tuple[int, ...] | None = None
    min_tokens: int | None = None
    prop_attn: bool | None = None  # None: the adapter's default (on, off for MAE)
    metric: str | None = None  # None: the adapter's default
    margin: float = 0.9
    alpha: float = 1.0
    pitome_variant: str = "auto"  # auto: text for text encoders, plain otherwise
    turbo_alpha: float = 1.0
    turbo_beta: float = 1.0
    turbo_gamma: float = 0.0
    turbo_threshold: int = 40
    attention: str = "auto"  # patched models: auto (fused on GPUs) | explicit | fused; exports are always explicit

    def method_config(self, adapter: Adapter) -> MethodConfig:
        variant = self.pitome_variant
        if variant == "auto":
            variant = "text" if adapter.is_text else "plain"
        try:
            return MethodConfig(
                name=self.method,
                margin=self.margin,
                alpha=self.alpha,
                pitome_variant=variant,
                turbo_alpha=self.turbo_alpha,
                turbo_beta=self.turbo_beta,
                turbo_gamma=self.turbo_gamma,
                turbo_threshold=self.turbo_threshold,
            )
        except ValueError as exc:
            raise UsageError(str(exc)) from None

    def resolve(self, adapter: Adapter) -> tuple[MergeSettings, BudgetReport]:
        if self.method not in METHODS:
            raise UsageError(f"--method {self.method!r}: choose one of {', '.join(METHODS)}")
        if self.r is not None and self.schedule is not None:
            raise UsageError("give --r or --schedule, not both")
        r = DEFAULT_R if self.r is None and self.schedule is None else self.r
        metric = self.metric or adapter.metric
        if metric not in ("keys", "hidden"):
            raise UsageError(f"--metric {metric!r}: choose keys or hidden")
        if self.attention not in ATTENTION:
            raise UsageError(f"attention={self.attention!r}: choose {', '.join(ATTENTION)}")
        config = self.method_config(adapter)
        shape = adapter.shape()
        schedule = plan_schedule(
            self.method,
            shape,
            r=r,
            schedule=list(self.schedule) if self.schedule else None,
            min_tokens=self.min_tokens,
            turbo_threshold=config.turbo_threshold,
        )
        settings = MergeSettings(
            method=config,
            schedule=schedule,
            protected=adapter.protected,
            prop_attn=adapter.prop_attn if self.prop_attn is None else self.prop_attn,
            metric=metric,
            attention=self.attention,
        )
        return settings, BudgetReport(shape, schedule, r)
