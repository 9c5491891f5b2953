"""Research instruments behind the service's public surface: tables of real learning curves
(:mod:`search.bench.curves`, ``mann-search curves record``) and the replay benchmark of search methods
(:mod:`search.bench.replay`, ``mann-search benchmark``).

They import only names in ``search.__all__``; a replay of recorded curves is a benchmark instrument, not a test
double for training.
"""
