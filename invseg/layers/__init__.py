"""invseg.layers."""
