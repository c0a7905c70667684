"""Evolutionary search of the allocation (EvoPress-style): engine, factor bank, fitness, backends."""
