"""Deterministic simulation of the Phantom control plane: the real cores, one process, virtual time.

See docs/simulation.md. ``python -m phantom_sim --seeds N`` runs N seeded histories.
"""
