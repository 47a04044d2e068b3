"""The analytics query API's SQL, checked and scoped before ClickHouse sees it.

A query is parsed with sqlglot's ClickHouse dialect (never with regexes), checked on the tree,
rewritten if the root key is scoped, and generated again from the tree: what runs is what was
checked, never the caller's text, so comments, odd quoting and tokens sqlglot would read
differently from ClickHouse do not reach the server.

Allowed: one SELECT (with WITH / CTEs, UNION ALL and the other set operations, joins, subqueries)
whose tables are all public aliases (or CTEs in scope). Refused, each with a message that says so:
other statements and several statements, other tables and any database-qualified name
(`system.*`, `default.*`), table functions (`file()`, `url()`, `remote()`, `numbers()`, ...),
`IN <table name>`, functions that read outside the query (`file()`, `dictGet()`, `joinGet()`, ...),
SETTINGS, FORMAT, INTO OUTFILE, WITH RECURSIVE, a CTE named like an alias, and whatever the parser
cannot read.

Scoping: with `scope` (a root key allowed only some APIs or namespaces), every reference to an
alias becomes `(SELECT * FROM alias WHERE <scope column> IN ('a', 'b')) AS alias`, so the query
only ever sees the rows of its scope; an empty scope sees nothing.
"""
from __future__ import annotations

import functools
import logging
import re
from collections.abc import Mapping

import sqlglot
from sqlglot import exp
from sqlglot.errors import ErrorLevel, ParseError, TokenError

DIALECT = "clickhouse"
# sqlglot warns on every statement it falls back to reading as a bare command: callers' input,
# refused anyway, is no reason to fill the server's log.
logging.getLogger("sqlglot").setLevel(logging.ERROR)

# Scalar functions that read or touch something other than the query's own rows: the server's
# files, dictionaries, Join tables, other tables' structure, settings, the network, or Keeper.
# Compared in lower case (some ClickHouse functions are case-insensitive).
DENIED_FUNCTIONS = frozenset({
    "file", "joinget", "joingetornull", "hascolumnintable", "generateserialid", "catboostevaluate",
    "modelevaluate", "evalmlmethod", "naivebayesclassifier", "showcertificate", "getclienthttpheader",
    "getserversetting", "getmergetreesetting", "getsetting", "getsettingordefault", "getmacro", "globalvariable",
    "sleep", "sleepeachrow", "reversedns", "filesystemavailable", "filesystemcapacity", "filesystemunreserved",
    "addresstoline", "addresstolinewithinlines", "addresstosymbol", "demangle", "logtrace",
    "zookeepersessionuptime", "getoskernelversion", "serveruuid",
    # The function forms of IN take a table name as their second argument.
    "in", "notin", "globalin", "globalnotin", "nullin", "notnullin", "globalnullin", "globalnotnullin",
    "inignoreset", "notinignoreset", "globalinignoreset", "globalnotinignoreset", "nullinignoreset",
    "notnullinignoreset", "globalnullinignoreset", "globalnotnullinignoreset",
})
DENIED_FUNCTION_PREFIXES = ("dict", "file", "__")

# Statements (or parts of them) that have no place in a read-only query.
_STATEMENTS = tuple(getattr(exp, name) for name in (
    "DDL", "DML", "Command", "Create", "Drop", "Alter", "Insert", "Update", "Delete", "Merge", "TruncateTable",
    "Set", "Use", "Describe", "Show", "Kill", "Transaction", "Commit", "Rollback", "Pragma", "Copy", "Analyze",
    "Grant", "Revoke", "Cache", "Uncache", "LoadData", "Refresh", "Declare", "Detach", "Attach", "Export",
    "Summarize", "Into",
) if hasattr(exp, name))
# Nodes that name a table without being one: refused on the right of IN (ClickHouse reads
# `x IN t` and `x IN (t)` as "in the rows of table t").
_NAMES = (exp.Column, exp.Identifier, exp.Dot, exp.Var, exp.Table)
_ANSI = re.compile(r"\x1b\[[0-9;]*m")  # sqlglot underlines the culprit in its messages


class QueryNotAllowed(Exception):
    """The query is refused; the message says why (it becomes the 400's detail)."""


def check_query(sql: str, allowed: Mapping[str, str], scope: frozenset[str] | None) -> str:
    """The SQL to run for `sql`, or QueryNotAllowed.

    `allowed` maps each table the query may read (a public alias) to the column its rows are
    scoped by; `scope` is None for a root key that may read every row, else the values of that
    column it may see.
    """
    _sqlglot_understood()
    tree = _parse(sql)
    _check(tree, allowed)
    _prewhere_to_where(tree)
    if scope is not None:
        _scope(tree, allowed, scope)
    try:
        out = tree.sql(dialect=DIALECT, comments=False, unsupported_level=ErrorLevel.RAISE)
    except RecursionError:
        raise QueryNotAllowed("The query is nested too deeply.") from None
    except Exception as exc:  # noqa: BLE001  (sqlglot raises several kinds on what it can't write)
        raise QueryNotAllowed(f"The query uses syntax keysvc cannot pass on to ClickHouse: {exc}") from None
    # What is sent is checked again as it is: a generator quirk must not turn into an escape.
    _check(_parse(out), allowed)
    return out


def _parse(sql: str) -> exp.Expression:
    try:
        tokens = sqlglot.tokenize(sql, read=DIALECT)
    except TokenError as exc:
        raise QueryNotAllowed(f"The query could not be read: {_first_line(exc)}") from None
    except RecursionError:
        raise QueryNotAllowed("The query is nested too deeply.") from None
    except Exception as exc:  # noqa: BLE001
        raise QueryNotAllowed(f"The query could not be read: {_first_line(exc)}") from None
    for before, after in zip(tokens, tokens[1:]):
        if before.text.upper() == "INTO" and after.text.upper() == "OUTFILE":
            raise QueryNotAllowed("INTO OUTFILE is not allowed: the rows are returned in the response.")
    try:
        statements = sqlglot.parse(sql, read=DIALECT, error_level=ErrorLevel.RAISE)
    except ParseError as exc:
        raise QueryNotAllowed(f"The query could not be parsed: {_parse_error(exc)}") from None
    except RecursionError:
        raise QueryNotAllowed("The query is nested too deeply.") from None
    except Exception as exc:  # noqa: BLE001  (garbage may trip any kind of error in a parser)
        raise QueryNotAllowed(f"The query could not be parsed: {_first_line(exc)}") from None
    statements = [s for s in statements if s is not None]
    if not statements:
        raise QueryNotAllowed("The query is empty.")
    if len(statements) > 1:
        raise QueryNotAllowed(f"Only one statement is allowed; the query has {len(statements)}.")
    return statements[0]


def _parse_error(exc: ParseError) -> str:
    if not exc.errors:
        return _first_line(exc)
    error = exc.errors[0]
    near = _ANSI.sub("", str(error.get("highlight") or "")).strip()[:100]
    where = f" at line {error.get('line')}, column {error.get('col')}"
    return f"{error.get('description')}{where}" + (f", near '{near}'" if near else "") + "."


def _first_line(exc: BaseException) -> str:
    text = _ANSI.sub("", str(exc)).strip().splitlines()
    line = text[0] if text else type(exc).__name__
    return line if len(line) <= 300 else line[:300] + "..."


def _statement_kind(node: exp.Expression) -> str:
    if isinstance(node, exp.Command):
        return str(node.this).upper()
    return node.key.upper()


def _check(tree: exp.Expression, allowed: Mapping[str, str]) -> None:
    root = tree
    while isinstance(root, exp.Subquery):
        root = root.this
    if not isinstance(root, (exp.Select, exp.SetOperation)):
        raise QueryNotAllowed(f"Only SELECT queries are allowed, not {_statement_kind(root)}.")
    tables = ", ".join(sorted(allowed))
    reserved = set(allowed) | set(allowed.values())
    for node in tree.walk():
        if isinstance(node, _STATEMENTS):
            if isinstance(node, exp.Into):
                raise QueryNotAllowed("SELECT ... INTO is not allowed: only reading is.")
            raise QueryNotAllowed(f"Only SELECT queries are allowed; the query contains {_statement_kind(node)}.")
        if node.args.get("settings"):
            raise QueryNotAllowed("SETTINGS clauses are not allowed: keysvc sets the query's limits.")
        if isinstance(node, exp.Query) and node.args.get("format"):
            raise QueryNotAllowed("FORMAT clauses are not allowed: the rows are always returned as JSON objects.")
        if isinstance(node, exp.With) and node.args.get("recursive"):
            raise QueryNotAllowed("WITH RECURSIVE is not allowed.")
        if isinstance(node, exp.CTE):
            name = node.alias
            if name in reserved:
                # A CTE named like an alias would stand for it; a WITH constant named like the
                # scope column reaches into every subquery (ClickHouse's global WITH).
                what = "a table" if name in allowed else "the column queries are scoped by"
                raise QueryNotAllowed(f"A WITH clause may not define '{name}': that name is {what}.")
        elif isinstance(node, exp.Table):
            _check_table(node, allowed, tables)
        elif isinstance(node, exp.Column) and (node.args.get("db") or node.args.get("catalog")):
            raise QueryNotAllowed(f"Database-qualified names are not allowed ('{node.sql(DIALECT)}').")
        elif isinstance(node, exp.In):
            _check_in(node)
        elif isinstance(node, (exp.From, exp.Join)):
            _check_source(node)
        elif isinstance(node, exp.Func):
            _check_function(node)


def _check_table(node: exp.Table, allowed: Mapping[str, str], tables: str) -> None:
    this = node.this
    if not isinstance(this, exp.Identifier):
        name = this.name if isinstance(this, exp.Func) and isinstance(this.args.get("this"), str) else this.sql(DIALECT)
        raise QueryNotAllowed(f"Table functions are not allowed ({name}()); query one of: {tables}.")
    if node.args.get("db") or node.args.get("catalog"):
        qualified = ".".join(part.name for part in node.parts)
        raise QueryNotAllowed(f"Database-qualified table names are not allowed ('{qualified}'); "
                              f"query one of: {tables}.")
    name = this.name
    if name in allowed or _cte_in_scope(node, name):
        return
    raise QueryNotAllowed(f"Table '{name}' is not allowed; query one of: {tables}.")


def _cte_in_scope(table: exp.Table, name: str) -> bool:
    """Whether `name`, read where `table` is, is a CTE: one defined by the WITH of an enclosing
    query, before the CTE (if any) the reference sits in. A CTE's own name, inside its body, is
    the table of that name to ClickHouse, so it does not count; ClickHouse is laxer than this
    elsewhere (a WITH reaches later UNION branches), which only refuses more."""
    child: exp.Expression = table
    node = table.parent
    while node is not None:
        if isinstance(node, exp.With):
            # The reference is inside one of this WITH's CTEs: only the earlier ones are visible.
            index = next((i for i, cte in enumerate(node.expressions) if cte is child), None)
            if index is not None and any(_is_table_cte(cte) and cte.alias == name
                                         for cte in node.expressions[:index]):
                return True
            # Skip the query that owns this WITH: its other CTEs are not in scope here.
            child, node = node, node.parent
            if node is not None:
                child, node = node, node.parent
            continue
        with_ = node.args.get("with_") if isinstance(node, exp.Query) else None
        if isinstance(with_, exp.With) and any(_is_table_cte(cte) and cte.alias == name for cte in with_.expressions):
            return True
        child, node = node, node.parent
    return False


def _is_table_cte(cte: exp.Expression) -> bool:
    return isinstance(cte, exp.CTE) and not cte.args.get("scalar")


def _check_in(node: exp.In) -> None:
    operands = list(node.expressions)
    field = node.args.get("field")
    if field is not None:
        operands.append(field)
    for operand in operands:
        while isinstance(operand, exp.Paren):
            operand = operand.this
        if isinstance(operand, _NAMES):
            name = operand.sql(DIALECT)
            raise QueryNotAllowed(f"IN with a name on its right ({name}) is not allowed: ClickHouse reads it as "
                                  f"a table. Write IN (SELECT ... FROM {name}) or list the values.")


def _check_source(node: exp.Expression) -> None:
    if isinstance(node, exp.Join) and str(node.args.get("kind") or "").upper() == "ARRAY":
        return  # ARRAY JOIN unfolds arrays of the rows already read
    source = node.this
    if isinstance(source, exp.Final):
        source = source.this
    if isinstance(source, (exp.Table, exp.Subquery)):
        return
    what = source.key.upper() if isinstance(source, exp.Expression) else str(source)
    raise QueryNotAllowed(f"Reading FROM {what} is not allowed; query a table or a subquery.")


def _check_function(node: exp.Func) -> None:
    this = node.args.get("this")
    names = {node.sql_name().lower()}
    if isinstance(this, str):
        names.add(this.lower())
    for name in names:
        if name in DENIED_FUNCTIONS or name.startswith(DENIED_FUNCTION_PREFIXES):
            shown = this if isinstance(this, str) else name
            raise QueryNotAllowed(f"Function {shown}() is not allowed in analytics queries: it reaches beyond the "
                                  "tables' rows (files, dictionaries, other tables, settings, the server).")


def _scope(tree: exp.Expression, allowed: Mapping[str, str], scope: frozenset[str]) -> None:
    values = sorted(scope)
    for table in list(tree.find_all(exp.Table)):
        name = table.name
        if name not in allowed or not isinstance(table.this, exp.Identifier):
            continue  # a CTE (a CTE may not be named like an alias)
        inner: exp.Expression = exp.Table(this=exp.to_identifier(name, quoted=True))
        target: exp.Expression = table
        if isinstance(table.parent, exp.Final):
            inner = exp.Final(this=inner)
            target = table.parent
        column = exp.column(allowed[name], quoted=True)
        condition = (exp.In(this=column, expressions=[exp.Literal.string(v) for v in values])
                     if values else exp.false())
        subquery = exp.Select(expressions=[exp.Star()], from_=exp.From(this=inner), where=exp.Where(this=condition))
        alias = table.args.get("alias")
        alias = alias.copy() if alias is not None else exp.TableAlias(this=exp.to_identifier(name, quoted=True))
        replacement = exp.Subquery(this=subquery, alias=alias)
        if table.args.get("sample") is not None:
            # SAMPLE applies to what is read; keep it on the table inside.
            inner_table = inner.this if isinstance(inner, exp.Final) else inner
            inner_table.set("sample", table.args["sample"].copy())
        target.replace(replacement)


def _prewhere_to_where(tree: exp.Expression) -> None:
    """PREWHERE reads columns straight from a MergeTree table, which the aliases (views, and
    scoped subqueries) are not, so ClickHouse would refuse it; as a filter it is WHERE."""
    for select in list(tree.find_all(exp.Select)):
        prewhere = select.args.get("prewhere")
        if prewhere is not None:
            select.set("prewhere", None)
            select.where(prewhere.this.copy(), append=True, copy=False)


@functools.cache
def _sqlglot_understood() -> None:
    """Fail closed if the installed sqlglot shapes its trees otherwise than this module reads
    them (an argument renamed in a new major, say), rather than let a SETTINGS clause through."""
    probe = {"t": "c"}
    refusals = {"SELECT 1 FROM t SETTINGS readonly = 0": "SETTINGS", "SELECT 1 FROM t FORMAT CSV": "FORMAT",
                "SELECT * FROM system.one": "Database-qualified", "SELECT 1 FROM file('x')": "Table functions",
                "SELECT file('x')": "Function file()", "SELECT 1 WHERE 1 IN t": "IN with a name",
                "WITH t AS (SELECT 1) SELECT 1": "may not define"}
    for sql, expected in refusals.items():
        try:
            _check(_parse(sql), probe)
        except QueryNotAllowed as exc:
            if expected in str(exc):
                continue
        raise RuntimeError(f"sqlglot {sqlglot.__version__} does not parse as keysvc expects ({sql!r} passed); "
                           "analytics queries are refused until it is fixed")
    tree = _parse("WITH u AS (SELECT 1) SELECT * FROM t FINAL PREWHERE 1 JOIN u ON 1")
    _check(tree, probe)
    _prewhere_to_where(tree)
    _scope(tree, probe, frozenset({"v"}))
    out = tree.sql(dialect=DIALECT)
    if out != 'WITH u AS (SELECT 1) SELECT * FROM (SELECT * FROM "t" FINAL WHERE "c" IN (\'v\')) AS "t" JOIN u ON 1 WHERE 1':
        raise RuntimeError(f"sqlglot {sqlglot.__version__} does not rewrite as keysvc expects ({out!r}); "
                           "analytics queries are refused until it is fixed")
