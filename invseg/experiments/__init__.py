"""invseg.experiments: the drivers of the experiments in the README (sweeps, tables, CSV, plots).

The library checkers they call live in the library (:mod:`invseg.blocks.inversion`,
:mod:`invseg.analysis`); nothing in the library imports this package. Each module here is the engine of
one script in ``scripts/``.
"""
