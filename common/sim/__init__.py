"""The LIBERO simulator: the evaluation protocol, the scripted expert, demonstration collection and files."""
