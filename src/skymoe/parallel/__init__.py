"""Parallel training: layouts and meshes, tensor/expert/data parallelism applied to the model
from outside (``parallelize``), collectives with traffic accounting."""
