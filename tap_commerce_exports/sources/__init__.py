"""The APIs the tap reads. Each module says only how its API spells the export lifecycle."""

from tap_commerce_exports.sources import voucherify
from tap_commerce_exports.sources.base import SourceDefinition

SOURCES: tuple[SourceDefinition, ...] = (voucherify.SOURCE,)
