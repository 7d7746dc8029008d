"""Pallas kernels for the MoE layer, each with a pure-JAX reference and a test.

gmm.py      grouped matmul (+ transposed, custom VJP): the Pallas twin of lax.ragged_dot
routing.py  top-k routing (sigmoid/softmax, group-limited) and tokens-per-expert counts

Submodules are imported explicitly (`from r1jax.kernels import gmm`); nothing is
imported here so that r1jax.model can reach the kernels without an import cycle.
"""
