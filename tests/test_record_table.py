"""``zipformat.RecordTable``: a zip's records by name with the plain ones held as columns.  For any records it
must answer exactly as the dict it replaced (the first record of a name kept, in order), with records that
compare equal, and records assigned later kept as given."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from ckpttools.formats.zipformat import Record, RecordTable

OFFSETS = st.integers(0, 2**64 + 5)  # past what a 64-bit column holds too (a hostile zip64 field)
RECORDS = st.builds(
    Record,
    name=st.sampled_from([f"archive/data/{i}" for i in range(6)] + ["archive/data.pkl", "archive/version"]),
    header_offset=OFFSETS,
    data_offset=st.one_of(st.just(-1), OFFSETS),
    size=OFFSETS,
    crc=st.one_of(st.none(), st.integers(0, 2**32 - 1)),
    method=st.sampled_from([0, 0, 0, 8]),
    truncated=st.booleans(),
    end=OFFSETS,
    local_name=st.one_of(st.none(), st.just("archive/data/9")),
    compressed=st.one_of(st.none(), OFFSETS),
)


def _as_dict(records: list[Record]) -> dict[str, Record]:
    out: dict[str, Record] = {}
    for r in records:
        out.setdefault(r.name, r)
    return out


@settings(max_examples=200, deadline=None)
@given(records=st.lists(RECORDS, max_size=20), later=st.lists(RECORDS, max_size=4), gone=st.lists(st.integers(0, 7)))
def test_the_table_answers_as_the_dict_it_replaced(records, later, gone):
    table, expected = RecordTable(records), _as_dict(records)
    for r in later:  # assigned after: kept as given, found before a row of the same name
        table[r.name] = expected[r.name] = r
        assert table[r.name] is r
    for i in gone:
        name = sorted(expected)[i % len(expected)] if expected else None
        if name is not None:
            del table[name], expected[name]
    assert list(table) == list(expected) and len(table) == len(expected)
    assert all(table[name] == record and name in table for name, record in expected.items())
    assert table.get("archive/other") is None and "archive/other" not in table
    assert dict(table.items()) == expected
