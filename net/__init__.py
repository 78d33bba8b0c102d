"""mesh.net."""
