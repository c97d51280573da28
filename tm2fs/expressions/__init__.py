r"""Requirements and rank expressions that place VM disks on storage backends.

In the spirit of OpenNebula's SCHED_DS_REQUIREMENTS and SCHED_DS_RANK: a VM template says which
backends may hold its disks (`FREE > 20G & TAGS @> SSD & STATE = READY`) and which of those it
prefers (`FREE - 10G * COST`). Placement evaluates both over every backend of the pool, so each text
is parsed once (by a small recursive-descent parser, with errors that point at a column) and
compiled into closures that evaluate in a few microseconds.

One module per stage: `tokens` (the lexer, numbers with size units, ExpressionError), `values`
(the two sides of a comparison and the rules for comparing them), `nodes` (the closures both
grammars compile to), `parser` (the two grammars below). This module is the public face:
`parse_requirements` and `parse_rank`, and the `Requirements` and `Rank` they return.

Requirements (a boolean; `!` binds tightest, then comparisons, then `&`, then `|`)::

    requirements := [ or ]                      (empty text: every backend matches)
    or           := and ( '|' and )*
    and          := unary ( '&' unary )*
    unary        := '!' unary | '(' or ')' | comparison
    comparison   := operand ( '=' | '!=' | '>' | '<' | '>=' | '<=' | '@>' ) operand
    operand      := NAME | NUMBER | STRING | WORD

Rank (a number; usual precedence, unary minus binds tightest, `/` is left-associative)::

    rank    := [ sum ]                          (empty text: every backend ranks 0)
    sum     := product ( ( '+' | '-' ) product )*
    product := factor ( ( '*' | '/' ) factor )*
    factor  := ( '-' | '+' ) factor | '(' sum ')' | NAME | NUMBER

Tokens. NAME is `[A-Za-z_][A-Za-z0-9_]*`, case-insensitive (normalised to upper case). NUMBER is
`12`, `0.5`, `-3` (requirements only; rank has unary minus) or a size with a binary unit — `20G`,
`1.5T`, `512MiB`, `4KB`: K, M, G, T, P, alone or followed by `B` or `iB`, are powers of 1024, and
sizes become bytes. STRING is double- or single-quoted, with `\"`, `\'` and `\\` as escapes. WORD
(requirements only) is any other run of characters up to a space, a quote or an operator
character, so `SSD`, `iscsi-fast*` and `10.0.0.1` need no quotes.

Meaning of a comparison:

- A NAME on the left is an attribute. A NAME on the right is an attribute after `>`, `<`, `>=`,
  `<=` (`FREE > USED`) or when the left side is a value (`20G < FREE`); after `=`, `!=` and `@>` it
  is a plain word, as in OpenNebula: `STATE = ERROR` compares with the word ERROR, not with the
  ERROR attribute.
- `=` and `!=` compare numbers when one side is a number and the other is or parses as one;
  otherwise they compare text, case-sensitively, and a written value holding `*`, `?` or `[...]`
  is a shell wildcard (fnmatch.fnmatchcase). A list attribute compares as its comma-joined text.
- `@>` is "contains": a list attribute contains an element equal to (or matching) the value; a
  string attribute contains the value as a substring (wildcards allowed).
- `>`, `<`, `>=`, `<=` compare numbers (strings that parse as numbers count); two non-numeric
  strings compare lexically; anything else (a number against a word, a list) is false.
- A missing attribute, or one whose value is None, makes a comparison false, except `!=`, which
  is then true — as OpenNebula does.

In a rank, attributes must hold numbers (or strings that parse as numbers); a missing or None
attribute counts as 0, anything else raises ExpressionError when evaluated; `x / 0` is 0.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field

from .nodes import Attrs, Node, Test, Value, always, constant
from .parser import MAX_DEPTH, Parser
from .tokens import ExpressionError

__all__ = ["MAX_DEPTH", "ExpressionError", "Rank", "Requirements", "parse_rank", "parse_requirements"]


@dataclass(frozen=True, slots=True)
class Requirements:
    """A parsed requirements expression: which backends may hold a disk."""

    text: str
    attributes: frozenset[str]  # upper-case names of the attributes it reads
    _test: Test = field(repr=False, compare=False)
    _root: Node | None = field(repr=False, compare=False)

    def matches(self, attrs: Attrs) -> bool:
        """Whether a backend with these (upper-case keyed) attributes satisfies the requirements."""
        return self._test(attrs)

    def explain(self, attrs: Attrs) -> str:
        """The comparisons that decided the outcome, e.g. `TAGS @> SSD is false (TAGS = [HDD7K])`."""
        if self._root is None:
            return "no requirements"
        return "; ".join(self._root.why(attrs))

    def __str__(self) -> str:
        return self.text


@dataclass(frozen=True, slots=True)
class Rank:
    """A parsed rank expression: how much a backend is preferred (higher is better)."""

    text: str
    attributes: frozenset[str]
    _value: Value = field(repr=False, compare=False)

    def value(self, attrs: Attrs) -> float:
        """The rank of a backend; raises ExpressionError if a referenced attribute is not a number."""
        return self._value(attrs)

    def __str__(self) -> str:
        return self.text


def parse_requirements(text: str, known: Collection[str] | None = None) -> Requirements:
    """Parse and compile a requirements text; `known` (any case) rejects misspelt attributes early."""
    parser = Parser(text, rank=False, known=known)
    if parser.peek().kind == "end":
        return Requirements(text, frozenset(), always, None)
    root = parser.requirements()
    return Requirements(text, frozenset(parser.attributes), root.test, root)


def parse_rank(text: str, known: Collection[str] | None = None) -> Rank:
    """Parse and compile a rank text; an empty one ranks every backend 0."""
    parser = Parser(text, rank=True, known=known)
    if parser.peek().kind == "end":
        return Rank(text, frozenset(), constant(0.0).fn)
    node = parser.rank()
    return Rank(text, frozenset(parser.attributes), node.fn)
