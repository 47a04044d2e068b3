"""The permission query language of verifyKey: `a AND (b OR c)`.

    expr    := and (OR and)*
    and     := primary (AND primary)*
    primary := PERMISSION | "(" expr ")"

AND binds tighter than OR; AND/OR are case-insensitive whole words; a permission is made of
`[A-Za-z0-9._-:*/]` and is matched as an exact string (`*` is literal). A query is parsed
into nested tuples, `("and"|"or", children)` with strings at the leaves.

Compiled by Cython as `_query_c` (declarations in `_query_c.pxd`); runs as plain Python as
`_query_py`.
"""

from .errors import PermissionQuerySyntaxError


_PERMISSION_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-:*/")
_MAX_DEPTH = 100

_LPAREN = "("
_RPAREN = ")"
_AND = "AND"
_OR = "OR"


def _tokenize(query):
    tokens = []
    i = 0
    n = len(query)
    while i < n:
        c = query[i]
        if c == "(" or c == ")":
            tokens.append((c, c, i))
            i += 1
        elif c in " \t\r\n":
            i += 1
        elif c in _PERMISSION_CHARS:
            j = i + 1
            while j < n and query[j] in _PERMISSION_CHARS:
                j += 1
            word = query[i:j]
            upper = word.upper()
            if upper == _AND or upper == _OR:
                tokens.append((upper, word, i))
            else:
                tokens.append(("P", word, i))
            i = j
        else:
            raise PermissionQuerySyntaxError(f"illegal character {c!r} at position {i}")
    return tokens


class _Parser:
    def __init__(self, tokens):
        self.tokens = tokens
        self.pos = 0

    def peek(self):
        if self.pos < len(self.tokens):
            return self.tokens[self.pos][0]
        return ""

    def expr(self, depth):
        if depth > _MAX_DEPTH:
            raise PermissionQuerySyntaxError("query nests parentheses too deeply")
        children = [self.conjunction(depth)]
        while self.peek() == _OR:
            self.pos += 1
            children.append(self.conjunction(depth))
        return children[0] if len(children) == 1 else ("or", tuple(children))

    def conjunction(self, depth):
        children = [self.primary(depth)]
        while self.peek() == _AND:
            self.pos += 1
            children.append(self.primary(depth))
        return children[0] if len(children) == 1 else ("and", tuple(children))

    def primary(self, depth):
        kind = self.peek()
        if kind == "P":
            word = self.tokens[self.pos][1]
            self.pos += 1
            return word
        if kind == _LPAREN:
            self.pos += 1
            if self.peek() == _RPAREN:
                raise PermissionQuerySyntaxError("empty parentheses")
            node = self.expr(depth + 1)
            if self.peek() != _RPAREN:
                raise PermissionQuerySyntaxError("unclosed parenthesis")
            self.pos += 1
            return node
        if kind == "":
            raise PermissionQuerySyntaxError("expected a permission, found the end of the query")
        token = self.tokens[self.pos]
        raise PermissionQuerySyntaxError(f"expected a permission, found {token[1]!r} at position {token[2]}")


def parse_permission_query(query):
    """Parse a query into its tree; raises PermissionQuerySyntaxError with what is wrong."""
    tokens = _tokenize(query)
    if not tokens:
        raise PermissionQuerySyntaxError("empty query")
    parser = _Parser(tokens)
    node = parser.expr(0)
    if parser.pos != len(tokens):
        token = tokens[parser.pos]
        raise PermissionQuerySyntaxError(f"unexpected {token[1]!r} at position {token[2]}")
    return node


def permission_query_holds(node, permissions):
    """Whether a set of permission slugs satisfies a parsed query (short-circuiting)."""
    if type(node) is str:
        return node in permissions
    if node[0] == "and":
        for child in node[1]:
            if not permission_query_holds(child, permissions):
                return False
        return True
    for child in node[1]:
        if permission_query_holds(child, permissions):
            return True
    return False
