"""Contract stand-in for NVIDIA's subquadratic-ops-torch (see ../README.md)."""
