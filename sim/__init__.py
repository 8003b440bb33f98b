"""`make sim`: a seeded fault simulator for the books (TigerBeetle's VOPR is the model).

Runs a random but reproducible mix of money operations through the real HTTP API of real server
processes and a real redis-server, injects faults, keeps its own model of every balance and checks
the invariants in `sim.invariants`. A failure prints the seed and the shortest op log found that
reproduces it. See `python -m sim --help`.
"""
