"""Solvers and the shared solving loops: one module per method (listed in the catalog, `quantlib.catalog`), the
layer contract they implement (`contract`), the loops they share (`loops`), parameter inits (`grid_init`),
preprocessors (`preprocess`) and the trainable fake-quant modules of block-wise training and distillation
(`trainable`)."""
