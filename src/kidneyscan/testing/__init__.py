"""Test scaffolding that has to ship inside the package.

Nothing in the product imports it. It lives under ``src/`` only because something outside the
test process imports it: every SuperNode of a deployment check loads the smoke Flower apps
(:mod:`.smoke`, :mod:`.secagg_smoke`) from the installed ``kidneyscan``, and the benchmarks build
DICOM slices with :mod:`.dicom`.
"""
