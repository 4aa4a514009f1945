"""The DAGM 2007 tensorflow-datasets builder."""
