"""The pack stage: a quantlib checkpoint rewritten in a layout other runtimes load (docs/packing.md). The formats
are listed in the catalog (`quantlib.catalog.pack_formats`); `writer` writes them (`layouts` holds each layout's
tensors), `load` reads any of them back into modules whose codes stay packed."""
