"""The one record model and its readers (zsRE, CounterFact, KnowEdit, MQuAKE, ConvSent). Knows no method.

* :mod:`.schema` — :class:`Record` (the schema every consumer reads), :class:`Probe`, :class:`MQuAKECase`,
  :class:`RecordFormatError`;
* :mod:`.formats` — one parser per format and the registry :data:`FORMATS` (:func:`get_format`, :func:`parse_raw`);
* :mod:`.readers` — the flat :class:`EditRecord` view, file readers and the mixed training pool :func:`read_pool`.
"""
from .formats import FORMATS, RecordFormat, detect_record_format, get_format, parse_raw, read_json_records
from .readers import (
    EditRecord,
    detect_format,
    parse_pool_entry,
    parse_records,
    read_counterfact_mend,
    read_pool,
    read_records,
    read_zsre_mend,
    records_from_requests,
)
from .schema import MQuAKECase, Probe, Record, RecordFormatError

__all__ = [
    "EditRecord",
    "FORMATS",
    "MQuAKECase",
    "Probe",
    "Record",
    "RecordFormat",
    "RecordFormatError",
    "detect_format",
    "detect_record_format",
    "get_format",
    "parse_pool_entry",
    "parse_raw",
    "parse_records",
    "read_counterfact_mend",
    "read_json_records",
    "read_pool",
    "read_records",
    "read_zsre_mend",
    "records_from_requests",
]
