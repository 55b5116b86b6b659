"""Conformance suite of sslspec: checks that a backend computes what the spec defines.

Run it on an installed backend with ``sslspec conformance NAME`` or
``pytest --pyargs sslspec_conformance --backend NAME``. The suite compares every
public function of :mod:`sslspec`, evaluated on the backend's arrays, with the
independent float64 NumPy reference in :mod:`sslspec_conformance.reference`, and
checks gradients, compiled functions, devices, dtypes, masks, networks and errors.
"""
