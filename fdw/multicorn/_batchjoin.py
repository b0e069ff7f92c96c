"""The batched nested loop's grouping and matching (fdw/src/batchjoin_exec.c), for the FDW host.

Not part of Multicorn2's API.  The C node reads a batch of outer rows and evaluates their key
values; a :class:`BatchMatcher` turns them into requests (one ``execute()`` qual list per
combination of the non-batched keys) and tells which outer rows each returned row belongs to,
by the key values the row echoes.  This is dict and tuple work, once per batch and once per
returned row: beside a request to the sidecar it costs nothing, so it is Python rather than C.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from multicorn import Qual

# What rows_for returns for a row that matches no outer row; never mutated.
_NO_ROWS: list[int] = []


def _hashable(value: Any) -> Any:
    """A value usable in a dict key: array values (lists) become tuples, nested ones too."""
    return tuple(map(_hashable, value)) if isinstance(value, list) else value


class BatchMatcher:
    """Requests for one batch of outer rows, and the outer rows each returned row belongs to.

    ``key_names`` are the key columns, the batched (``= ANY``) one first; ``key_positions``
    their positions among the table's live columns, for rows returned as sequences.
    """

    def __init__(self, key_names: tuple[str, ...], key_positions: tuple[int, ...]) -> None:
        self.key_names = key_names
        self.key_positions = key_positions
        self.index: dict[tuple, list[int]] = {}

    def new_batch(self, restrictions: list[Qual], keys: list[tuple | None]) -> list[list[Qual]]:
        """Index a batch's rows by their key values (``keys[i]`` for row i; None where a key is
        NULL: such a row matches nothing, as ``col = NULL`` does) and return one qual list per
        group of rows sharing the values of the keys after the first: the restrictions,
        ``first = ANY(its distinct values)`` and ``key = value`` for the others."""
        self.index = {}
        groups: dict[tuple, tuple[tuple, list]] = {}
        for number, values in enumerate(keys):
            if values is None:
                continue
            key = tuple(map(_hashable, values))
            rows = self.index.get(key)
            if rows is None:
                self.index[key] = rows = []
                groups.setdefault(key[1:], (values, []))[1].append(values[0])
            rows.append(number)
        first, *others = self.key_names
        return [[*restrictions, Qual(first, ("=", True), firsts),
                 *(Qual(name, "=", value) for name, value in zip(others, values[1:]))]
                for values, firsts in groups.values()]

    def rows_for(self, row: Any) -> list[int]:
        """The batch rows (numbers) a returned row belongs to, by the key values it echoes.

        A dict is read by column name, a sequence by live column position, as the host
        converts rows (fdw/src/convert.c).  Called once per returned row: kept lean."""
        by_name = isinstance(row, dict) or (isinstance(row, Mapping) and not isinstance(row, Sequence))
        try:
            values = ([row[name] for name in self.key_names] if by_name
                      else [row[position] for position in self.key_positions])
        except (KeyError, IndexError):
            raise ValueError(
                f'a row returned by execute() lacks key column "{self._missing(row, by_name)}", by '
                "which a batched join matches it to its outer rows (SET llmfdw.join_batch_size = 0 "
                "avoids batched joins)") from None
        return self.index.get(tuple([_hashable(v) if isinstance(v, list) else v for v in values]), _NO_ROWS)

    def _missing(self, row: Any, by_name: bool) -> str:
        """The first key column a row lacks."""
        for name, position in zip(self.key_names, self.key_positions):
            try:
                row[name] if by_name else row[position]
            except (KeyError, IndexError):
                return name
        return self.key_names[0]
