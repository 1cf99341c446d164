"""Action data: the one normalization and HDF5 episodes (chunks, episode-level splits)."""
