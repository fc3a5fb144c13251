"""The origin role: read an image from its source (archive, OCI layout, registry, engine)."""
