"""From user options to MergeSettings: the one place where defaults and checks live."""

from __future__ import annotations

from dataclasses import dataclass, field

from .adapters import Adapter
from .budgets import BudgetReport, plan_schedule
from .encoder import MergeSettings
from .errors import UsageError
from .methods import MethodConfig
from .registry import all_knobs, method_names


ATTENTION = ("auto", "explicit", "fused")
DEFAULT_R = 0.9  # PiToMe's kept fraction per layer, used when no budget is given


@dataclass(frozen=True, init=False)
class MergeOptions:
    """What the user asks for; `resolve` turns it into settings for one model.

    `knobs` holds method knob values by name (registry.py); those of other methods than `method`
    are ignored, so one set of options serves any method, and an unknown name is refused."""

    method: str = "pitome"
    r: float | int | None = None
    schedule: tuple[int, ...] | None = None
    min_tokens: int | None = None
    prop_attn: bool | None = None  # None: the adapter's default (on, off for MAE)
    metric: str | None = None  # None: the adapter's default
    attention: str = "auto"  # patched models: auto (fused on GPUs) | explicit | fused; exports are always explicit
    knobs: dict = field(default_factory=dict)

    def __init__(self, method="pitome", r=None, schedule=None, min_tokens=None, prop_attn=None, metric=None, attention="auto", **knobs):
        known = all_knobs()
        unknown = [name for name in knobs if name not in known]
        if unknown:
            raise UsageError(f"unknown option(s) {', '.join(unknown)}; the method knobs are {', '.join(known)}")
        for name, value in dict(method=method, r=r, schedule=schedule, min_tokens=min_tokens, prop_attn=prop_attn,
                                metric=metric, attention=attention, knobs=knobs).items():
            object.__setattr__(self, name, value)

    def method_config(self, adapter: Adapter) -> MethodConfig:
        try:
            return MethodConfig(self.method, **self.knobs).for_model(adapter.is_text)
        except ValueError as exc:
            raise UsageError(str(exc)) from None

    def resolve(self, adapter: Adapter) -> tuple[MergeSettings, BudgetReport]:
        if self.method not in method_names():
            raise UsageError(f"--method {self.method!r}: choose one of {', '.join(method_names())}")
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
            config,
            shape,
            r=r,
            schedule=list(self.schedule) if self.schedule else None,
            min_tokens=self.min_tokens,
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
