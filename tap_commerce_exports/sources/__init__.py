"""The APIs the tap reads. Each module says only how its API spells the export lifecycle."""

from tap_commerce_exports.sources import intelligems, nextcommerce, voucherify
from tap_commerce_exports.sources.base import SourceDefinition

SOURCES: tuple[SourceDefinition, ...] = (intelligems.SOURCE, nextcommerce.SOURCE, voucherify.SOURCE)
