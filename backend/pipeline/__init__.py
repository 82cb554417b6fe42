"""The loan tape pipeline: seven phases, an engine that runs them, a bounded runner."""
