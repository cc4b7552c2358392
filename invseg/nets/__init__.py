"""invseg.nets."""
