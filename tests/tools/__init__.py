"""Helpers for the fault tests: a frame-aware TCP proxy, state checks, process and segment probes."""
