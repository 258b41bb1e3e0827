"""GPU benchmarks (kernels, engine decode, ``lsa bench decode``) that print a table and write JSON."""
