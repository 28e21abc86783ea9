"""The parameters builder: every annotation's conversions and refusals, declared constraints, and messages that
name where, the key, the value and what the field takes."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal

import pytest
from omegaconf import OmegaConf

from peft_lab.errors import UserError
from peft_lab.params import Checked, Interval, build, param, param_key, specs


@dataclasses.dataclass(frozen=True)
class Inner(Checked):
    size: int = param(1, within="[1, inf)")


@dataclasses.dataclass(frozen=True)
class P(Checked):
    flag: bool = False
    n: int = 3
    x: float = 0.5
    name: str = "a"
    maybe: float | None = None
    mode: Literal["fast", "slow"] = "fast"
    heads: tuple[str, ...] = ("classifier.*",)
    sizes: list[int] = dataclasses.field(default_factory=list)
    pair: tuple[int, int] = (1, 2)
    shard: int | str = "5GB"
    table: dict[str, float] = dataclasses.field(default_factory=dict)
    inner: Inner = dataclasses.field(default_factory=Inner)
    anything: Any = None
    lambda_: float = param(1.0, key="lambda")
    density: float = param(1.0, within="(0, 1]", help="the kept fraction")
    rescale: str = param("l1", choices=("l1", "none"), aliases={True: "l1", False: "none"})
    scale: float = param(1.0, finite=False)


@pytest.mark.parametrize(
    "key, given, expected",
    [
        ("flag", True, True),
        ("n", 7, 7),
        ("n", "12", 12),
        ("n", " -4 ", -4),
        ("x", 2, 2.0),
        ("x", "1e-3", 1e-3),
        ("x", " 0.25", 0.25),
        ("maybe", None, None),
        ("maybe", "3", 3.0),
        ("mode", "slow", "slow"),
        ("heads", "classifier.*", ("classifier.*",)),
        ("heads", ["a", "b"], ("a", "b")),
        ("heads", [], ()),
        ("sizes", 5, [5]),
        ("sizes", ("1", 2), [1, 2]),
        ("pair", [3, "4"], (3, 4)),
        ("shard", 1024, 1024),
        ("shard", "500MB", "500MB"),
        ("table", {"a": "1e-2"}, {"a": 0.01}),
        ("inner", {"size": "4"}, Inner(4)),
        ("anything", {"k": [1]}, {"k": [1]}),
        ("lambda", "0.5", 0.5),
        ("density", 1, 1.0),
        ("rescale", True, "l1"),
        ("rescale", False, "none"),
        ("scale", "inf", math.inf),
    ],
)
def test_accepted_values_are_converted(key, given, expected):
    p = build(P, {key: given})
    value = getattr(p, specs(P)[key].name)
    assert value == expected and type(value) is type(expected)


@pytest.mark.parametrize(
    "key, given, message",
    [
        ("flag", 1, "flag=1 must be true or false"),
        ("flag", "yes", "flag='yes' must be true or false"),
        ("n", 2.5, "n=2.5 must be an integer"),
        ("n", 2.0, "n=2.0 must be an integer"),
        ("n", True, "n=True must be an integer"),
        ("n", "1e3", "n='1e3' must be an integer"),
        ("x", "fast", "x='fast' must be a finite number"),
        ("x", float("nan"), "x=nan must be a finite number"),
        ("x", "-inf", "x='-inf' must be a finite number"),
        ("x", False, "x=False must be a finite number"),
        ("x", [1.0], "x=[1.0] must be a finite number"),
        ("name", 2019, "name=2019 must be a string (quote it: '2019')"),
        ("maybe", "x", "maybe='x' must be a finite number or null"),
        ("mode", "medium", "mode='medium' must be one of: fast, slow"),
        ("heads", ["a", 3], "heads=['a', 3] must be a list of strings"),
        ("heads", {"a": 1}, "heads={'a': 1} must be a list of strings"),
        ("pair", [1, 2, 3], "pair=[1, 2, 3] must be a list of 2 items: an integer, an integer"),
        ("shard", 2.5, "shard=2.5 must be an integer or a string"),
        ("table", [1], "table=[1] must be a mapping"),
        ("inner", 3, "inner=3 must be a mapping of Inner's parameters"),
        ("density", 0, "density=0 is out of range: must be in (0, 1] (the kept fraction)"),
        ("density", "1.5", "density='1.5' is out of range: must be in (0, 1] (the kept fraction)"),
        ("rescale", "q", "rescale='q' must be one of: l1, none"),
        ("lambda", None, "lambda=None must be a finite number"),
    ],
)
def test_refused_values_name_where_key_value_and_what_it_takes(key, given, message):
    with pytest.raises(UserError) as e:
        build(P, {key: given}, where="r.yaml: models[2]", prefix="method.")
    assert str(e.value) == f"r.yaml: models[2]: method.{message}."


def test_unknown_keys_list_the_known_ones():
    match = r"^r\.yaml has no parameter\(s\) lamda, n_; it takes: anything, density, .*lambda"
    with pytest.raises(UserError, match=match):
        build(P, {"lamda": 1, "n_": 2, "n": 1}, where="r.yaml")
    with pytest.raises(UserError, match=r"^trainer has no parameter\(s\) x; it takes: size\.$"):
        build(Inner, {"x": 1}, prefix="trainer.")
    with pytest.raises(UserError, match=r"^P has no parameter\(s\) lambda_"):
        build(P, {"lambda_": 1.0})  # the field name is not what users write


def test_checks_across_fields_get_where_in_front():
    @dataclasses.dataclass(frozen=True)
    class Range(Checked):
        lo: float = 0.0
        hi: float = 1.0

        def __post_init__(self):
            super().__post_init__()
            if self.lo > self.hi:
                raise UserError(f"lo={self.lo} must not exceed hi={self.hi}.")

    assert build(Range, {"lo": "0.5"}) == Range(0.5, 1.0)
    with pytest.raises(UserError, match=r"^cfg: lo=2\.0 must not exceed hi=1\.0\.$"):
        build(Range, {"lo": 2}, where="cfg")


def test_direct_construction_runs_the_same_checks():
    assert P(heads="score.*", x="1e-2").heads == ("score.*",)
    assert P(x="1e-2").x == 0.01
    with pytest.raises(UserError, match=r"^P: density=2\.0 is out of range"):
        P(density=2.0)
    assert dataclasses.replace(P(), n="5").n == 5


def test_omegaconf_containers_are_plain_values():
    node = OmegaConf.create({"heads": ["a", "b"], "table": {"w": 1}, "n": 4})
    p = build(P, node)
    assert p.heads == ("a", "b") and p.table == {"w": 1.0} and type(p.table) is dict and p.n == 4


def test_defaults_and_keys():
    assert P() == build(P, {})
    assert [param_key(f) for f in dataclasses.fields(P)][-4:] == ["lambda", "density", "rescale", "scale"]
    assert specs(P)["heads"].takes_list and specs(P)["sizes"].takes_list and not specs(P)["x"].takes_list
    with pytest.raises(UserError, match=r"^P: expected a mapping of parameters, got \[1\]\.$"):
        build(P, [1])


def test_intervals():
    assert str(Interval.parse("(0, 1]")) == "in (0, 1]" and 1 in Interval.parse("(0, 1]")
    assert 0 not in Interval.parse("(0, 1]") and 0 in Interval.parse("[0, 1)") and 1 not in Interval.parse("[0, 1)")
    assert str(Interval.parse("[1, inf)")) == ">= 1" and str(Interval.parse("(0, inf)")) == "> 0"
    assert str(Interval.parse("(-inf, 2]")) == "<= 2" and -1e9 in Interval.parse("(-inf, 2]")
    with pytest.raises(ValueError, match="not an interval"):
        param(1.0, within="0..1")
