"""The recursive-descent parser of both grammars (see the package docstring), building `nodes`.

One `Parser` per text: a cursor over its tokens, errors that name the column and what was
expected, a nesting limit, and the attribute names met (checked against `known`, with a "did you
mean" hint) so that placement knows which attributes an expression reads.
"""

from __future__ import annotations

import difflib
from collections.abc import Collection
from typing import NoReturn

from .nodes import Cmp, Junction, Node, Not, Num, constant, rank_attr, rank_chain, rank_neg
from .tokens import ExpressionError, Token, tokenize
from .values import ORDER, Attr, Lit

MAX_DEPTH = 100  # nesting of '(', '!' and unary signs; deeper would exhaust Python's stack

_CMP_OPS = ("=", "!=", ">", "<", ">=", "<=", "@>")
_OPERANDS = ("name", "number", "string", "word")


class Parser:
    """Shared cursor, error reporting and attribute checks of both grammars."""

    def __init__(self, text: str, rank: bool, known: Collection[str] | None) -> None:
        self.text = text
        self.tokens = tokenize(text, rank)
        self.pos = 0
        self.depth = 0
        self.known = None if known is None else frozenset(k.upper() for k in known)
        self.attributes: set[str] = set()

    def peek(self) -> Token:
        return self.tokens[self.pos]

    def take(self) -> Token:
        tok = self.tokens[self.pos]
        self.pos += 1
        return tok

    def is_op(self, *ops: str) -> bool:
        tok = self.tokens[self.pos]
        return tok.kind == "op" and tok.text in ops

    def after(self) -> str:
        """` after '>='`: names the token before the current one, for 'expected ...' messages."""
        if self.pos == 0:
            return ""
        prev = self.tokens[self.pos - 1]
        return f" after '{self.text[prev.start:prev.end]}'"

    def fail(self, reason: str, column: int, hint: str | None = None) -> NoReturn:
        raise ExpressionError(reason, self.text, column, hint)

    def expected(self, what: str) -> NoReturn:
        tok = self.peek()
        self.fail(f"expected {what}{self.after()} at column {tok.column}", tok.column)

    def enter(self, tok: Token) -> None:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            self.fail(f"expression nested more than {MAX_DEPTH} levels deep at column {tok.column}",
                      tok.column)

    def attribute(self, tok: Token) -> Attr:
        name = tok.text.upper()
        if self.known is not None and name not in self.known:
            names = ", ".join(sorted(self.known)) or "none"
            close = difflib.get_close_matches(name, self.known, n=1)
            self.fail(f"unknown attribute '{tok.text}' at column {tok.column}; known: {names}", tok.column,
                      f"did you mean {close[0]}?" if close else None)
        self.attributes.add(name)
        return Attr(name, tok.column)

    def finish(self, what: str) -> None:
        tok = self.peek()
        if tok.kind == "end":
            return
        if tok.kind == "op" and tok.text == ")":
            self.fail(f"unexpected ')' at column {tok.column}", tok.column, "no '(' is open there")
        self.fail(f"expected {what} or end of expression at column {tok.column}", tok.column)

    def close(self, opener: Token, what: str) -> None:
        tok = self.peek()
        if tok.kind == "op" and tok.text == ")":
            self.take()
            self.depth -= 1
        elif tok.kind == "end":
            self.fail(f"unclosed '(' opened at column {opener.column}", opener.column, "add a ')'")
        else:
            self.fail(f"expected {what} or ')' at column {tok.column}", tok.column)

    # requirements

    def requirements(self) -> Node:
        node = self.either()
        self.finish("'&', '|'")
        return node

    def either(self) -> Node:
        children = [self.both()]
        while self.is_op("|"):
            self.take()
            children.append(self.both())
        return children[0] if len(children) == 1 else Junction(children, is_or=True)

    def both(self) -> Node:
        children = [self.unary()]
        while self.is_op("&"):
            self.take()
            children.append(self.unary())
        return children[0] if len(children) == 1 else Junction(children, is_or=False)

    def unary(self) -> Node:
        tok = self.peek()
        if self.is_op("!"):
            self.enter(self.take())
            node: Node = Not(self.unary())
            self.depth -= 1
            return node
        if self.is_op("("):
            self.enter(self.take())
            node = self.either()
            self.close(tok, "'&', '|'")
            return node
        if tok.kind in _OPERANDS:
            return self.comparison()
        self.expected("a comparison")

    def comparison(self) -> Cmp:
        left = self.take()
        if not self.is_op(*_CMP_OPS):
            self.expected("a comparison operator (=, !=, >, <, >=, <=, @>)")
        op = self.take().text
        if self.peek().kind not in _OPERANDS:
            self.expected("a value")
        right = self.take()
        source = self.text[left.start:right.end]
        if left.kind == "name":
            lhs: Attr | Lit = self.attribute(left)
            rhs = self.attribute(right) if right.kind == "name" and op in ORDER else Lit(right)
        elif right.kind == "name":
            lhs, rhs = Lit(left), self.attribute(right)
        elif left.kind == "word":
            self.fail(f"'{left.text}' at column {left.column} is not an attribute name", left.column,
                      "attribute names are letters, digits and '_', starting with a letter or '_'")
        else:
            self.fail(f"comparison at column {left.column} has no attribute on either side", left.column)
        return Cmp(op, lhs, rhs, source)

    # rank

    def rank(self) -> Num:
        node = self.sum()
        self.finish("an operator (+, -, *, /)")
        return node

    def sum(self) -> Num:
        first, rest = self.product(), []
        while self.is_op("+", "-"):
            op = self.take().text
            rest.append((op, self.product()))
        return rank_chain(first, rest) if rest else first

    def product(self) -> Num:
        first, rest = self.factor(), []
        while self.is_op("*", "/"):
            op = self.take().text
            rest.append((op, self.factor()))
        return rank_chain(first, rest) if rest else first

    def factor(self) -> Num:
        tok = self.peek()
        if self.is_op("-", "+"):
            self.enter(self.take())
            node = self.factor()
            self.depth -= 1
            return rank_neg(node) if tok.text == "-" else node
        if self.is_op("("):
            self.enter(self.take())
            node = self.sum()
            self.close(tok, "an operator (+, -, *, /)")
            return node
        if tok.kind == "number":
            self.take()
            assert tok.value is not None  # the lexer gives every number its value
            return constant(float(tok.value))
        if tok.kind == "name":
            self.take()
            attr = self.attribute(tok)
            return rank_attr(self.text, attr.name, attr.column)
        self.expected("a number, an attribute or '('")
