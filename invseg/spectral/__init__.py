"""invseg.spectral."""
