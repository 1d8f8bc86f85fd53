"""Fast paths, each with a plain-torch reference twin, behind one dispatch."""
