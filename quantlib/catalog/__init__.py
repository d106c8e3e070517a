"""The catalog and short names (pure Python, no torch): every method, statistic, layer format and pack format with
what it needs (`registry` holds the machinery, one module per family the entries), the short-name grammar
(`names`) and the spec it describes (`spec`). Importing the package registers every entry."""

# Imported for their registrations (each module registers its entries when imported).
# Imported in this order: statistics and formats first, since methods name them.
from quantlib.catalog import statistics, formats, uniform, lookup_table, binary_coding, rotations, vector  # noqa: F401, I001
