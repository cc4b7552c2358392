"""invseg.analysis."""
