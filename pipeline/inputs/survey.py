"""The records scan writes of what DVC cannot see: the source's files, the backbone resolved
from its registry row (with what the weights resolve to), whether train.heads lists each head,
and the installed libraries."""

from __future__ import annotations

from pipeline.data.sources import source_record
from pipeline.heads.registry import HEAD_NAMES
from pipeline.inputs.params import Params
from pipeline.project.layout import Layout
from pipeline.project.provenance import LIBRARIES, library_version
from pipeline.project.records import BackboneRecord, HeadListing, LibraryRecord, SourceRecord


def survey(
    params: Params, backbone: BackboneRecord, layout: Layout = Layout()
) -> tuple[SourceRecord, list[LibraryRecord]]:
    """Write data/scan/*.json; return the source and library records."""
    source = source_record(params.data)
    libraries = [LibraryRecord(library=d, version=library_version(d)) for d in LIBRARIES.values()]
    source.write(layout.source_record)
    backbone.write(layout.backbone_record)
    for head in HEAD_NAMES:
        HeadListing(head=head, listed=head in params.train.heads).write(layout.head_listing(head))
    for library in libraries:
        library.write(layout.library_record(library.library))
    return source, libraries
