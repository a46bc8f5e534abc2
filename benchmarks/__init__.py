"""isopace benchmarks: each ``bench_<name>.py`` has a ``main()`` printing ratios."""
