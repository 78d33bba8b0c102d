"""mesh.model."""
