"""Model loading: catalog, architecture adapters, fingerprints."""
