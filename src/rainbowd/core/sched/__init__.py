"""The scheduler: who sends which layer (or piece of one) to whom, and why.

Pure like the rest of core: fed events with the time passed in, by the
coordinator and by the simulator (bench/sim) alike.
"""
