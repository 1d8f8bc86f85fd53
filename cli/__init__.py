"""The `circuitscale` command line: the top layer, above sweeps/ and analysis/ (DESIGN.md)."""
