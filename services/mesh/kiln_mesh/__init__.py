"""Kiln's image-to-mesh model server: `kiln.mesh.v1.MeshProvider`."""

SERVICE_NAME = "kiln.mesh.v1.MeshProvider"
