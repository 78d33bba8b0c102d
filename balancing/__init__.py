"""mesh.balancing."""
