"""Readers for EasyEdit's knowledge-editing record formats (zsRE-MEND, CounterFact-MEND). Knows no method."""
from .readers import (
    EditRecord,
    RecordFormatError,
    detect_format,
    parse_records,
    parse_pool_entry,
    read_counterfact_mend,
    read_pool,
    read_records,
    read_zsre_mend,
    records_from_requests,
)

__all__ = [
    "EditRecord",
    "RecordFormatError",
    "detect_format",
    "parse_records",
    "parse_pool_entry",
    "read_counterfact_mend",
    "read_pool",
    "read_records",
    "read_zsre_mend",
    "records_from_requests",
]
