"""A Multicorn-API FDW class with a batchable key column, for testing the batched join (no sidecar).

Its columns are named by table options, so that a test can give them names in any encoding:
`key` (default "key") is a request column and a batch key column, echoed in each row;
`answer` (default "answer") is the key upper-cased.  Each execute() call is logged to
`calls` with the key values it received.
"""
from __future__ import annotations

from multicorn import ForeignDataWrapper

calls: list[list] = []


class KeyedFdw(ForeignDataWrapper):
    def __init__(self, options, columns):
        super().__init__(options, columns)
        self.key = options.get("key", "key")
        self.answer = options.get("answer", "answer")

    @property
    def request_columns(self) -> list[str]:
        return [self.key]

    @property
    def batch_key_columns(self) -> list[str]:
        return [self.key]

    def get_path_keys(self):
        return [((self.key,), 1)]

    def execute(self, quals, columns, **kwargs):
        values = [v for q in quals if q.field_name == self.key
                  for v in (q.value if q.is_list_operator else [q.value]) if v is not None]
        calls.append(values)
        for value in values:
            yield {self.key: value, self.answer: value.upper()}
