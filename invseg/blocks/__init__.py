"""invseg.blocks."""
