"""mesh.cli."""
