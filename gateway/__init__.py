"""The gateway folder: Envoy configuration (kiln_gateway), descriptor set and web page."""
