"""invseg.data."""
