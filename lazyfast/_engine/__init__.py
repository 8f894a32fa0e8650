"""The backends behind lazyfast's public API (internal: CONTRIBUTING.md names the owner of each file).

state (model-state utilities), outputs, uses (per-call verification), generic, products, structured/,
two_layer (fused backend), mlp. Nothing here is imported by ``import lazyfast`` under its own name:
the public API re-exports what users call.
"""
