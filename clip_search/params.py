"""Search request parameters (``limit``, ``filter``, ``max_distance``): checked once, the same way by
the indexer, the merger and the web page, with errors that name the parameter."""

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


def validate_max_distance(max_distance: Any) -> Optional[float]:
    """``max_distance`` as a float of at least 0, or None when not given (no cut-off); else raise."""
    if max_distance is None:
        return None
    if isinstance(max_distance, bool) or not isinstance(max_distance, (int, float)) or not max_distance >= 0:
        raise ValueError(
            f'parameter max_distance={max_distance!r} must be a number of at least 0 '
            f'(a cosine distance, from 0 for exact matches only to 2)'
        )
    return float(max_distance)


# float32 rounding: a vector's cosine distance to itself can come out as 6e-8 rather than 0
EXACT_DISTANCE = 1e-6


def within_distance(distance: float, max_distance: Optional[float]) -> bool:
    """Whether a match at cosine ``distance`` is kept by the cut-off (None keeps all).

    Distances are clamped at 0 (an exact match's is 0, sent as -0.0), so 0 keeps exact matches only.
    """
    return max_distance is None or distance <= max_distance + EXACT_DISTANCE


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


def check_match_budget(queries: int, limit: int, max_matches: int) -> None:
    """Refuse a search that asks a shard for more than ``max_matches`` matches (queries x limit), naming the cap.

    Each match is a document the shard reads and the merger sorts: the cap bounds one request's memory.
    """
    asked = queries * limit
    if asked > max_matches:
        raise ValueError(
            f'the request asks for {asked:,} matches ({queries:,} queries x limit {limit:,}); '
            f'the cap is {max_matches:,} (max_matches): send fewer queries per request or a smaller limit'
        )


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
