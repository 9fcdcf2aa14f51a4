"""Merge methods by name: how each decides, its knobs, its limits, what it needs, its kernel code.

Everything that lists methods reads this registry: the CLI's --method choices and knob flags, the
manifest's settings, `show`'s options, the budget planner, the plugin lowering. A new method is a
decision function and one `register` call; its knobs then appear everywhere by themselves.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable


@dataclass(frozen=True)
class Knob:
    """One setting of a method: keyword, manifest key and (with dashes) CLI flag at once."""

    name: str
    default: Any
    help: str = ""
    choices: tuple | None = None
    check: Callable[[Any], bool] | None = None  # False: refused with `requirement`
    requirement: str = ""

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def parse(self, value):
        """`value` as the knob's type, checked; ValueError says which flag and what it takes."""
        try:
            value = type(self.default)(value)
        except (TypeError, ValueError):
            raise ValueError(f"{self.flag} {value!r}: takes a {type(self.default).__name__}") from None
        if self.choices is not None and value not in self.choices:
            raise ValueError(f"{self.flag} {value!r}: choose one of {', '.join(map(str, self.choices))}")
        if self.check is not None and not self.check(value):
            raise ValueError(f"{self.flag} {value!r}: {self.requirement}")
        return value


def _at_most_half(n: int, protected: int) -> int:
    return max((n - protected) // 2, 0)


def _no_layer_values(knobs: dict, layer: int, num_layers: int) -> dict:
    return {}


def _merges_every_layer(knobs: dict, tokens_in: int) -> bool:
    return True


def _as_given(knobs: dict, is_text: bool) -> dict:
    return knobs


@dataclass(frozen=True)
class MergeMethod:
    """A merge method: `decide(sim, r, protected, free, rule, *, cls_attn, valid)` returns each
    token's slot before the sources move to their partners' (methods.py has the built-in ones).

    `rule_defaults` are the values of its per-layer rule (a `LayerRule`), which `layer_rule` works
    out from the knob values for one layer; `removable(n, protected)` is the most tokens one layer
    can remove; `merges(knobs, tokens_in)` False makes a layer keep all its tokens (Turbo's
    threshold); `for_model(knobs, is_text)` makes "auto" knob values concrete for one model;
    `kernel_code` is the plugin kernels' MergeMethod code (None: no kernel, ONNX lowering only);
    `pairs_by_position`: A and B alternate by position (ToMe, Turbo), so a frozen token can take one
    of A's places (methods.max_removable).
    """

    name: str
    decide: Callable | None
    summary: str = ""
    knobs: tuple[Knob, ...] = ()
    rule_defaults: dict = field(default_factory=dict)
    layer_rule: Callable[[dict, int, int], dict] = _no_layer_values
    removable: Callable[[int, int], int] = _at_most_half
    merges: Callable[[dict, int], bool] = _merges_every_layer
    for_model: Callable[[dict, bool], dict] = _as_given
    needs_cls_attn: bool = False
    kernel_code: int | None = None
    pairs_by_position: bool = False


_METHODS: dict[str, MergeMethod] = {}


def register(method: MergeMethod) -> MergeMethod:
    """Add `method` under its name; a knob it shares with another method must mean the same."""
    if method.name in _METHODS:
        raise ValueError(f"a merge method named {method.name!r} is registered already")
    reserved = {"name", "spec", "knobs", "values"} & ({k.name for k in method.knobs} | set(method.rule_defaults))
    if reserved:
        raise ValueError(f"{method.name}: {', '.join(sorted(reserved))} cannot be a knob or rule value name")
    for knob in method.knobs:
        for other in _METHODS.values():
            clash = next((k for k in other.knobs if k.name == knob.name and k != knob), None)
            if clash is not None:
                raise ValueError(f"{method.name}'s knob {knob.flag} differs from {other.name}'s knob of that name")
    _METHODS[method.name] = method
    return method


def method_names() -> tuple[str, ...]:
    return tuple(_METHODS)


def get_method(name: str) -> MergeMethod:
    try:
        return _METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(_METHODS)}") from None


def all_knobs() -> dict[str, tuple[Knob, tuple[str, ...]]]:
    """Every knob name: the knob and the methods that take it, in registration order."""
    found: dict[str, tuple[Knob, tuple[str, ...]]] = {}
    for method in _METHODS.values():
        for knob in method.knobs:
            owners = found.get(knob.name, (knob, ()))[1]
            found[knob.name] = (knob, owners + (method.name,))
    return found
