"""The local pipeline (profiles, fingerprinted stages, report) and the generated documentation sections."""
