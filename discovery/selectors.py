"""Kubernetes label selectors, evaluated the way k8s.io/apimachinery/pkg/labels evaluates them.

Rules this module keeps (each is a Kubernetes rule, not a local choice):

- A selector is the AND of its requirements. A requirement is one of ``k=v`` / ``k==v``
  (equal), ``k!=v``, ``k in (v1,v2)``, ``k notin (v1,v2)``, ``k`` (the key exists), ``!k``
  (the key does not exist), and the string-only ``k>n`` / ``k<n`` (integer compare, as
  apimachinery's parser allows; the API object form has no such operators).
- ``!=`` and ``notin`` also select objects that do not carry the key at all.
- An empty selector selects everything; a null selector (``None``) selects nothing.
- The empty string is a valid value: ``k=``, ``k in ()``, ``k in (,a)``.
- Keys are qualified names: an optional lowercase DNS-1123 subdomain prefix (at most 253
  characters) and ``/``, then a name of at most 63 characters from ``[-A-Za-z0-9_.]`` that
  starts and ends alphanumeric. Values are empty or at most 63 characters of the same shape.
- Requirements are kept sorted by key (a stable sort, so requirements on one key keep their
  written order). ``str()`` therefore prints the canonical form apimachinery prints, and
  ``parse_selector(str(s)) == s`` for every selector except NOTHING, which has no string form.

Everything here is pure and immutable: selectors go into snapshots and are shared by workers.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = [
    "EVERYTHING",
    "NOTHING",
    "Operator",
    "Requirement",
    "Selector",
    "SelectorError",
    "parse_selector",
    "selector_from_label_selector",
    "selector_from_map",
    "validate_label_key",
    "validate_label_value",
]


class SelectorError(ValueError):
    """A selector (string, map or LabelSelector object) that Kubernetes would reject."""


class Operator(enum.StrEnum):
    """Requirement operators; the values are apimachinery's ``selection.Operator`` strings."""

    EQUALS = "="
    DOUBLE_EQUALS = "=="
    NOT_EQUALS = "!="
    IN = "in"
    NOT_IN = "notin"
    EXISTS = "exists"
    DOES_NOT_EXIST = "!"
    GREATER_THAN = "gt"
    LESS_THAN = "lt"


# --------------------------------------------------------------------------- validation

# Limits and shapes from k8s.io/apimachinery/pkg/util/validation (IsQualifiedName,
# IsValidLabelValue, IsDNS1123Subdomain). Patterns are applied with fullmatch(): Python's
# ``$`` would also accept a trailing newline, Go's does not.
_NAME_MAX = 63
_PREFIX_MAX = 253
_VALUE_MAX = 63
_NAME_RE = re.compile(r"(?:[A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]")
_DNS1123_SUBDOMAIN_RE = re.compile(
    r"[a-z0-9](?:[-a-z0-9]*[a-z0-9])?(?:\.[a-z0-9](?:[-a-z0-9]*[a-z0-9])?)*"
)
_NAME_SHAPE = (
    "must consist of alphanumeric characters, '-', '_' or '.', and must start and end with "
    "an alphanumeric character (e.g. 'MyName', 'my.name', '123-abc')"
)
_PREFIX_SHAPE = (
    "must be a lowercase RFC 1123 subdomain: lowercase alphanumeric characters, '-' or '.', "
    "starting and ending with an alphanumeric character (e.g. 'example.com')"
)


def _show(text: object) -> str:
    """Quote a user string for a message; long ones are cut so a message stays one line."""
    if isinstance(text, str) and len(text) > 80:
        return repr(text[:77] + "...")
    return repr(text)


def validate_label_key(key: object) -> str | None:
    """Return why ``key`` is not a valid label key, or None when it is."""
    if not isinstance(key, str):
        return f"invalid label key {_show(key)}: must be a string"
    problems: list[str] = []
    parts = key.split("/")
    if len(parts) > 2:
        return (
            f"invalid label key {_show(key)}: a qualified name is an optional DNS subdomain "
            f"prefix and '/' followed by a name (e.g. 'example.com/MyName'); it has "
            f"{len(parts) - 1} '/'"
        )
    name = parts[-1]
    if len(parts) == 2:
        prefix = parts[0]
        if not prefix:
            problems.append("prefix part must be non-empty")
        else:
            if len(prefix) > _PREFIX_MAX:
                problems.append(f"prefix part must be no more than {_PREFIX_MAX} characters")
            if not _DNS1123_SUBDOMAIN_RE.fullmatch(prefix):
                problems.append(f"prefix part {_PREFIX_SHAPE}")
    if not name:
        problems.append("name part must be non-empty")
    else:
        if len(name) > _NAME_MAX:
            problems.append(f"name part must be no more than {_NAME_MAX} characters")
        if not _NAME_RE.fullmatch(name):
            problems.append(f"name part {_NAME_SHAPE}")
    if problems:
        return f"invalid label key {_show(key)}: " + "; ".join(problems)
    return None


def validate_label_value(value: object) -> str | None:
    """Return why ``value`` is not a valid label value, or None when it is ("" is valid)."""
    if not isinstance(value, str):
        # Typical cause: YAML turned `version: 1` or `canary: true` into a number or a bool.
        return f"invalid label value {_show(value)}: must be a string (quote it in YAML)"
    if not value:
        return None
    problems: list[str] = []
    if len(value) > _VALUE_MAX:
        problems.append(f"must be no more than {_VALUE_MAX} characters")
    if not _NAME_RE.fullmatch(value):
        problems.append(f"must be empty or {_NAME_SHAPE.removeprefix('must ')}")
    if problems:
        return f"invalid label value {_show(value)}: " + "; ".join(problems)
    return None


_INT64_RE = re.compile(r"[+-]?[0-9]+")
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


def _parse_int64(text: str) -> int | None:
    """Go's strconv.ParseInt(text, 10, 64): ASCII digits with an optional sign, in int64.

    Python's int() is laxer (underscores, surrounding spaces, non-ASCII digits), so it is
    only called on text the pattern has already accepted.
    """
    if not _INT64_RE.fullmatch(text):
        return None
    number = int(text)
    return number if _INT64_MIN <= number <= _INT64_MAX else None


# --------------------------------------------------------------------------- requirements

_EQUALITY_OPS = frozenset({Operator.EQUALS, Operator.DOUBLE_EQUALS, Operator.NOT_EQUALS})
_SET_OPS = frozenset({Operator.IN, Operator.NOT_IN})
_KEY_ONLY_OPS = frozenset({Operator.EXISTS, Operator.DOES_NOT_EXIST})
_INTEGER_OPS = frozenset({Operator.GREATER_THAN, Operator.LESS_THAN})
_SYMBOLS = {
    Operator.EQUALS: "=",
    Operator.DOUBLE_EQUALS: "==",
    Operator.NOT_EQUALS: "!=",
    Operator.GREATER_THAN: ">",
    Operator.LESS_THAN: "<",
}


@dataclass(frozen=True, slots=True)
class Requirement:
    """One ``key operator values`` clause, validated like apimachinery's NewRequirement.

    ``values`` is stored sorted and without duplicates: a requirement is a set condition,
    and apimachinery prints values sorted too.
    """

    key: str
    operator: Operator
    values: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        try:
            operator = Operator(self.operator)
        except ValueError:
            valid = ", ".join(repr(op.value) for op in Operator)
            raise SelectorError(
                f"requirement on key {_show(self.key)}: operator {_show(self.operator)} "
                f"is not one of {valid}"
            ) from None
        raw = self.values
        # A bare string is iterable and would silently become a set of characters.
        if isinstance(raw, (str, bytes)) or not isinstance(raw, Iterable):
            raise SelectorError(
                f"requirement on key {_show(self.key)}: values must be a list of strings, "
                f"not {type(raw).__name__}"
            )
        raw = tuple(raw)
        problems: list[str] = []
        if (message := validate_label_key(self.key)) is not None:
            problems.append(message)
        name = _SYMBOLS.get(operator, operator.value)
        if operator in _SET_OPS and not raw:
            problems.append(f"'{name}' needs a non-empty set of values")
        elif operator in _KEY_ONLY_OPS and raw:
            problems.append(f"'{name}' takes no values, got {len(raw)}")
        elif operator in _EQUALITY_OPS or operator in _INTEGER_OPS:
            if len(raw) != 1:
                problems.append(f"'{name}' needs exactly one value, got {len(raw)}")
            if operator in _INTEGER_OPS:
                for value in raw:
                    if not isinstance(value, str) or _parse_int64(value) is None:
                        problems.append(f"'{name}' needs an integer value, got {_show(value)}")
        for value in raw:
            if (message := validate_label_value(value)) is not None:
                problems.append(message)
        if problems:
            raise SelectorError(f"requirement on key {_show(self.key)}: " + "; ".join(problems))
        object.__setattr__(self, "operator", operator)
        object.__setattr__(self, "values", tuple(sorted(set(raw))))

    def matches(self, labels: Mapping[str, str]) -> bool:
        """The reference semantics; Selector.matches runs a precompiled form of the same."""
        operator = self.operator
        if operator is Operator.EXISTS:
            return self.key in labels
        if operator is Operator.DOES_NOT_EXIST:
            return self.key not in labels
        value = labels.get(self.key)
        if operator in _SET_OPS or operator in _EQUALITY_OPS:
            found = value is not None and value in self.values
            positive = operator is not Operator.NOT_IN and operator is not Operator.NOT_EQUALS
            # Negative operators select objects without the key too: "not equal to v".
            return found if positive else not found
        greater = operator is Operator.GREATER_THAN
        return _compare_integer(value, greater, _parse_int64(self.values[0]))

    def __str__(self) -> str:
        operator = self.operator
        if operator is Operator.EXISTS:
            return self.key
        if operator is Operator.DOES_NOT_EXIST:
            return "!" + self.key
        if operator in _SET_OPS:
            return f"{self.key} {operator} ({','.join(self.values)})"
        return f"{self.key}{_SYMBOLS[operator]}{self.values[0]}"


def _compare_integer(value: object, greater: bool, bound: int | None) -> bool:
    # A missing key or a non-integer value never satisfies an inequality (apimachinery).
    number = _parse_int64(value) if isinstance(value, str) else None
    if number is None or bound is None:
        return False
    return number > bound if greater else number < bound


def _compile(requirement: Requirement) -> Callable[[Mapping[str, str]], bool]:
    """A closure per requirement so that matching does no operator dispatch per call."""
    key, operator, values = requirement.key, requirement.operator, requirement.values
    if operator is Operator.EXISTS:
        return lambda labels: key in labels
    if operator is Operator.DOES_NOT_EXIST:
        return lambda labels: key not in labels
    if operator in _INTEGER_OPS:
        greater, bound = operator is Operator.GREATER_THAN, _parse_int64(values[0])
        return lambda labels: _compare_integer(labels.get(key), greater, bound)
    allowed = frozenset(values)
    if operator is Operator.IN:
        # get() gives None for a missing key, and None is never in a set of strings.
        return lambda labels: labels.get(key) in allowed
    # NOT_IN and NOT_EQUALS: a missing key (None) is "not in" and so selects, as Kubernetes says.
    return lambda labels: labels.get(key) not in allowed


def _never(labels: Mapping[str, str]) -> bool:
    return False


# --------------------------------------------------------------------------- selector


class Selector:
    """An immutable, hashable AND of requirements, or the null selector that selects nothing.

    Build one with parse_selector(), selector_from_map() or selector_from_label_selector(),
    or from Requirement objects. ``matches()`` is the hot path: equality requirements (the
    whole of a Service selector) are checked as a plain loop over (key, value) pairs, the
    others through one precompiled closure each.
    """

    __slots__ = ("_requirements", "_nothing", "_pairs", "_tests", "_keys", "_hash")

    _requirements: tuple[Requirement, ...]
    _nothing: bool
    _pairs: tuple[tuple[str, str], ...]
    _tests: tuple[Callable[[Mapping[str, str]], bool], ...]
    _keys: frozenset[str]
    _hash: int

    def __init__(self, requirements: Iterable[Requirement] = ()) -> None:
        requirements = tuple(requirements)
        for requirement in requirements:
            if not isinstance(requirement, Requirement):
                raise TypeError(f"expected Requirement, got {type(requirement).__name__}")
        # sorted() is stable: same-key requirements keep their order, as apimachinery's do.
        self._setup(tuple(sorted(requirements, key=_requirement_key)), nothing=False)

    def _setup(self, requirements: tuple[Requirement, ...], *, nothing: bool) -> None:
        pairs: list[tuple[str, str]] = []
        tests: list[Callable[[Mapping[str, str]], bool]] = []
        for requirement in requirements:
            operator = requirement.operator
            if operator is Operator.EQUALS or operator is Operator.DOUBLE_EQUALS or (
                operator is Operator.IN and len(requirement.values) == 1
            ):
                pairs.append((requirement.key, requirement.values[0]))
            else:
                tests.append(_compile(requirement))
        if nothing:
            tests = [_never]
        setattr_ = object.__setattr__
        setattr_(self, "_requirements", requirements)
        setattr_(self, "_nothing", nothing)
        setattr_(self, "_pairs", tuple(pairs))
        setattr_(self, "_tests", tuple(tests))
        setattr_(self, "_keys", frozenset(r.key for r in requirements))
        setattr_(self, "_hash", hash((nothing, requirements)))

    def matches(self, labels: Mapping[str, str]) -> bool:
        """True when ``labels`` (an object's metadata.labels) satisfies every requirement."""
        get = labels.get
        for key, value in self._pairs:
            # A missing key gives None, which never equals a (string) required value.
            if get(key) != value:
                return False
        for test in self._tests:
            if not test(labels):
                return False
        return True

    @property
    def requirements(self) -> tuple[Requirement, ...]:
        """The requirements, sorted by key; () for both EVERYTHING and NOTHING."""
        return self._requirements

    @property
    def empty(self) -> bool:
        """True when the selector does not restrict anything (it selects every object)."""
        return not self._nothing and not self._requirements

    @property
    def nothing(self) -> bool:
        """True for the null selector, which selects no object at all."""
        return self._nothing

    def keys(self) -> frozenset[str]:
        """The label keys the requirements look at."""
        return self._keys

    def __str__(self) -> str:
        # Like apimachinery, NOTHING prints as "" too; ask .nothing to tell it from EVERYTHING.
        return ",".join(str(requirement) for requirement in self._requirements)

    def __repr__(self) -> str:
        if self._nothing:
            return "<Selector nothing>"
        if not self._requirements:
            return "<Selector everything>"
        return f"<Selector {str(self)!r}>"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Selector):
            return NotImplemented
        return self._nothing == other._nothing and self._requirements == other._requirements

    def __hash__(self) -> int:
        return self._hash

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"Selector is immutable; cannot set {name!r}")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"Selector is immutable; cannot delete {name!r}")

    # The compiled closures cannot be pickled; rebuild them from the requirements instead.
    def __reduce__(self) -> tuple[Any, ...]:
        return (_restore, (self._requirements, self._nothing))

    def __copy__(self) -> Selector:
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> Selector:
        return self


def _requirement_key(requirement: Requirement) -> str:
    return requirement.key


def _restore(requirements: tuple[Requirement, ...], nothing: bool) -> Selector:
    return NOTHING if nothing else Selector(requirements)


def _make_nothing() -> Selector:
    selector = Selector.__new__(Selector)
    selector._setup((), nothing=True)
    return selector


EVERYTHING = Selector()
"""The empty selector: selects every object."""

NOTHING = _make_nothing()
"""The null selector: selects no object."""


# --------------------------------------------------------------------------- string parser

# Token kinds. The lexer and the grammar follow apimachinery's labels.Parse:
#   selector    ::= requirement ("," requirement)*
#   requirement ::= "!" KEY | KEY [ ("in" | "notin") "(" values ")" | op VALUE ]
#   op          ::= "=" | "==" | "!=" | ">" | "<"
#   values      ::= VALUE? ("," VALUE?)*          (an omitted VALUE is the empty string)
# Only ' ', '\t', '\r' and '\n' are whitespace there, so str.isspace() is not used. Go also
# treats a NUL byte as the end of input (silently dropping the rest); here it is an
# ordinary character, which key/value validation then rejects.
_END, _IDENT, _COMMA, _OPEN, _CLOSE, _NOT = "end", "ident", ",", "(", ")", "!"
_EQ, _EQEQ, _NEQ, _GT, _LT, _IN, _NOTIN = "=", "==", "!=", ">", "<", "in", "notin"

_TOKEN_RE = re.compile(r"(==|!=|[=!(),<>])|([^ \t\r\n=!(),<>]+)|[ \t\r\n]+")
_KEYWORDS = {"in": _IN, "notin": _NOTIN}
_OPERATOR_TOKENS = {
    _EQ: Operator.EQUALS,
    _EQEQ: Operator.DOUBLE_EQUALS,
    _NEQ: Operator.NOT_EQUALS,
    _IN: Operator.IN,
    _NOTIN: Operator.NOT_IN,
    _GT: Operator.GREATER_THAN,
    _LT: Operator.LESS_THAN,
}

_Token = tuple[str, str, int]  # kind, literal, offset in the text


def _lex(text: str) -> list[_Token]:
    tokens: list[_Token] = []
    # The three alternatives cover every character, so finditer() leaves no gaps.
    for match in _TOKEN_RE.finditer(text):
        symbol, word = match.group(1), match.group(2)
        if symbol is not None:
            tokens.append((symbol, symbol, match.start()))
        elif word is not None:
            tokens.append((_KEYWORDS.get(word, _IDENT), word, match.start()))
    tokens.append((_END, "", len(text)))
    return tokens


class _Parser:
    __slots__ = ("_text", "_tokens", "_index")

    def __init__(self, text: str) -> None:
        self._text = text
        self._tokens = _lex(text)
        self._index = 0

    # 'in' and 'notin' are keywords only where an operator may stand; everywhere else they
    # are plain identifiers, so `in=notin` and `x in (in,notin)` are valid (apimachinery's
    # "Values" parser context).
    def _peek(self) -> _Token:
        kind, literal, at = self._tokens[self._index]
        return (_IDENT, literal, at) if kind is _IN or kind is _NOTIN else (kind, literal, at)

    def _take(self) -> _Token:
        token = self._peek()
        self._index += 1
        return token

    def _take_operator(self) -> _Token:
        token = self._tokens[self._index]
        self._index += 1
        return token

    def _error(self, token: _Token, expected: str) -> SelectorError:
        kind, literal, at = token
        found = "end of string" if kind is _END else repr(literal)
        return SelectorError(
            f"invalid label selector {_show(self._text)}: found {found} at offset {at}, "
            f"expected {expected}"
        )

    def parse(self) -> list[Requirement]:
        requirements: list[Requirement] = []
        if self._peek()[0] is _END:
            return requirements
        while True:
            requirements.append(self._requirement())
            token = self._take()
            if token[0] is _END:
                return requirements
            if token[0] is not _COMMA:
                raise self._error(token, "',' or end of string")

    def _requirement(self) -> Requirement:
        token = self._take()
        if token[0] is _NOT:
            # `!key` is complete by itself; whatever follows must be ',' or the end.
            return self._build(self._key(self._take()), Operator.DOES_NOT_EXIST, ())
        if token[0] is not _IDENT:
            raise self._error(token, "'!' or a label key")
        key = self._key(token)
        if self._peek()[0] in (_END, _COMMA):
            return self._build(key, Operator.EXISTS, ())
        token = self._take_operator()
        operator = _OPERATOR_TOKENS.get(token[0])
        if operator is None:
            raise self._error(token, "one of in, notin, =, ==, !=, >, <, ',' or end of string")
        if operator in _SET_OPS:
            return self._build(key, operator, self._value_set())
        return self._build(key, operator, (self._exact_value(),))

    def _key(self, token: _Token) -> str:
        if token[0] is not _IDENT:
            raise self._error(token, "a label key")
        if (message := validate_label_key(token[1])) is not None:
            raise SelectorError(f"invalid label selector {_show(self._text)}: {message}")
        return token[1]

    def _value_set(self) -> tuple[str, ...]:
        token = self._take()
        if token[0] is not _OPEN:
            raise self._error(token, "'('")
        # A comma-separated list whose items may be empty: "()" is {""}, "(a,)" is {"a", ""}.
        values: list[str] = []
        want_item = True
        while True:
            token = self._take()
            kind = token[0]
            if kind is _IDENT and want_item:
                values.append(token[1])
                want_item = False
            elif kind is _COMMA:
                if want_item:
                    values.append("")
                want_item = True
            elif kind is _CLOSE:
                if want_item:
                    values.append("")
                return tuple(values)
            else:
                raise self._error(token, "a value, ',' or ')'" if want_item else "',' or ')'")

    def _exact_value(self) -> str:
        # `k=` and `k= ,j=x` carry the empty value.
        if self._peek()[0] in (_END, _COMMA):
            return ""
        token = self._take()
        if token[0] is not _IDENT:
            raise self._error(token, "a value")
        return token[1]

    def _build(self, key: str, operator: Operator, values: tuple[str, ...]) -> Requirement:
        try:
            return Requirement(key, operator, values)
        except SelectorError as exc:
            raise SelectorError(f"invalid label selector {_show(self._text)}: {exc}") from None


def parse_selector(text: str) -> Selector:
    """Parse the string form (``kubectl -l``): ``env=prod,tier notin (a,b),!canary``.

    "" (or only whitespace) is the empty selector, which selects everything. Raises
    SelectorError, naming the offending token and its offset, on anything apimachinery's
    labels.Parse would reject.
    """
    if not isinstance(text, str):
        raise TypeError(f"selector text must be str, not {type(text).__name__}")
    requirements = _Parser(text).parse()
    return Selector(requirements) if requirements else EVERYTHING


# --------------------------------------------------------------------------- API object forms


def selector_from_map(selector: Mapping[str, str] | None) -> Selector:
    """The selector of an equality map such as ``Service.spec.selector``.

    None is the null selector (NOTHING); ``{}`` is the empty selector (EVERYTHING); otherwise
    every ``key: value`` becomes a ``key=value`` requirement, keys and values validated.

    These are the library semantics only. Kubernetes gives a Service whose selector is
    absent or empty no managed endpoints at all (its Endpoints are maintained by hand), and
    apimachinery's own SelectorFromSet treats nil as "everything": deciding what a missing
    Service selector means is the endpoint code's job, not this function's.
    """
    if selector is None:
        return NOTHING
    if not isinstance(selector, Mapping):
        raise SelectorError(
            f"a selector map must map label keys to values, not {type(selector).__name__}"
        )
    if not selector:
        return EVERYTHING
    return Selector(
        Requirement(key, Operator.EQUALS, (value,)) for key, value in selector.items()
    )


_LABEL_SELECTOR_FIELDS = frozenset({"matchLabels", "matchExpressions"})
_EXPRESSION_FIELDS = frozenset({"key", "operator", "values"})
_API_OPERATORS = {
    "In": Operator.IN,
    "NotIn": Operator.NOT_IN,
    "Exists": Operator.EXISTS,
    "DoesNotExist": Operator.DOES_NOT_EXIST,
}


def selector_from_label_selector(label_selector: Mapping[str, Any] | None) -> Selector:
    """The selector of a ``metav1.LabelSelector`` object (``matchLabels`` + ``matchExpressions``).

    Follows metav1.LabelSelectorAsSelector: None selects nothing, an object with no
    requirements selects everything, matchLabels entries are ``key=value``, and the
    expression operators are In / NotIn (non-empty values) and Exists / DoesNotExist (no
    values). Unknown fields are rejected rather than ignored: a misspelt ``matchLabel``
    would otherwise turn the selector into one that selects everything.
    """
    if label_selector is None:
        return NOTHING
    if not isinstance(label_selector, Mapping):
        raise SelectorError(
            "a label selector must be an object with matchLabels and/or matchExpressions, "
            f"not {type(label_selector).__name__}"
        )
    unknown = sorted(map(str, set(label_selector) - _LABEL_SELECTOR_FIELDS))
    if unknown:
        raise SelectorError(
            f"unknown label selector field(s) {', '.join(unknown)}: "
            "expected matchLabels and/or matchExpressions"
        )
    match_labels = label_selector.get("matchLabels")
    expressions = label_selector.get("matchExpressions")
    if match_labels is None:
        match_labels = {}
    if expressions is None:
        expressions = []
    if not isinstance(match_labels, Mapping):
        raise SelectorError(f"matchLabels: must be a map, not {type(match_labels).__name__}")
    if isinstance(expressions, (str, bytes, Mapping)) or not isinstance(expressions, Iterable):
        raise SelectorError(
            f"matchExpressions: must be a list, not {type(expressions).__name__}"
        )
    expressions = list(expressions)
    if not match_labels and not expressions:
        return EVERYTHING

    requirements: list[Requirement] = []
    for key, value in match_labels.items():
        try:
            requirements.append(Requirement(key, Operator.EQUALS, (value,)))
        except SelectorError as exc:
            raise SelectorError(f"matchLabels: {exc}") from None
    for index, expression in enumerate(expressions):
        requirements.append(_expression_requirement(f"matchExpressions[{index}]", expression))
    return Selector(requirements)


def _expression_requirement(path: str, expression: object) -> Requirement:
    if not isinstance(expression, Mapping):
        raise SelectorError(f"{path}: must be an object, not {type(expression).__name__}")
    unknown = sorted(map(str, set(expression) - _EXPRESSION_FIELDS))
    if unknown:
        raise SelectorError(
            f"{path}: unknown field(s) {', '.join(unknown)}: expected key, operator, values"
        )
    if "key" not in expression:
        raise SelectorError(f"{path}.key: required")
    operator_name = expression.get("operator")
    operator = _API_OPERATORS.get(operator_name) if isinstance(operator_name, str) else None
    if operator is None:
        raise SelectorError(
            f"{path}.operator: {_show(operator_name)} is not a valid label selector operator "
            "(In, NotIn, Exists, DoesNotExist)"
        )
    values = expression.get("values")
    if values is None:
        values = ()
    try:
        return Requirement(expression["key"], operator, values)
    except SelectorError as exc:
        raise SelectorError(f"{path}: {exc}") from None
