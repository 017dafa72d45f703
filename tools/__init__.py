"""Developer tools of the kood repository (not part of the installed package)."""
