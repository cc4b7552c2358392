"""invseg.train."""
