"""Search request parameters (``limit``, ``filter``): checked once, the same way by the indexer, the
merger and the web page, with errors that name the parameter."""

from __future__ import annotations

from typing import Any, Iterable, Optional

DEFAULT_LIMIT = 10
MAX_LIMIT = 10_000


def validate_limit(limit: Any) -> int:
    """``limit`` as an int from 1 to MAX_LIMIT (JSON and protobuf carry numbers as floats); else raise."""
    if isinstance(limit, float) and limit.is_integer():
        limit = int(limit)
    if isinstance(limit, bool) or not isinstance(limit, int) or not 0 < limit <= MAX_LIMIT:
        raise ValueError(f'parameter limit={limit!r} must be an integer from 1 to {MAX_LIMIT}')
    return limit


def validate_search_parameters(
    parameters: dict, default_limit: int, columns: Iterable[str]
) -> tuple[int, Optional[dict]]:
    """Return ``(limit, filter)`` from request parameters, or raise naming the bad parameter."""
    limit = parameters.get('limit')
    limit = validate_limit(default_limit if limit is None else limit)
    search_filter = parameters.get('filter') or None
    if search_filter is not None:
        _validate_filter(search_filter, set(columns))
    return limit, search_filter


def _validate_filter(search_filter: Any, columns: set[str]) -> None:
    """Check a filter before annlite turns it into SQL (an unknown column once broke later queries)."""
    from annlite.filter import Filter

    if not isinstance(search_filter, dict):
        raise ValueError(f'parameter filter={search_filter!r} must be a dict like {{"color": {{"$eq": "red"}}}}')
    unknown = sorted(_filter_fields(search_filter) - columns)
    if unknown:
        known = ', '.join(sorted(columns)) or 'none; set the indexer columns'
        raise ValueError(f'parameter filter names unknown columns {unknown} (filterable columns: {known})')
    try:
        Filter(search_filter).parse_where_clause()
    except Exception as exc:
        raise ValueError(f'parameter filter={search_filter!r} is malformed: {exc}') from None


def _filter_fields(node: Any) -> set[str]:
    fields: set[str] = set()
    if isinstance(node, dict):
        for key, value in node.items():
            if key.startswith('$'):  # an operator: its operands may name more columns
                fields |= _filter_fields(value)
            else:
                fields.add(key)
    elif isinstance(node, list):
        for item in node:
            fields |= _filter_fields(item)
    return fields
