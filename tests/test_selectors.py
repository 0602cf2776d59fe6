"""Label selectors: the Kubernetes "Labels and Selectors" examples, apimachinery's parser edge
cases, key/value validation, null vs empty, and the canonical string round trip."""

from __future__ import annotations

import copy
import pickle
from collections.abc import Iterator, Mapping
from types import MappingProxyType

import pytest

from discovery.selectors import (
    EVERYTHING,
    NOTHING,
    Operator,
    Requirement,
    Selector,
    SelectorError,
    parse_selector,
    selector_from_label_selector,
    selector_from_map,
    validate_label_key,
    validate_label_value,
)


def req(key: str, operator: Operator, *values: str) -> Requirement:
    return Requirement(key, operator, values)


def selected(selector: Selector, objects: Mapping[str, Mapping[str, str]]) -> set[str]:
    return {name for name, labels in objects.items() if selector.matches(labels)}


# --------------------------------------------------------------------------- documentation examples

# Pods labelled with the dimensions the Kubernetes "Labels and Selectors" page uses.
DOC_PODS: dict[str, dict[str, str]] = {
    "prod-fe": {"environment": "production", "tier": "frontend"},
    "prod-be": {"environment": "production", "tier": "backend"},
    "qa-cache": {"environment": "qa", "tier": "cache", "partition": "customerA"},
    "dev-be": {"environment": "dev", "tier": "backend", "partition": "customerB"},
    "unlabelled": {},
}
ALL_DOC_PODS = set(DOC_PODS)


@pytest.mark.parametrize(
    ("text", "canonical", "expected"),
    [
        # Equality-based requirements.
        ("environment = production", "environment=production", {"prod-fe", "prod-be"}),
        ("environment == production", "environment==production", {"prod-fe", "prod-be"}),
        # != also selects objects that have no `tier` label at all.
        ("tier != frontend", "tier!=frontend", ALL_DOC_PODS - {"prod-fe"}),
        ("environment=production,tier!=frontend", "environment=production,tier!=frontend", {"prod-be"}),
        # Set-based requirements.
        (
            "environment in (production, qa)",
            "environment in (production,qa)",
            {"prod-fe", "prod-be", "qa-cache"},
        ),
        ("tier notin (frontend, backend)", "tier notin (backend,frontend)", {"qa-cache", "unlabelled"}),
        ("partition", "partition", {"qa-cache", "dev-be"}),
        ("!partition", "!partition", {"prod-fe", "prod-be", "unlabelled"}),
        ("partition,environment notin (qa)", "environment notin (qa),partition", {"dev-be"}),
        # Set-based and equality-based mixed.
        (
            "partition in (customerA, customerB),environment!=qa",
            "environment!=qa,partition in (customerA,customerB)",
            {"dev-be"},
        ),
        # The kubectl -l examples.
        ("environment=production,tier=frontend", "environment=production,tier=frontend", {"prod-fe"}),
        (
            "environment in (production),tier in (frontend)",
            "environment in (production),tier in (frontend)",
            {"prod-fe"},
        ),
        (
            "environment,environment notin (frontend)",
            "environment,environment notin (frontend)",
            ALL_DOC_PODS - {"unlabelled"},
        ),
        # An empty selector selects every object.
        ("", "", ALL_DOC_PODS),
    ],
)
def test_documentation_string_examples(text: str, canonical: str, expected: set[str]) -> None:
    selector = parse_selector(text)
    assert str(selector) == canonical
    assert selected(selector, DOC_PODS) == expected


@pytest.mark.parametrize(
    ("equality", "set_based"),
    [
        # "environment=production is equivalent to environment in (production)", same for != / notin.
        ("environment=production", "environment in (production)"),
        ("tier!=frontend", "tier notin (frontend)"),
        ("environment==qa", "environment in (qa)"),
    ],
)
def test_documentation_equality_is_a_one_value_set(equality: str, set_based: str) -> None:
    assert selected(parse_selector(equality), DOC_PODS) == selected(
        parse_selector(set_based), DOC_PODS
    )


REDIS_PODS: dict[str, dict[str, str]] = {
    "redis-cache-prod": {"component": "redis", "tier": "cache", "environment": "production"},
    "redis-cache-no-env": {"component": "redis", "tier": "cache"},
    "redis-cache-dev": {"component": "redis", "tier": "cache", "environment": "dev"},
    "redis-db": {"component": "redis", "tier": "database", "environment": "production"},
    "web-cache": {"component": "web", "tier": "cache", "environment": "production"},
    "unlabelled": {},
}


def test_documentation_match_labels_and_match_expressions() -> None:
    selector = selector_from_label_selector(
        {
            "matchLabels": {"component": "redis"},
            "matchExpressions": [
                {"key": "tier", "operator": "In", "values": ["cache"]},
                {"key": "environment", "operator": "NotIn", "values": ["dev"]},
            ],
        }
    )
    assert str(selector) == "component=redis,environment notin (dev),tier in (cache)"
    assert selector.requirements == (
        req("component", Operator.EQUALS, "redis"),
        req("environment", Operator.NOT_IN, "dev"),
        req("tier", Operator.IN, "cache"),
    )
    # NotIn keeps a pod that has no environment label at all.
    assert selected(selector, REDIS_PODS) == {"redis-cache-prod", "redis-cache-no-env"}


def test_documentation_service_selector() -> None:
    selector = selector_from_map({"component": "redis"})
    assert str(selector) == "component=redis"
    assert selected(selector, REDIS_PODS) == set(REDIS_PODS) - {"web-cache", "unlabelled"}


def test_documentation_node_selector() -> None:
    selector = selector_from_map({"accelerator": "nvidia-tesla-p100"})
    assert selector.matches({"accelerator": "nvidia-tesla-p100", "kubernetes.io/os": "linux"})
    assert not selector.matches({"accelerator": "nvidia-tesla-k80"})
    assert not selector.matches({})


# --------------------------------------------------------------------------- parser: good input


@pytest.mark.parametrize(
    "text",
    [
        # apimachinery TestSelectorParse: these print back as written, minus the spaces.
        "x=a,y=b,z=c",
        "",
        "x!=a,y=b",
        "x=",
        "x= ",
        "x=,z= ",
        "x= ,z= ",
        "!x",
        "x>1",
        "x>1,z<5",
        "x==a",
    ],
)
def test_parse_prints_back_without_spaces(text: str) -> None:
    assert str(parse_selector(text)) == text.replace(" ", "")


R = Operator


@pytest.mark.parametrize(
    ("text", "requirements"),
    [
        ("\rx", [req("x", R.EXISTS)]),
        ("a ", [req("a", R.EXISTS)]),
        (" \t\n a \r\n", [req("a", R.EXISTS)]),
        ("x,y", [req("x", R.EXISTS), req("y", R.EXISTS)]),
        ("this-is-a-dns.domain.com/key-with-dash", [req("this-is-a-dns.domain.com/key-with-dash", R.EXISTS)]),
        (
            "this-is-another-dns.domain.com/key-with-dash in (so,what)",
            [req("this-is-another-dns.domain.com/key-with-dash", R.IN, "so", "what")],
        ),
        (
            "0.1.2.domain/99 notin (10.10.100.1, tick.tack.clock)",
            [req("0.1.2.domain/99", R.NOT_IN, "10.10.100.1", "tick.tack.clock")],
        ),
        ("foo  in\t (abc)", [req("foo", R.IN, "abc")]),
        ("x notin\n (abc)", [req("x", R.NOT_IN, "abc")]),
        ("x  notin\t\t\t(abc,def)", [req("x", R.NOT_IN, "abc", "def")]),
        ("x in (abc,)", [req("x", R.IN, "abc", "")]),
        ("x in ()", [req("x", R.IN, "")]),
        ("x notin ( )", [req("x", R.NOT_IN, "")]),
        ("x notin (, a)", [req("x", R.NOT_IN, "", "a")]),
        ("x in (,)", [req("x", R.IN, "")]),
        ("x in (a,,b)", [req("x", R.IN, "a", "", "b")]),
        ("x in (b,a,b)", [req("x", R.IN, "a", "b")]),
        (
            # Sorted by key; `bar` and `w` are bare keys (exists).
            "x notin (abc,def),bar,z in (),w",
            [
                req("bar", R.EXISTS),
                req("w", R.EXISTS),
                req("x", R.NOT_IN, "abc", "def"),
                req("z", R.IN, ""),
            ],
        ),
        ("x,y in (a)", [req("x", R.EXISTS), req("y", R.IN, "a")]),
        ("x=a,y!=b,z in (h,i,j)", [req("x", R.EQUALS, "a"), req("y", R.NOT_EQUALS, "b"), req("z", R.IN, "h", "i", "j")]),
        # `in` and `notin` are operators only where an operator may stand.
        ("a in (x,y,notin, z,in)", [req("a", R.IN, "in", "notin", "x", "y", "z")]),
        ("notin=in", [req("notin", R.EQUALS, "in")]),
        ("in", [req("in", R.EXISTS)]),
        ("!notin", [req("notin", R.DOES_NOT_EXIST)]),
        ("in notin (notin)", [req("in", R.NOT_IN, "notin")]),
        # Same key twice: both kept, in written order (the sort is stable).
        ("z!=a,z", [req("z", R.NOT_EQUALS, "a"), req("z", R.EXISTS)]),
        ("z,z!=a", [req("z", R.EXISTS), req("z", R.NOT_EQUALS, "a")]),
        ("x>1", [req("x", R.GREATER_THAN, "1")]),
        ("x<7", [req("x", R.LESS_THAN, "7")]),
        ("app.kubernetes.io/name=mysql", [req("app.kubernetes.io/name", R.EQUALS, "mysql")]),
    ],
)
def test_parse_structure(text: str, requirements: list[Requirement]) -> None:
    assert parse_selector(text).requirements == tuple(requirements)


def test_parse_is_deterministic() -> None:
    # apimachinery TestDeterministicParse: written order does not matter.
    first, second = parse_selector("x=a,a=x"), parse_selector("a=x,x=a")
    assert first == second
    assert str(first) == str(second) == "a=x,x=a"


@pytest.mark.parametrize("text", ["", " ", "\t\r\n "])
def test_empty_text_is_everything(text: str) -> None:
    assert parse_selector(text) is EVERYTHING


# --------------------------------------------------------------------------- parser: bad input


@pytest.mark.parametrize(
    ("text", "mentions"),
    [
        # apimachinery's rejected strings.
        ("x=a||y=b", "'a||y'"),
        ("x==a==b", "'=='"),
        ("!x=a", "'='"),
        ("x<a", "integer"),
        ("x,,y", "offset 2"),
        (",x,y", "offset 0"),
        ("x nott in (y)", "'nott'"),
        ("a in (xyz),", "end of string"),
        ("a in (xyz)b notin ()", "'b'"),
        ("a in (xyz abc)", "'abc'"),
        ("a notin(", "end of string"),
        ("a (", "'('"),
        ("(", "'('"),
        # More malformed shapes.
        (",", "','"),
        ("!", "end of string"),
        ("!!x", "'!'"),
        ("! =x", "'='"),
        ("=a", "'='"),
        ("x in", "end of string"),
        ("x in a", "'a'"),
        ("x in (a", "end of string"),
        ("x in (a))", "')'"),
        ("x in ((a))", "'('"),
        ("x in (a,=)", "'='"),
        ("x notin", "end of string"),
        ("x = a b", "'b'"),
        ("x y", "'y'"),
        ("x=(", "'('"),
        ("x=!", "'!'"),
        ("x ! y", "'!'"),
        ("x=a,", "end of string"),
        ("x=a;y=b", "'a;y'"),
        ("x=a y=b", "'y'"),
        ("x>", "integer"),
        ("x>1.5", "integer"),
        ("x>-1", "invalid label value"),  # `-1` is an integer but not a valid label value
        ("x>99999999999999999999", "integer"),  # beyond int64
        # Invalid keys and values.
        ("a/b/c", "'a/b/c'"),
        ("Example.com/x", "prefix part"),
        ("/x", "prefix part must be non-empty"),
        ("x/", "name part must be non-empty"),
        ("-x", "name part"),
        ("a" * 64, "no more than 63"),
        ("x=" + "a" * 64, "no more than 63"),
        ("x in (ok, -bad)", "'-bad'"),
        ("x=a/b", "'a/b'"),
        # Go stops at a NUL byte and ignores the rest; here it is just an invalid character.
        ("x\x00,y in (", "'x\\x00'"),
        # Only ' ', \t, \r and \n separate tokens, as in Go; other space is part of a word.
        ("x\u00a0=a", "invalid label key"),
        ("x\v", "invalid label key"),
    ],
)
def test_parse_rejects(text: str, mentions: str) -> None:
    with pytest.raises(SelectorError) as caught:
        parse_selector(text)
    message = str(caught.value)
    assert mentions in message
    assert message.startswith("invalid label selector ")


def test_selector_error_is_a_value_error() -> None:
    with pytest.raises(ValueError, match=r"found 'abc' at offset 10, expected ',' or '\)'"):
        parse_selector("a in (xyz abc)")


def test_parse_rejects_non_text() -> None:
    with pytest.raises(TypeError):
        parse_selector(None)  # type: ignore[arg-type]


def test_long_input_is_cut_in_messages() -> None:
    with pytest.raises(SelectorError) as caught:
        parse_selector("x=" + "a" * 1000)
    assert len(str(caught.value)) < 400


# --------------------------------------------------------------------------- matching


@pytest.mark.parametrize(
    ("text", "labels", "expected"),
    [
        # apimachinery TestSelectorMatches.
        ("", {"x": "y"}, True),
        ("x=y", {"x": "y"}, True),
        ("x=y,z=w", {"x": "y", "z": "w"}, True),
        ("x!=y,z!=w", {"x": "z", "z": "a"}, True),
        ("notin=in", {"notin": "in"}, True),
        ("x", {"x": "z"}, True),
        ("!x", {"y": "z"}, True),
        ("x>1", {"x": "2"}, True),
        ("x<1", {"x": "0"}, True),
        ("x=z", {}, False),
        ("x=y", {"x": "z"}, False),
        ("x=y,z=w", {"x": "w", "z": "w"}, False),
        ("x!=y,z!=w", {"x": "z", "z": "w"}, False),
        ("x", {"y": "z"}, False),
        ("!x", {"x": "z"}, False),
        ("x>1", {"x": "0"}, False),
        ("x<1", {"x": "2"}, False),
        ("foo=bar", {"foo": "bar", "baz": "blah"}, True),
        ("foo=bar,baz=blah", {"foo": "bar", "baz": "blah"}, True),
        ("foo=blah", {"foo": "bar", "baz": "blah"}, False),
        ("foo=bar,foobar=bar,baz=blah", {"foo": "bar", "baz": "blah"}, False),
        # apimachinery TestRequirementSelectorMatching.
        ("x in (foo),y notin (alpha)", {"x": "foo", "y": "baz"}, True),
        ("x in (foo),y in (alpha)", {"x": "foo", "y": "baz"}, False),
        ("x notin (),y", {"y": ""}, True),
        ("!x,y", {"y": ""}, True),
        ("x notin (),!y", {"y": ""}, False),
        ("x in ()", {"y": "baz"}, False),
        ("z>1", {"z": "2"}, True),
        ("z>1", {"z": "v2"}, False),
        # The empty value is a value, and needs the key.
        ("x=", {"x": ""}, True),
        ("x=", {}, False),
        ("x=", {"x": "a"}, False),
        ("x in ()", {"x": ""}, True),
        ("x in (,a)", {"x": "a"}, True),
        ("x!=", {}, True),
        ("x!=", {"x": ""}, False),
        ("x notin (,a)", {"x": "b"}, True),
        ("x notin (,a)", {"x": ""}, False),
        ("x", {"x": ""}, True),
        # Inequalities: the label must exist and be an integer; int64 range, signs allowed.
        ("x>1", {}, False),
        ("x<1", {}, False),
        ("x>1", {"x": ""}, False),
        ("x<5", {"x": "-3"}, True),
        ("x>5", {"x": "+6"}, True),
        ("x>5", {"x": "1_000"}, False),
        ("x>5", {"x": " 6"}, False),
        ("x>5", {"x": "\u0666\u0666"}, False),  # Arabic-Indic digits: int() takes them, Go does not
        ("x<5", {"x": "-99999999999999999999"}, False),  # outside int64
        ("x>1,x<3", {"x": "2"}, True),
        ("x>1,x<3", {"x": "3"}, False),
        # Same key, contradictory requirements.
        ("x=a,x=b", {"x": "a"}, False),
        ("x,!x", {"x": "a"}, False),
        ("x,!x", {}, False),
        # Prefixed keys are matched whole.
        ("example.com/app=web", {"app": "web"}, False),
        ("example.com/app=web", {"example.com/app": "web"}, True),
        # Case matters in keys and values.
        ("App=web", {"app": "web"}, False),
        ("app=Web", {"app": "web"}, False),
    ],
)
def test_matches(text: str, labels: dict[str, str], expected: bool) -> None:
    selector = parse_selector(text)
    assert selector.matches(labels) is expected
    # The precompiled fast path agrees with the per-requirement reference semantics.
    assert all(r.matches(labels) for r in selector.requirements) is expected
    # And with a read-only mapping, which is what snapshots hold.
    assert selector.matches(MappingProxyType(labels)) is expected


class PlainMapping(Mapping[str, str]):
    """A Mapping that is not a dict: matching must rely only on the Mapping interface."""

    def __init__(self, data: dict[str, str]) -> None:
        self._data = data

    def __getitem__(self, key: str) -> str:
        return self._data[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("app=web", True),
        ("app=web,tier in (fe,be)", True),
        ("app=web,!canary", True),
        ("app=web,canary", False),
        ("tier notin (fe)", False),
    ],
)
def test_matches_any_mapping(text: str, expected: bool) -> None:
    labels = PlainMapping({"app": "web", "tier": "fe"})
    assert parse_selector(text).matches(labels) is expected


def test_equality_only_selector_is_a_loop_over_pairs() -> None:
    # Service selectors are all equality: they must not go through per-requirement closures.
    selector = parse_selector("app=web,tier==fe,track in (stable)")
    assert selector._pairs == (("app", "web"), ("tier", "fe"), ("track", "stable"))
    assert selector._tests == ()
    mixed = parse_selector("app=web,tier in (fe,be),!canary")
    assert mixed._pairs == (("app", "web"),)
    assert len(mixed._tests) == 2


# --------------------------------------------------------------------------- null vs empty


@pytest.mark.parametrize(
    "labels", [{}, {"app": "web"}, {"environment": "production", "tier": "frontend"}]
)
def test_everything_and_nothing(labels: dict[str, str]) -> None:
    assert EVERYTHING.matches(labels)
    assert not NOTHING.matches(labels)


def test_null_and_empty_properties() -> None:
    assert EVERYTHING.empty and not EVERYTHING.nothing
    assert NOTHING.nothing and not NOTHING.empty
    assert NOTHING != EVERYTHING
    assert EVERYTHING.requirements == NOTHING.requirements == ()
    assert EVERYTHING.keys() == NOTHING.keys() == frozenset()
    # As in apimachinery, neither has a string form; `.nothing` tells them apart.
    assert str(EVERYTHING) == str(NOTHING) == ""
    assert repr(EVERYTHING) == "<Selector everything>"
    assert repr(NOTHING) == "<Selector nothing>"
    selector = parse_selector("a=b")
    assert not selector.empty and not selector.nothing


@pytest.mark.parametrize(
    ("build", "expected"),
    [
        (lambda: selector_from_map(None), NOTHING),
        (lambda: selector_from_map({}), EVERYTHING),
        (lambda: selector_from_map(MappingProxyType({})), EVERYTHING),
        (lambda: selector_from_label_selector(None), NOTHING),
        (lambda: selector_from_label_selector({}), EVERYTHING),
        (lambda: selector_from_label_selector({"matchLabels": None}), EVERYTHING),
        (lambda: selector_from_label_selector({"matchLabels": {}, "matchExpressions": []}), EVERYTHING),
        (lambda: selector_from_label_selector({"matchExpressions": None}), EVERYTHING),
        (lambda: parse_selector(""), EVERYTHING),
        (lambda: Selector(), EVERYTHING),
        (lambda: Selector([]), EVERYTHING),
    ],
)
def test_null_versus_empty_inputs(build, expected: Selector) -> None:  # type: ignore[no-untyped-def]
    result = build()
    assert result == expected
    assert result.nothing is expected.nothing
    assert result.matches({"any": "thing"}) is (expected is EVERYTHING)


# --------------------------------------------------------------------------- map and API forms


def test_selector_from_map_is_equality() -> None:
    selector = selector_from_map({"tier": "frontend", "app": "web"})
    assert selector.requirements == (req("app", R.EQUALS, "web"), req("tier", R.EQUALS, "frontend"))
    assert selector == parse_selector("app=web,tier=frontend")
    assert selector.matches({"app": "web", "tier": "frontend", "extra": "x"})
    assert not selector.matches({"app": "web"})


@pytest.mark.parametrize(
    ("mapping", "mentions"),
    [
        ({"version": 1}, "must be a string"),
        ({"canary": True}, "must be a string"),
        ({"app": None}, "must be a string"),
        ({1: "x"}, "invalid label key 1"),
        ({"bad key": "x"}, "'bad key'"),
        ({"app": "has space"}, "'has space'"),
        ({"app": "a" * 64}, "no more than 63"),
        (["app=web"], "must map label keys"),
        ("app=web", "must map label keys"),
    ],
)
def test_selector_from_map_rejects(mapping: object, mentions: str) -> None:
    with pytest.raises(SelectorError) as caught:
        selector_from_map(mapping)  # type: ignore[arg-type]
    assert mentions in str(caught.value)


@pytest.mark.parametrize(
    ("obj", "canonical"),
    [
        ({"matchLabels": {"b": "2", "a": "1"}}, "a=1,b=2"),
        ({"matchExpressions": [{"key": "x", "operator": "Exists"}]}, "x"),
        ({"matchExpressions": [{"key": "x", "operator": "Exists", "values": []}]}, "x"),
        ({"matchExpressions": [{"key": "x", "operator": "DoesNotExist", "values": None}]}, "!x"),
        ({"matchExpressions": [{"key": "x", "operator": "In", "values": ["b", "a", "b"]}]}, "x in (a,b)"),
        ({"matchExpressions": [{"key": "x", "operator": "In", "values": [""]}]}, "x in ()"),
        ({"matchExpressions": [{"key": "x", "operator": "NotIn", "values": ["", "a"]}]}, "x notin (,a)"),
        (
            # matchLabels and expressions on the same key are both kept (ANDed).
            {
                "matchLabels": {"x": "a"},
                "matchExpressions": [{"key": "x", "operator": "NotIn", "values": ["b"]}],
            },
            "x=a,x notin (b)",
        ),
    ],
)
def test_selector_from_label_selector(obj: dict[str, object], canonical: str) -> None:
    selector = selector_from_label_selector(obj)
    assert str(selector) == canonical
    assert parse_selector(canonical) == selector


@pytest.mark.parametrize(
    ("obj", "mentions"),
    [
        ({"matchExpressions": [{"key": "x", "operator": "In", "values": []}]}, "non-empty"),
        ({"matchExpressions": [{"key": "x", "operator": "In"}]}, "non-empty"),
        ({"matchExpressions": [{"key": "x", "operator": "NotIn", "values": None}]}, "non-empty"),
        ({"matchExpressions": [{"key": "x", "operator": "Exists", "values": ["a"]}]}, "takes no values"),
        ({"matchExpressions": [{"key": "x", "operator": "DoesNotExist", "values": ["a"]}]}, "takes no values"),
        # Operators are the API's capitalised names; the string form's `in` and `Gt` are not valid here.
        ({"matchExpressions": [{"key": "x", "operator": "in", "values": ["a"]}]}, "matchExpressions[0].operator"),
        ({"matchExpressions": [{"key": "x", "operator": "Gt", "values": ["1"]}]}, "'Gt' is not a valid"),
        ({"matchExpressions": [{"key": "x"}]}, "matchExpressions[0].operator: None"),
        ({"matchExpressions": [{"operator": "Exists"}]}, "matchExpressions[0].key: required"),
        ({"matchExpressions": [{"key": "x", "operator": "Exists"}, "x"]}, "matchExpressions[1]: must be an object"),
        ({"matchExpressions": [{"key": "x", "operator": "In", "values": "cache"}]}, "must be a list of strings"),
        ({"matchExpressions": [{"key": "x", "operator": "In", "values": [1]}]}, "must be a string"),
        ({"matchExpressions": [{"key": "Bad Key", "operator": "Exists"}]}, "'Bad Key'"),
        ({"matchExpressions": [{"key": "x", "operator": "In", "values": ["a"], "value": "b"}]}, "unknown field(s) value"),
        ({"matchExpressions": {"key": "x", "operator": "Exists"}}, "matchExpressions: must be a list"),
        ({"matchLabels": [["app", "web"]]}, "matchLabels: must be a map"),
        ({"matchLabels": {"app": 5}}, "matchLabels: "),
        # A misspelt field must not silently turn into "select everything".
        ({"matchLabel": {"app": "web"}}, "unknown label selector field(s) matchLabel"),
        ("app=web", "must be an object"),
    ],
)
def test_selector_from_label_selector_rejects(obj: object, mentions: str) -> None:
    with pytest.raises(SelectorError) as caught:
        selector_from_label_selector(obj)  # type: ignore[arg-type]
    assert mentions in str(caught.value)


# --------------------------------------------------------------------------- requirements


@pytest.mark.parametrize(
    ("key", "operator", "values", "valid"),
    [
        # apimachinery TestRequirementConstructor.
        ("x", R.IN, (), False),
        ("x", R.NOT_IN, (), False),
        ("x", R.IN, ("foo",), True),
        ("x", R.NOT_IN, ("foo",), True),
        ("x", R.EXISTS, (), True),
        ("x", R.DOES_NOT_EXIST, (), True),
        ("1foo", R.IN, ("bar",), True),
        ("1234", R.IN, ("bar",), True),
        ("y", R.GREATER_THAN, ("1",), True),
        ("z", R.LESS_THAN, ("6",), True),
        ("foo", R.GREATER_THAN, ("bar",), False),
        ("barz", R.LESS_THAN, ("blah",), False),
        ("a" * 254, R.EXISTS, (), False),
        # Arity.
        ("x", R.EQUALS, (), False),
        ("x", R.EQUALS, ("a", "b"), False),
        ("x", R.NOT_EQUALS, ("",), True),
        ("x", R.EXISTS, ("a",), False),
        ("x", R.GREATER_THAN, ("1", "2"), False),
        # Operators given as their strings.
        ("x", "in", ("a",), True),
        ("x", "!", (), True),
        ("x", "In", ("a",), False),
        ("x", "~", ("a",), False),
        # A bare string would be a set of characters.
        ("x", R.IN, "abc", False),
        ("x", R.IN, None, False),
    ],
)
def test_requirement_constructor(key: str, operator: Operator, values: tuple[str, ...], valid: bool) -> None:
    if valid:
        requirement = Requirement(key, operator, values)
        assert requirement.operator is Operator(operator)
    else:
        with pytest.raises(SelectorError):
            Requirement(key, operator, values)


def test_requirement_values_are_a_sorted_set() -> None:
    requirement = Requirement("x", Operator.IN, ["b", "a", "b", ""])
    assert requirement.values == ("", "a", "b")
    assert requirement == Requirement("x", Operator.IN, ("a", "", "b"))
    assert str(requirement) == "x in (,a,b)"


# --------------------------------------------------------------------------- canonical round trip

ROUND_TRIP = [
    "x=a,y=b,z=c",
    "x!=a,y=b",
    "x=",
    "x=,z=",
    "!x",
    "x>1,z<5",
    "x==a",
    "x in (),y notin (,a)",
    "z!=a,z",
    "z,z!=a",
    "a in (in,notin,x,y,z)",
    "notin=in",
    "environment in (production, qa),tier notin (frontend, backend),partition,!canary",
    "example.com/app=web,app.kubernetes.io/name in (mysql)",
    "x notin (abc,def),bar,z in (),w",
    "a in (b,c),d notin (e)",
]


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_string_round_trip(text: str) -> None:
    selector = parse_selector(text)
    again = parse_selector(str(selector))
    assert again == selector
    assert hash(again) == hash(selector)
    assert str(again) == str(selector)


@pytest.mark.parametrize(
    "selector",
    [
        selector_from_map({"app": "web", "tier": ""}),
        selector_from_label_selector(
            {
                "matchLabels": {"component": "redis"},
                "matchExpressions": [
                    {"key": "tier", "operator": "In", "values": ["cache", ""]},
                    {"key": "environment", "operator": "NotIn", "values": ["dev"]},
                    {"key": "canary", "operator": "DoesNotExist"},
                    {"key": "partition", "operator": "Exists"},
                ],
            }
        ),
        Selector([req("b", R.EXISTS), req("a", R.GREATER_THAN, "3")]),
        EVERYTHING,
    ],
)
def test_built_selectors_round_trip(selector: Selector) -> None:
    assert parse_selector(str(selector)) == selector


def test_different_selectors_differ() -> None:
    assert parse_selector("x=a") != parse_selector("x=b")
    assert parse_selector("x=a") != parse_selector("x in (a)")
    # apimachinery keeps `==` as written, so it prints back as `==`.
    assert parse_selector("x=a") != parse_selector("x==a")
    assert parse_selector("x") != parse_selector("!x")
    assert parse_selector("x") != "x"


# --------------------------------------------------------------------------- the Selector object


def test_selector_is_immutable() -> None:
    selector = parse_selector("app=web")
    with pytest.raises(AttributeError):
        selector._requirements = ()  # type: ignore[misc]
    with pytest.raises(AttributeError):
        selector.anything = 1  # type: ignore[attr-defined]
    with pytest.raises(AttributeError):
        del selector._pairs
    with pytest.raises(AttributeError):
        selector.requirements = ()  # type: ignore[misc]
    assert not hasattr(selector, "__dict__")
    with pytest.raises(AttributeError):
        Requirement("x", Operator.EXISTS).key = "y"  # type: ignore[misc]


def test_selector_is_hashable() -> None:
    seen = {parse_selector("a=1,b=2"), parse_selector("b=2,a=1"), selector_from_map({"a": "1", "b": "2"})}
    assert len(seen) == 1
    assert len({EVERYTHING, NOTHING, parse_selector("")}) == 2


@pytest.mark.parametrize("selector", [parse_selector("a=1,b in (x,y),!c,d>3"), EVERYTHING, NOTHING])
def test_selector_pickles_and_copies(selector: Selector) -> None:
    restored = pickle.loads(pickle.dumps(selector))
    assert restored == selector
    assert restored.matches({"a": "1", "b": "x", "d": "4"}) is selector.matches({"a": "1", "b": "x", "d": "4"})
    assert copy.copy(selector) is selector
    assert copy.deepcopy(selector) is selector


def test_keys() -> None:
    assert parse_selector("a=1,!b,c in (x),c notin (y),d").keys() == frozenset("abcd")
    assert parse_selector("example.com/x").keys() == {"example.com/x"}


def test_selector_rejects_non_requirements() -> None:
    with pytest.raises(TypeError):
        Selector(["a=b"])  # type: ignore[list-item]


# --------------------------------------------------------------------------- key and value validation


@pytest.mark.parametrize(
    "key",
    [
        "a",
        "A",
        "1",
        "a-b_c.d",
        "MyName",
        "my.name",
        "123-abc",
        "a" * 63,
        "example.com/MyName",
        "app.kubernetes.io/name",
        "kubernetes.io/os",
        "k8s.io/x",
        "0.1.2.domain/99",
        "this-is-a-dns.domain.com/key-with-dash",
        "a" * 253 + "/" + "b" * 63,
    ],
)
def test_valid_label_keys(key: str) -> None:
    assert validate_label_key(key) is None


@pytest.mark.parametrize(
    ("key", "mentions"),
    [
        ("", "name part must be non-empty"),
        ("-a", "name part must consist"),
        ("a-", "name part must consist"),
        ("_a", "name part must consist"),
        (".a", "name part must consist"),
        ("a b", "name part must consist"),
        ("a:b", "name part must consist"),
        ("ä", "name part must consist"),
        ("a\n", "name part must consist"),  # re's `$` would let this through
        ("a" * 64, "name part must be no more than 63 characters"),
        ("a/b/c", "has 2 '/'"),
        ("/a", "prefix part must be non-empty"),
        ("a/", "name part must be non-empty"),
        ("Example.com/a", "prefix part must be a lowercase RFC 1123 subdomain"),
        ("ex_ample.com/a", "prefix part must be a lowercase RFC 1123 subdomain"),
        ("ex..com/a", "prefix part must be a lowercase RFC 1123 subdomain"),
        ("-ex.com/a", "prefix part must be a lowercase RFC 1123 subdomain"),
        ("ex.com-/a", "prefix part must be a lowercase RFC 1123 subdomain"),
        ("a" * 254 + "/b", "prefix part must be no more than 253 characters"),
        ("ex.com/-a", "name part must consist"),
        (5, "must be a string"),
        (None, "must be a string"),
    ],
)
def test_invalid_label_keys(key: object, mentions: str) -> None:
    message = validate_label_key(key)
    assert message is not None
    assert mentions in message
    assert message.startswith("invalid label key ")


def test_invalid_key_reports_every_problem() -> None:
    message = validate_label_key("Bad_Prefix/" + "-" * 64)
    assert message is not None
    assert "prefix part" in message and "no more than 63" in message and "name part must consist" in message


@pytest.mark.parametrize(
    "value",
    ["", "a", "A", "1", "MyValue", "my_value", "12345", "a-b_c.d", "10.10.100.1", "a" * 63],
)
def test_valid_label_values(value: str) -> None:
    assert validate_label_value(value) is None


@pytest.mark.parametrize(
    ("value", "mentions"),
    [
        ("a" * 64, "no more than 63 characters"),
        ("-a", "must be empty or consist"),
        ("a-", "must be empty or consist"),
        ("_a", "must be empty or consist"),
        ("a b", "must be empty or consist"),
        ("a/b", "must be empty or consist"),
        ("a\n", "must be empty or consist"),
        (" ", "must be empty or consist"),
        ("é", "must be empty or consist"),
        (1, "must be a string"),
        (True, "must be a string"),
        (None, "must be a string"),
    ],
)
def test_invalid_label_values(value: object, mentions: str) -> None:
    message = validate_label_value(value)
    assert message is not None
    assert mentions in message
    assert message.startswith("invalid label value ")
