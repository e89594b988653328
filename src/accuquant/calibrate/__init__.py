"""The calibration engine: the protocol methods implement, the one loop, the FP
trajectories it learns from, per-step's block data, AccuQuant's multistep gradients and
the data-parallel split."""
